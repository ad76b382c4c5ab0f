"""The distillation methods, one module each (docs/design.md section 4).

    base.py            StudentOut, Targets, GameConfig, the Method base class and the registry (`register`)
    games.py           the adversarial game: Alternating, Reversal, Cooperative
    losses.py          the loss formulas (soft cross-entropy, KD, similarities, gradient reversal)
    discriminators.py  the discriminators: ours (mlp) and the official MEAL code's
    meal.py            MEAL        meal_v2.py   MEAL V2        anc.py   Adversarial Network Compression
    kd.py              Hinton KD   scratch.py   the label-only baseline

Each method module registers its class (`@register`); its options are one dataclass, built from the
`distill.<name>` params section. A method of your own is one module that does the same, listed under
`distill.plugins` (a dotted module name or a .py file), with its options under `distill.<name>`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from pipeline.config import UserError, build, check, check_choice
from pipeline.methods.base import REGISTRY, GameConfig, Method, StudentOut, Targets, register
from pipeline.methods import meal, meal_v2, anc, kd, scratch  # noqa: F401,E402  each registers itself, in this order
from pipeline.models import NUM_BLOCKS

METHODS = REGISTRY  # method name -> class: the one list of methods

__all__ = ["METHODS", "REGISTRY", "GameConfig", "Method", "StudentOut", "Targets", "register", "load_plugins",
           "make_method", "method_configs", "distill_teachers"]


def load_plugins(specs: list[str]) -> None:
    """Import the modules in `specs` (dotted names, or paths of .py files) so that their methods register."""
    for spec in specs:
        try:
            if spec.endswith(".py"):
                path = Path(spec).resolve()
                name = f"meal_plugin_{path.stem}"
                if sys.modules.get(name) is None or Path(sys.modules[name].__file__) != path:
                    loader = importlib.util.spec_from_file_location(name, path)
                    if loader is None or not path.is_file():
                        raise FileNotFoundError(f"no file {spec}")
                    module = importlib.util.module_from_spec(loader)
                    sys.modules[name] = module
                    loader.loader.exec_module(module)
            else:
                importlib.import_module(spec)
        except UserError:
            raise
        except Exception as exc:  # the plugin's own error, in one line
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise UserError(f"distill.plugins: cannot load {spec} ({type(exc).__name__}: {first}): fix the module "
                            f"or the path (relative to the working directory)") from None


def method_configs(cfg: Any, teachers: list[str]) -> dict[str, Any]:
    """Every registered method's options from the DistillConfig `cfg` (built and checked, not only the chosen
    one's), teacher names included."""
    built = {}
    for name, cls in REGISTRY.items():
        built[name] = build(cls.Config, cfg.method_options.get(name), f"distill.{name}")
        cls.check_teachers(built[name], teachers)
    return built


def distill_teachers(cfg: Any, listed: list[str]) -> list[str]:
    """The teachers to distill from: `distill.teachers`, or every teacher in the params' `teachers`."""
    unknown = [t for t in cfg.teachers if t not in listed]
    if unknown:
        raise UserError(f"distill.teachers names '{unknown[0]}', which is not under `teachers` in the params "
                        f"(known: {', '.join(listed) or 'none'})")
    chosen = list(cfg.teachers) or list(listed)
    if REGISTRY[cfg.method].uses_teachers and not chosen:
        raise UserError(f"distill.method {cfg.method} needs teachers: list some under `teachers` in the params")
    return chosen


def make_method(name: str, cfg: Any, teachers: list[str], block_names: list[str] | None = None) -> Method:
    """Method `name` with its options `cfg`, distilling from `teachers` whose caches name `block_names`."""
    check_choice(name, REGISTRY, "distill.method")
    names = list(block_names or [f"block{i + 1}" for i in range(NUM_BLOCKS)])
    check(len(names) == NUM_BLOCKS, f"the caches name {len(names)} blocks, the models return {NUM_BLOCKS}")
    cls = REGISTRY[name]
    return cls(cfg, teachers if cls.uses_teachers else [], names)
