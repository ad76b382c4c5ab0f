"""What every distillation method builds on: the student's outputs, the teachers' targets, the base class and
the registry.

A method is one module: a config dataclass (its options, the `distill.<name>` params section) and a `Method`
subclass decorated with `@register`, which names it and gives it its `Config`. The registry is the only list
of methods: the params' method sections, the CLI's choices and the run identity derive from it. The class says
- `pick(rng)`: the teachers whose cached targets this step reads;
- `feature_blocks`: the blocks whose aligned vectors it compares or discriminates (student and teacher);
- `losses(out, targets, labels)`: its named, already weighted loss terms (the trainer sums them);
- `discriminators(num_classes, lengths)`, `disc_weights()` and `disc_inputs(out, targets)`: what its
  discriminators see and how much each weighs;
- `game`: its adversarial options (pipeline.methods.games plays them), None without discriminators;
- `uses_teachers`, `check_teachers(cfg, teachers)`: whether it reads teachers, and a check of its options
  against the teacher names; `student_kwargs(kwargs)`: what it changes in the student (ANC's dropout).
docs/design.md section 4 describes the interface and the game.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import UserError, check, check_choice
from pipeline.methods.discriminators import KINDS as DISCRIMINATOR_KINDS

GAMES = ("alternating", "reversal", "cooperative", "none")


@dataclass
class StudentOut:
    logits: torch.Tensor  # (B, C)
    blocks: list[torch.Tensor] | None  # (B, L_g) aligned vectors of the method's feature_blocks, in that order


@dataclass
class Targets:
    logits: torch.Tensor  # (k, B, C) float32: the picked teachers' logits (through fp16)
    blocks: list[torch.Tensor] | None  # (k, B, L_g) float32 aligned vectors of the method's feature_blocks


@dataclass
class GameConfig:
    """The adversarial options every method with discriminators shares."""

    adversarial: str = "alternating"  # alternating | reversal | cooperative (official MEAL code) | none
    adv_weight: float = 0.1  # weight of the student's adversarial term (cooperative: eta, officially 1)
    d_lr: float = 1e-3  # discriminator learning rate (constant; cooperative: its peak, on the student's schedule)
    d_optimizer: str = "adam"  # adam (betas 0.5, 0.999) | sgd (momentum 0.9); cooperative: D joins the student's SGD
    d_weight_decay: float = 0.0  # L2 penalty on discriminator weights (official cooperative: 5e-4)
    d_l1: float = 0.0  # L1 penalty on discriminator weights, added to D's loss (ANC's "L1" regularisation)
    discriminator: str = "mlp"  # mlp (ours: LeakyReLU, one logit) | official (MEAL's: ReLU after every layer, 2 columns)
    d_reduction: int = 2  # D's width reduction per layer, D -> D/r -> D/r^2 -> out (MEAL V2's ImageNet D: 8)

    def check_game(self, where: str) -> None:
        check_choice(self.adversarial, GAMES, f"{where}.adversarial")
        check(self.adv_weight >= 0, f"{where}.adv_weight = {self.adv_weight} must be >= 0")
        check(self.d_lr > 0, f"{where}.d_lr = {self.d_lr} must be positive")
        check_choice(self.d_optimizer, ("adam", "sgd"), f"{where}.d_optimizer")
        check(self.d_weight_decay >= 0, f"{where}.d_weight_decay = {self.d_weight_decay} must be >= 0")
        check(self.d_l1 >= 0, f"{where}.d_l1 = {self.d_l1} must be >= 0")
        check_choice(self.discriminator, DISCRIMINATOR_KINDS, f"{where}.discriminator")
        check(self.d_reduction >= 1, f"{where}.d_reduction = {self.d_reduction} must be at least 1")


REGISTRY: dict[str, type["Method"]] = {}  # method name -> class, in registration order


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: `cls` becomes the method `cls.name`, its options the dataclass `cls.Config`."""
    if not cls.name or not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"{cls.__qualname__} needs a `name` and a dataclass `Config` to be registered")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise UserError(f"two methods are registered as {cls.name!r} ({REGISTRY[cls.name].__module__} and "
                        f"{cls.__module__}): rename one")
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class NoOptions:
    """A method without options."""


class Method:
    """A distillation method: what to read, what to minimise, what to discriminate."""

    name = ""
    Config: type = NoOptions  # its options: a dataclass built from the `distill.<name>` params section
    uses_teachers = True  # False: the method reads no teacher (scratch), so no cache is opened
    feature_blocks: tuple[int, ...] = ()  # block indexes whose aligned vectors the method compares

    def __init__(self, cfg: Any, teachers: list[str], block_names: list[str]):
        self.cfg, self.teachers, self.block_names = cfg, teachers, block_names

    @classmethod
    def check_teachers(cls, cfg: Any, teachers: list[str]) -> None:
        """Refuse (UserError) options that name a teacher not among `teachers`; nothing to check by default."""

    def student_kwargs(self, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The student's constructor kwargs as the method wants them (ANC sets its noise); unchanged by default."""
        return model_kwargs

    def notes(self) -> list[str]:
        """Lines worth telling the user before training (settings that make the method a no-op, say)."""
        return []

    @property
    def game(self) -> GameConfig | None:
        """The adversarial options, or None when the method plays no game."""
        cfg = self.cfg
        return cfg if isinstance(cfg, GameConfig) and cfg.adversarial != "none" else None

    @property
    def adversarial(self) -> str:
        return "none" if self.game is None else self.game.adversarial

    @property
    def temperature(self) -> float:
        """T at which the method softens the teachers' logits (its `temperature` option, else 1): FKD's
        approximation of mixed targets mixes the soft labels at it (pipeline.mix.fkd_targets)."""
        return float(getattr(self.cfg, "temperature", 1.0))

    def pick(self, rng: random.Random) -> list[int]:
        """Indexes (into self.teachers) of the teachers whose targets this step reads."""
        return list(range(len(self.teachers)))

    def losses(self, out: StudentOut, tgt: Targets | None, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named scalar float32 loss terms, already weighted: their sum is what the student minimises."""
        raise NotImplementedError

    def discriminators(self, num_classes: int, lengths: list[int]) -> dict[str, int]:
        """Discriminator name -> input size, given C and every block's aligned length; empty when the
        method plays no adversarial game."""
        return {}

    def disc_weights(self) -> list[float] | None:
        """Each discriminator's weight in the game (times adv_weight), in `discriminators` order; None: all 1."""
        return None

    def disc_inputs(self, out: StudentOut, tgt: Targets) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(student vectors, teacher vectors): one (B, D_g) tensor each per discriminator, in the order
        `discriminators` names them."""
        raise NotImplementedError

    def adversarial_rows(self, batch: int) -> int:
        """How many extra student vectors D is shown labelled "teacher" per batch (ANC's adversarial samples)."""
        return 0


def check_teacher_choice(value: str, choices: tuple[str, ...], teachers: list[str], where: str) -> None:
    """A `teacher` option must be one of the fixed `choices` (mean, random...) or a teacher's name."""
    if value not in choices and value not in teachers:
        raise UserError(f"{where} = {value!r} is not one of {', '.join(choices + tuple(teachers))}")


def named_teacher(choice: str, teachers: list[str]) -> int | None:
    """The index of the teacher a method's `teacher` option names, None for random/mean."""
    return teachers.index(choice) if choice in teachers else None
