"""Named distill runs: several variants of the methods trained side by side from one params file, and what one
run is: its settings (`read_settings`), the identity its checkpoints must keep to be resumed, its summary.

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

import json
import re
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import paths
from pipeline.cache import CacheConfig
from pipeline.checkpoints import write_json
from pipeline.config import UserError, build, section, to_dict, without_defaults
from pipeline.data import DataConfig, shape_of
from pipeline.distill import DistillConfig, StudentConfig
from pipeline.methods import METHODS, distill_teachers, method_configs
from pipeline.models import build_model, constructor_kwargs
from pipeline.optim import LATER_KEYS

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


# ---------------------------------------------------------------- one run's settings, identity and summary

# settings that change neither the student nor the metrics' meaning: a resume may differ in them
NOT_IDENTITY = ("log_every", "eval_batch_size", "compile", "seeds", "jobs", "plugins")  # seeds/jobs: which and how
# many seeds a run trains (one seed's identity has its own `seed`); plugins: where methods come from
NOT_SHARED = ("runs", "method_options")  # the method's own options enter the identity as `options`


@dataclass
class Settings:
    """Every config of a run, built and checked before any work."""

    data: DataConfig
    student: StudentConfig
    distill: DistillConfig
    options: Any  # the chosen method's config dataclass
    cache: CacheConfig
    teachers: list[str]
    online: bool
    run: str | None = None  # the distill.runs entry trained, or None for plain `distill.method`

    @property
    def method(self) -> str:
        return self.distill.method

    @property
    def run_name(self) -> str:
        """The name of the checkpoint and metrics: the run's (or the method's); online runs keep their own
        (they are the speed baseline)."""
        name = self.run or self.method
        return f"{name}_online" if self.online and METHODS[self.method].uses_teachers else name

    @property
    def is_online(self) -> bool:
        return self.online and METHODS[self.method].uses_teachers


def read_settings(params: dict[str, Any], method: str | None = None, epochs: int | None = None,
                  seed: int | None = None, online: bool = False, run: str | None = None) -> Settings:
    """All configs of one run from the params plus command-line overrides; one-line UserError on anything wrong.

    Every named run under `distill.runs` is checked too, whichever run (or none) is trained.
    """
    data_cfg = build(DataConfig, section(params, "data"), "data")
    listed = list(section(params, "teachers"))
    distill_section = section(params, "distill")
    check_runs(distill_section, listed)
    if run is not None and method is not None:
        raise UserError(f"--run {run} and --method {method} both given: a run names its own method "
                        f"(distill.runs.{run}.method), so pass only one")
    base = run_section(distill_section, run) if run is not None else distill_section
    student_section = section(params, "student")
    if run is not None:
        student_section = deep_merge(student_section, student_overrides(base, run))
    student = build(StudentConfig, student_section, "student")
    overrides = {k: v for k, v in (("method", method), ("epochs", epochs), ("seed", seed)) if v is not None}
    cfg = build(DistillConfig, {**base, **overrides}, "distill")
    teachers = distill_teachers(cfg, listed)
    options = method_configs(cfg, teachers)[cfg.method]  # builds (and checks) every method's options
    cache_cfg = build(CacheConfig, section(params, "cache"), "cache")
    with torch.device("meta"):  # checks arch and kwargs without allocating anything
        build_model(student.arch, **constructor_kwargs(student.arch, student.model, shape_of(data_cfg)))
    teachers = teachers if METHODS[cfg.method].uses_teachers else []
    return Settings(data_cfg, student, cfg, options, cache_cfg, teachers, online, run)


def run_identity(s: Settings, cfg: DistillConfig, model_kwargs: dict[str, Any], init: str, init_sha: str | None,
                 train, plan, hashes: dict[str, Any], align_cfg) -> dict[str, Any]:
    """What a seed's checkpoint must share with the settings to be resumed (pipeline.checkpoints.load_resumable)."""
    shared = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IDENTITY and k not in NOT_SHARED}
    later = {**LATER_KEYS, "shuffle": "full", "shuffle_window": 8, "mix_targets": "exact"}
    if cfg.shuffle == "full":  # the window is unused then: no reason to refuse a checkpoint over it
        later["shuffle_window"] = cfg.shuffle_window
    shared = without_defaults(shared, later)  # checkpoints made before these keys existed still resume
    return {
        "method": s.method,
        "online": s.is_online,
        "distill": shared,
        "options": without_defaults(to_dict(s.options), {"d_reduction": 2}),
        "student": {**to_dict(s.student), "init": init},
        "student_init_sha256": init_sha,
        "model_kwargs": model_kwargs,
        "data": s.data.identity(),
        "dataset_fingerprint": train.fingerprint,
        "view_plan": plan.fingerprint,
        "teachers": hashes,
        "align": to_dict(align_cfg) if s.teachers else None,  # scratch compares no features
        # a top-k store's leftover mass as it is read: in the identity only when not the default (spread)
        **({"leftover": s.cache.leftover} if s.cache.leftover != "spread" else {}),
    }


def seed_metrics(s: Settings, base: dict[str, Any], ckpt: dict[str, Any], device: str) -> dict[str, Any]:
    """One seed's training metrics (data/student/RUN/seedS.json): final and best accuracy, per-epoch history."""
    history = ckpt["history"]
    return {
        "method": s.method, "run": s.run_name, "seed": base["seed"], "online": s.is_online, "arch": base["arch"],
        "params": base["params"], "teachers": s.teachers, "device": device,
        "epochs": ckpt["epoch"], "finished": ckpt["finished"],
        "test_acc": ckpt["test_acc"], "best_acc": ckpt["best_acc"], "best_epoch": ckpt["best_epoch"],
        "wall_time_s": round(ckpt["wall_time_s"], 3),
        "images_per_s": sum(r["images_per_s"] for r in history) / max(1, len(history)),
        "options": to_dict(s.options),
        "history": history,
    }


def write_summary(s: Settings) -> dict[str, Any]:
    """metrics/distill/RUN.json: every listed seed's final-epoch accuracy, their mean and sample std, and each
    seed's own metrics (history included). Seeds not trained yet are left out and the run is not finished."""
    per_seed = []
    for seed in s.distill.seeds:
        metrics_path = paths.student_seed_metrics(s.run_name, seed)
        if metrics_path.is_file():
            per_seed.append(json.loads(metrics_path.read_text()))
    done = [m for m in per_seed if m["finished"]]
    accs = [m["test_acc"] for m in done]
    first = per_seed[0] if per_seed else {}
    summary = {
        "method": s.method, "run": s.run_name, "online": s.is_online,
        "arch": s.student.arch, "params": first.get("params"), "teachers": s.teachers,
        "seeds": [m["seed"] for m in done],
        "finished": len(done) == len(s.distill.seeds),
        "test_acc": accs,  # final epoch, never the best: the split is the test split (or val with val_size)
        "test_acc_mean": statistics.mean(accs) if accs else None,
        "test_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "wall_time_s": round(sum(m["wall_time_s"] for m in per_seed), 3),
        "per_seed": per_seed,
    }
    write_json(paths.student_metrics(s.run_name), summary)
    return summary
