"""The distillation methods, one module each (docs/design.md section 4).

    base.py       StudentOut, Targets, GameConfig and the Method base class
    games.py      the adversarial game: Alternating, Reversal, Cooperative
    meal.py       MEAL        meal_v2.py   MEAL V2        anc.py   Adversarial Network Compression
    kd.py         Hinton KD   scratch.py   the label-only baseline

Each method's options are one dataclass, built from its sub-dict of the `distill` params section.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import UserError, build, check, check_choice
from pipeline.methods.anc import Anc, AncConfig
from pipeline.methods.base import GameConfig, Method, StudentOut, Targets
from pipeline.methods.kd import Kd, KdConfig
from pipeline.methods.meal import Meal, MealConfig
from pipeline.methods.meal_v2 import MealV2, MealV2Config
from pipeline.methods.scratch import Scratch, ScratchConfig
from pipeline.models import NUM_BLOCKS

METHODS: dict[str, type[Method]] = {"meal": Meal, "meal_v2": MealV2, "anc": Anc, "kd": Kd, "scratch": Scratch}
CONFIGS: dict[str, type] = {"meal": MealConfig, "meal_v2": MealV2Config, "anc": AncConfig, "kd": KdConfig,
                            "scratch": ScratchConfig}

__all__ = ["METHODS", "CONFIGS", "GameConfig", "Method", "StudentOut", "Targets", "make_method", "method_configs",
           "distill_teachers"]


def method_configs(cfg: Any, teachers: list[str]) -> dict[str, Any]:
    """Every method's options from the DistillConfig `cfg` (built and checked, not only the chosen one's),
    teacher names included."""
    built = {name: build(cls, getattr(cfg, name), f"distill.{name}") for name, cls in CONFIGS.items()}
    for name, choices in (("anc", ("random", "mean")), ("kd", ("mean",))):
        teacher = built[name].teacher
        if teacher not in choices and teacher not in teachers:
            raise UserError(f"distill.{name}.teacher = {teacher!r} is not one of {', '.join(choices + tuple(teachers))}")
    return built


def distill_teachers(cfg: Any, listed: list[str]) -> list[str]:
    """The teachers to distill from: `distill.teachers`, or every teacher in the params' `teachers`."""
    unknown = [t for t in cfg.teachers if t not in listed]
    if unknown:
        raise UserError(f"distill.teachers names '{unknown[0]}', which is not under `teachers` in the params "
                        f"(known: {', '.join(listed) or 'none'})")
    chosen = list(cfg.teachers) or list(listed)
    if cfg.method != "scratch" and not chosen:
        raise UserError(f"distill.method {cfg.method} needs teachers: list some under `teachers` in the params")
    return chosen


def make_method(name: str, cfg: Any, teachers: list[str], block_names: list[str] | None = None) -> Method:
    """Method `name` with its options `cfg`, distilling from `teachers` whose caches name `block_names`."""
    check_choice(name, METHODS, "distill.method")
    names = list(block_names or [f"block{i + 1}" for i in range(NUM_BLOCKS)])
    check(len(names) == NUM_BLOCKS, f"the caches name {len(names)} blocks, the models return {NUM_BLOCKS}")
    return METHODS[name](cfg, teachers if name != "scratch" else [], names)
