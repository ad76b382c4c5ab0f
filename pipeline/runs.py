"""Named distill runs: several variants of the methods trained side by side from one params file.

The `distill` params section may hold a `runs` mapping, run name -> {method: NAME, overrides...}:

    distill:
      epochs: 20
      meal: {adversarial: alternating}
      runs:
        scratch:   {method: scratch}
        meal:      {method: meal}
        meal_coop: {method: meal, meal: {adversarial: cooperative}}   # the official code's game
        meal_v2_ft: {method: meal_v2, student: {init: data/student/scratch/seed{seed}.pt}}

A run sees the `distill` section with its own entries deep-merged in (nested mappings merge key by
key, anything else replaces), so `meal_coop` above keeps every other `distill.meal` option. A run's
`student` mapping is merged into the `student` section instead (`student_overrides`).
`python -m stages.distill --run meal_coop` trains it into data/student/meal_coop/seed<S>.pt, one per seed of
`distill.seeds`; dvc.yaml has one `distill@<run>` stage per run. Every run is checked at start-up, so a typo
in one run fails every stage at once instead of hours later in the last one.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.config import UserError, build
from pipeline.distill import DistillConfig
from pipeline.methods import METHODS, distill_teachers, method_configs

# run names become file names (data/student/<run>.pt) and DVC stage names (distill@<run>)
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged in: mappings merge recursively, other values replace. Inputs untouched."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def run_names(distill_section: dict[str, Any]) -> list[str]:
    """The run names under `distill.runs`, in params order ([] when there is no `runs`)."""
    runs = distill_section.get("runs") or {}
    if not isinstance(runs, dict):
        raise UserError(f"params distill.runs must be a mapping of run name -> {{method: NAME, ...}}, "
                        f"got {type(runs).__name__}")
    return list(runs)


def refuse_seed_key(section: dict[str, Any], where: str) -> None:
    """`seed` is set per training process from `seeds`; a params `seed` would be silently overwritten."""
    if "seed" in section:
        raise UserError(f"params {where} sets `seed`, but a run trains every seed of `seeds`: write "
                        f"seeds: [{section['seed']}] instead")


def run_section(distill_section: dict[str, Any], name: str) -> dict[str, Any]:
    """The `distill` section as run `name` sees it: the run's entries deep-merged in, `runs` itself dropped."""
    runs = distill_section.get("runs") or {}
    if name not in runs:
        known = ", ".join(run_names(distill_section)) or "none"
        raise UserError(f"distill run '{name}' is not under distill.runs in the params (known: {known})")
    if not RUN_NAME.match(name):
        raise UserError(f"distill run name {name!r} must be letters, digits, '_' or '-' (it names files and stages)")
    run = runs[name]
    if not isinstance(run, dict):
        raise UserError(f"params distill.runs.{name} must be a mapping like {{method: meal}}, got {run!r}")
    if "method" not in run:
        raise UserError(f"params distill.runs.{name} has no `method`: add one of {', '.join(METHODS)}")
    if "runs" in run:
        raise UserError(f"params distill.runs.{name} overrides `runs`: a run cannot hold runs, remove the key")
    refuse_seed_key(run, f"distill.runs.{name}")
    base = {k: v for k, v in distill_section.items() if k != "runs"}
    return deep_merge(base, run)


def student_overrides(merged: dict[str, Any], name: str) -> dict[str, Any]:
    """Pops a run's `student` overrides (e.g. {init: PATH}) out of its merged distill section."""
    value = merged.pop("student", None) or {}
    if not isinstance(value, dict):
        raise UserError(f"params distill.runs.{name}.student must be a mapping like {{init: PATH}}, got {value!r}")
    return value


def run_config(distill_section: dict[str, Any], name: str, teachers: list[str]) -> DistillConfig:
    """Run `name`'s DistillConfig, with every method's options checked; errors name the run."""
    merged = run_section(distill_section, name)
    student_overrides(merged, name)
    try:
        cfg = build(DistillConfig, merged, "distill")
        method_configs(cfg, distill_teachers(cfg, teachers))
    except UserError as exc:
        raise UserError(f"distill run '{name}': {exc.message}") from None
    return cfg


def check_runs(distill_section: dict[str, Any], teachers: list[str]) -> dict[str, DistillConfig]:
    """Every run's config, built and checked (the first bad run raises a one-line UserError)."""
    refuse_seed_key(distill_section, "distill")
    return {name: run_config(distill_section, name, teachers) for name in run_names(distill_section)}
