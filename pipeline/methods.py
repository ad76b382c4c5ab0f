"""The distillation methods as *plans*: which teacher targets a step needs, which losses, which discriminators.

One training loop (pipeline.distill) serves every method; a method only says
- `pick(rng)`: the teachers whose cached targets this step reads (MEAL: one at random; MEAL V2 and KD
  on the ensemble: all; scratch: none),
- `feature_blocks`: the blocks whose aligned vectors it compares (student and teacher),
- `losses(out, targets, labels)`: the student's loss terms (already weighted; their sum is minimised),
  and, for the plans that compare blocks (MEAL, ANC), `loss_grads`: the same terms with their gradients
  written out, so the CPU step runs no autograd graph past the student's outputs,
- `discriminators` and `disc_inputs(out, targets)`: the (student, teacher) vectors, (G, B, D) each, one
  row per discriminator,
- `game`: how the adversarial part is played (pipeline.discriminators describes the three ways).

Each method's options are one dataclass, built from its sub-dict of the `distill` params section.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import UserError, build, check, check_choice
from pipeline.losses import SIMILARITIES, cross_entropy_grad, kd_loss, similarity, similarity_grad, soft_cross_entropy, soften
from pipeline.models import NUM_BLOCKS
from pipeline.schedules import SCHEDULES

METHODS = ("meal", "meal_v2", "anc", "kd", "scratch")
GAMES = ("alternating", "reversal", "cooperative", "none")


# ---------------------------------------------------------------- configs


@dataclass
class StudentConfig:
    arch: str = "student_cnn"  # a name from pipeline.models.ZOO
    model: dict[str, Any] = field(default_factory=lambda: {"width": 1.0, "dropout": 0.0})  # constructor kwargs


@dataclass
class DistillConfig:
    method: str = "meal"  # meal | meal_v2 | anc | kd | scratch (--method overrides)
    teachers: list[str] = field(default_factory=list)  # teachers to distill from; [] = every entry of `teachers`
    epochs: int = 20  # passes over the training split; epoch e shows view e mod V
    batch_size: int = 128  # images per optimizer step
    lr: float = 0.1  # peak student learning rate (SGD)
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float = 5e-4  # L2 penalty on conv/linear weights (not on BatchNorm/bias)
    schedule: str = "cosine"  # cosine | onecycle | constant (pipeline.schedules), per optimizer step
    warmup_epochs: float = 0.0  # linear warm-up length (epochs)
    seed: int = 0  # seeds the student's weights, batch order, teacher draws and dropout
    eval_batch_size: int = 1024  # images per forward pass at test time
    eval_every: int = 1  # evaluate on the test split every this many epochs (and always after the last)
    log_every: int = 25  # steps between progress-bar updates (the only host syncs of the step loop)
    compile: bool = False  # torch.compile the student with its blocks' alignment, and the objective (CUDA: its
    # ~100 small ops fuse into a few kernels; seconds to minutes to start; on this CPU it did not pay)
    meal: dict[str, Any] = field(default_factory=dict)  # MealConfig options
    meal_v2: dict[str, Any] = field(default_factory=dict)  # MealV2Config options
    anc: dict[str, Any] = field(default_factory=dict)  # AncConfig options
    kd: dict[str, Any] = field(default_factory=dict)  # KdConfig options
    scratch: dict[str, Any] = field(default_factory=dict)  # ScratchConfig options
    # Named runs (pipeline.runs): run name -> {method: NAME, overrides deep-merged into this section};
    # `stages.distill --run NAME` trains one, dvc.yaml has a distill@NAME stage per run.
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice(self.method, METHODS, "distill.method")
        check(self.epochs >= 1, f"distill.epochs = {self.epochs} must be at least 1")
        check(self.batch_size >= 1, f"distill.batch_size = {self.batch_size} must be at least 1")
        check(self.lr > 0, f"distill.lr = {self.lr} must be positive")
        check(0 <= self.momentum < 1, f"distill.momentum = {self.momentum} must be in [0, 1)")
        check(self.weight_decay >= 0, f"distill.weight_decay = {self.weight_decay} must be >= 0")
        check_choice(self.schedule, SCHEDULES, "distill.schedule")
        check(0 <= self.warmup_epochs <= self.epochs, f"distill.warmup_epochs = {self.warmup_epochs} must be in [0, epochs]")
        check(0 <= self.seed < 2**31, f"distill.seed = {self.seed} must be in [0, 2^31)")
        check(self.eval_batch_size >= 1, f"distill.eval_batch_size = {self.eval_batch_size} must be at least 1")
        check(self.eval_every >= 1, f"distill.eval_every = {self.eval_every} must be at least 1")
        check(self.log_every >= 1, f"distill.log_every = {self.log_every} must be at least 1")
        check(len(set(self.teachers)) == len(self.teachers), f"distill.teachers = {self.teachers} lists a teacher twice")


@dataclass
class GameConfig:
    """The adversarial options every method with discriminators shares."""

    adversarial: str = "alternating"  # alternating | reversal | cooperative (official MEAL code) | none
    adv_weight: float = 0.1  # weight of the student's adversarial term
    d_lr: float = 1e-3  # discriminator learning rate (constant)
    d_optimizer: str = "adam"  # adam (betas 0.5, 0.999) | sgd (momentum 0.9); cooperative: D joins the student's SGD
    d_weight_decay: float = 0.0  # L2 penalty on discriminator weights

    def _check_game(self, where: str) -> None:
        check_choice(self.adversarial, GAMES, f"{where}.adversarial")
        check(self.adv_weight >= 0, f"{where}.adv_weight = {self.adv_weight} must be >= 0")
        check(self.d_lr > 0, f"{where}.d_lr = {self.d_lr} must be positive")
        check_choice(self.d_optimizer, ("adam", "sgd"), f"{where}.d_optimizer")
        check(self.d_weight_decay >= 0, f"{where}.d_weight_decay = {self.d_weight_decay} must be >= 0")


@dataclass
class MealConfig(GameConfig):
    similarity: str = "l2"  # l1 | l2 | kl, on each aligned block (official code: l2)
    logit_similarity: str = "l2"  # l1 | l2 | kl, on the logits (kl: against the teacher's softmax at T)
    temperature: float = 1.0  # softmax temperature of the kl similarity
    logit_weight: float = 1.0  # weight of the similarity on the logits
    block_weights: list[float] = field(default_factory=lambda: [1.0] * NUM_BLOCKS)  # similarity weight per block
    ce_weight: float = 0.0  # weight of hard-label cross-entropy (MEAL uses none)

    def __post_init__(self) -> None:
        self._check_game("distill.meal")
        check_choice(self.similarity, SIMILARITIES, "distill.meal.similarity")
        check_choice(self.logit_similarity, SIMILARITIES, "distill.meal.logit_similarity")
        check(self.temperature > 0, f"distill.meal.temperature = {self.temperature} must be positive")
        check(self.logit_weight >= 0, f"distill.meal.logit_weight = {self.logit_weight} must be >= 0")
        check(len(self.block_weights) == NUM_BLOCKS and all(w >= 0 for w in self.block_weights),
              f"distill.meal.block_weights = {self.block_weights} must be {NUM_BLOCKS} weights >= 0, one per block")
        check(self.ce_weight >= 0, f"distill.meal.ce_weight = {self.ce_weight} must be >= 0")


@dataclass
class MealV2Config(GameConfig):
    temperature: float = 1.0  # softmax temperature of the teachers' mean and the student's soft cross-entropy
    d_input: str = "probs"  # probs | logits: what the discriminator on the final outputs sees

    def __post_init__(self) -> None:
        self._check_game("distill.meal_v2")
        check(self.temperature > 0, f"distill.meal_v2.temperature = {self.temperature} must be positive")
        check_choice(self.d_input, ("probs", "logits"), "distill.meal_v2.d_input")


@dataclass
class AncConfig(GameConfig):
    teacher: str = "random"  # random (one per step, as MEAL) | mean (of the teachers' outputs) | a teacher's name
    logit_weight: float = 1.0  # lambda: weight of the L2 between student and teacher logits
    adv_sample_rate: float = 0.1  # fraction of each batch's student vectors shown to D labelled "teacher"
    adv_weight: float = 1.0  # ANC's objective is L_adv + lambda L_data: the adversarial term at full weight
    dropout: float = 0.1  # ANC's noise z: dropout before the student's classifier (replaces student.model.dropout)

    def __post_init__(self) -> None:
        self._check_game("distill.anc")
        check(0 <= self.dropout < 1, f"distill.anc.dropout = {self.dropout} must be in [0, 1)")
        check(self.logit_weight >= 0, f"distill.anc.logit_weight = {self.logit_weight} must be >= 0")
        check(0 <= self.adv_sample_rate < 1, f"distill.anc.adv_sample_rate = {self.adv_sample_rate} must be in [0, 1)")


@dataclass
class KdConfig:
    teacher: str = "mean"  # mean (of the teachers' softened outputs) | a teacher's name
    temperature: float = 4.0  # T
    alpha: float = 0.9  # weight of the soft part; 1 - alpha goes to cross-entropy with the labels

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"distill.kd.temperature = {self.temperature} must be positive")
        check(0 <= self.alpha <= 1, f"distill.kd.alpha = {self.alpha} must be in [0, 1]")


@dataclass
class ScratchConfig:
    label_smoothing: float = 0.0  # cross-entropy label smoothing (fraction)

    def __post_init__(self) -> None:
        check(0 <= self.label_smoothing < 1, f"distill.scratch.label_smoothing = {self.label_smoothing} must be in [0, 1)")


CONFIGS = {"meal": MealConfig, "meal_v2": MealV2Config, "anc": AncConfig, "kd": KdConfig, "scratch": ScratchConfig}


def method_configs(cfg: DistillConfig, teachers: list[str]) -> dict[str, Any]:
    """Every method's options built and checked (not only the chosen one's), teacher names included."""
    built = {name: build(cls, getattr(cfg, name), f"distill.{name}") for name, cls in CONFIGS.items()}
    for name, choices in (("anc", ("random", "mean")), ("kd", ("mean",))):
        teacher = built[name].teacher
        if teacher not in choices and teacher not in teachers:
            raise UserError(f"distill.{name}.teacher = {teacher!r} is not one of {', '.join(choices + tuple(teachers))}")
    return built


def distill_teachers(cfg: DistillConfig, listed: list[str]) -> list[str]:
    """The teachers to distill from: `distill.teachers`, or every teacher in the params' `teachers`."""
    unknown = [t for t in cfg.teachers if t not in listed]
    if unknown:
        raise UserError(f"distill.teachers names '{unknown[0]}', which is not under `teachers` in the params "
                        f"(known: {', '.join(listed) or 'none'})")
    chosen = list(cfg.teachers) or list(listed)
    if cfg.method != "scratch" and not chosen:
        raise UserError(f"distill.method {cfg.method} needs teachers: list some under `teachers` in the params")
    return chosen


# ---------------------------------------------------------------- plans


@dataclass
class StudentOut:
    logits: torch.Tensor  # (B, C)
    blocks: torch.Tensor | None  # (G, B, L) aligned vectors of the plan's feature_blocks, in that order


@dataclass
class Targets:
    logits: torch.Tensor  # (k, B, C) float32: the picked teachers' logits (through fp16)
    blocks: torch.Tensor | None  # (k, G, B, L) float32 aligned vectors of the plan's feature_blocks


class Plan:
    """A method: what to read, what to minimise, what to discriminate. Subclasses fill in the parts."""

    name = ""
    feature_blocks: tuple[int, ...] = ()  # block indexes whose aligned vectors the method compares
    game: GameConfig | None = None  # None: no discriminators

    def __init__(self, cfg: Any, teachers: list[str], block_names: list[str]):
        self.cfg, self.teachers, self.block_names = cfg, teachers, block_names

    @property
    def adversarial(self) -> str:
        return "none" if self.game is None else self.game.adversarial

    def pick(self, rng: random.Random) -> list[int]:
        """Indexes (into self.teachers) of the teachers whose targets this step reads."""
        return list(range(len(self.teachers)))

    def losses(self, out: StudentOut, tgt: Targets | None, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # Plans that compare blocks also give their terms' gradients in closed form (`loss_grads`): the
    # training step then runs no autograd graph between the student's outputs and its loss (on the CPU
    # that graph's bookkeeping and backward cost more than the arithmetic; pipeline.distill.train_step).
    closed_form = False

    def loss_grads(self, out: StudentOut, tgt: Targets, labels: torch.Tensor
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """(`losses(out, tgt, labels)` detached, their sum's gradient with respect to out.logits (B, C) and
        to out.blocks (G, B, L) (None without blocks)), without autograd. Only where `closed_form`."""
        raise NotImplementedError

    def discriminators(self, num_classes: int, dim: int) -> dict[str, int]:
        """Discriminator name -> input size; empty when the method plays no adversarial game."""
        return {}

    def disc_inputs(self, out: StudentOut, tgt: Targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(student vectors (G, B, D), teacher vectors (G, B, D)), one row per discriminator in the order
        `discriminators` names them."""
        raise NotImplementedError

    def adversarial_rows(self, batch: int) -> int:
        return 0


def _picked_index(cfg_teacher: str, teachers: list[str]) -> int | None:
    return teachers.index(cfg_teacher) if cfg_teacher in teachers else None


class MealPlan(Plan):
    """MEAL: one teacher drawn per step; similarity on logits and every block; one D per block."""

    name = "meal"

    def __init__(self, cfg: MealConfig, teachers, block_names):
        super().__init__(cfg, teachers, block_names)
        self.game = cfg if cfg.adversarial != "none" else None
        # every block has a discriminator in the game; without one, only the blocks with a similarity
        # weight are aligned, gathered from the cache and compared
        self.feature_blocks = tuple(b for b in range(NUM_BLOCKS) if self.game is not None or cfg.block_weights[b] > 0)
        self._weights: dict[torch.device, torch.Tensor] = {}  # the block weights (G,) per device

    def pick(self, rng):
        return [rng.randrange(len(self.teachers))]

    def _add_block_terms(self, terms: dict[str, torch.Tensor], sims: torch.Tensor) -> torch.Tensor | None:
        """The blocks' similarities (G,) weighted, each block of weight > 0 added to `terms` as sim_<block>;
        returns the weights (G,), or None when every weight is 1 (no product needed)."""
        c = self.cfg
        weights = None
        if any(c.block_weights[b] != 1.0 for b in self.feature_blocks):
            # made once per device: a tensor built from a list on every step is a host-to-device copy,
            # which waits for the GPU's queue to drain
            weights = self._weights.get(sims.device)
            if weights is None:
                weights = self._weights[sims.device] = sims.new_tensor([c.block_weights[b] for b in self.feature_blocks])
            sims = sims * weights
        for b, value in zip(self.feature_blocks, sims.unbind()):
            if c.block_weights[b] > 0:
                terms[f"sim_{self.block_names[b]}"] = value
        return weights

    def losses(self, out, tgt, labels):
        c = self.cfg
        terms = {"sim_logits": c.logit_weight * similarity(out.logits, tgt.logits[0], c.logit_similarity, c.temperature)}
        if self.feature_blocks:  # every block at once: (G,) similarities, weighted
            self._add_block_terms(terms, similarity(out.blocks, tgt.blocks[0], c.similarity, c.temperature, groups=True))
        if c.ce_weight > 0:
            terms["ce"] = c.ce_weight * F.cross_entropy(out.logits.float(), labels)
        return terms

    closed_form = True

    def loss_grads(self, out, tgt, labels):
        c = self.cfg
        value, g_logits = similarity_grad(out.logits, tgt.logits[0], c.logit_similarity, c.temperature)
        terms = {"sim_logits": value}
        if c.logit_weight != 1.0:
            terms["sim_logits"], g_logits = c.logit_weight * value, g_logits.mul_(c.logit_weight)
        g_blocks = None
        if self.feature_blocks:
            sims, g_blocks = similarity_grad(out.blocks, tgt.blocks[0], c.similarity, c.temperature, groups=True)  # (G,), (G, B, L)
            weights = self._add_block_terms(terms, sims)
            if weights is not None:
                g_blocks.mul_(weights[:, None, None])
        if c.ce_weight > 0:
            value, g_ce = cross_entropy_grad(out.logits, labels)
            terms["ce"] = c.ce_weight * value
            g_logits.add_(g_ce, alpha=c.ce_weight)
        return terms, g_logits, g_blocks

    def discriminators(self, num_classes, dim):
        return {} if self.game is None else {self.block_names[b]: dim for b in self.feature_blocks}

    def disc_inputs(self, out, tgt):
        return out.blocks, tgt.blocks[0]


class MealV2Plan(Plan):
    """MEAL V2: soft cross-entropy to the mean of the teachers' softmax, no labels; one D on the outputs."""

    name = "meal_v2"

    def __init__(self, cfg: MealV2Config, teachers, block_names):
        super().__init__(cfg, teachers, block_names)
        self.game = cfg if cfg.adversarial != "none" else None

    def _target(self, tgt: Targets) -> torch.Tensor:
        return soften(tgt.logits, self.cfg.temperature).mean(0)  # (B, C)

    def losses(self, out, tgt, labels):
        t = self.cfg.temperature
        return {"soft_ce": soft_cross_entropy(out.logits.float() / t, self._target(tgt)) * t**2}

    def discriminators(self, num_classes, dim):
        return {} if self.game is None else {"outputs": num_classes}

    def disc_inputs(self, out, tgt):
        if self.cfg.d_input == "logits":
            return out.logits.float()[None], tgt.logits.mean(0)[None]
        return soften(out.logits, self.cfg.temperature)[None], self._target(tgt)[None]


class AncPlan(Plan):
    """Adversarial Network Compression: lambda * L2 on logits + the game on the last block's features."""

    name = "anc"
    feature_blocks = (NUM_BLOCKS - 1,)

    def __init__(self, cfg: AncConfig, teachers, block_names):
        super().__init__(cfg, teachers, block_names)
        self.game = cfg if cfg.adversarial != "none" else None
        self.fixed = _picked_index(cfg.teacher, teachers)

    def pick(self, rng):
        if self.cfg.teacher == "random":
            return [rng.randrange(len(self.teachers))]
        return [self.fixed] if self.fixed is not None else super().pick(rng)

    def losses(self, out, tgt, labels):
        # the mean over the picked teachers is the teacher itself when one was picked
        return {"l2_logits": self.cfg.logit_weight * similarity(out.logits, tgt.logits.mean(0), "l2")}

    closed_form = True

    def loss_grads(self, out, tgt, labels):
        value, g_logits = similarity_grad(out.logits, tgt.logits.mean(0), "l2")
        w = self.cfg.logit_weight
        return {"l2_logits": w * value}, g_logits.mul_(w), torch.zeros_like(out.blocks)  # the blocks: the game's only

    def discriminators(self, num_classes, dim):
        return {} if self.game is None else {self.block_names[-1]: dim}

    def disc_inputs(self, out, tgt):
        return out.blocks, tgt.blocks.mean(0)  # (1, B, L) each: the last block

    def adversarial_rows(self, batch):
        return int(round(self.cfg.adv_sample_rate * batch))


class KdPlan(Plan):
    """Hinton KD against one named teacher or the mean of the teachers' softened outputs."""

    name = "kd"

    def __init__(self, cfg: KdConfig, teachers, block_names):
        super().__init__(cfg, teachers, block_names)
        self.fixed = _picked_index(cfg.teacher, teachers)

    def pick(self, rng):
        return [self.fixed] if self.fixed is not None else super().pick(rng)

    def losses(self, out, tgt, labels):
        c = self.cfg
        probs = soften(tgt.logits, c.temperature).mean(0)  # (B, C)
        _, soft, hard = kd_loss(out.logits, probs, labels, c.temperature, c.alpha)
        return {"kd_soft": c.alpha * soft, "ce": (1.0 - c.alpha) * hard}


class ScratchPlan(Plan):
    """The baseline: cross-entropy with the labels on the same views and schedule, no teacher."""

    name = "scratch"

    def pick(self, rng):
        return []

    def losses(self, out, tgt, labels):
        return {"ce": F.cross_entropy(out.logits.float(), labels, label_smoothing=self.cfg.label_smoothing)}


PLANS = {"meal": MealPlan, "meal_v2": MealV2Plan, "anc": AncPlan, "kd": KdPlan, "scratch": ScratchPlan}


def make_plan(method: str, cfg: Any, teachers: list[str], block_names: list[str] | None = None) -> Plan:
    check_choice(method, METHODS, "distill.method")
    names = list(block_names or [f"block{i + 1}" for i in range(NUM_BLOCKS)])
    check(len(names) == NUM_BLOCKS, f"the caches name {len(names)} blocks, the models return {NUM_BLOCKS}")
    return PLANS[method](cfg, teachers if method != "scratch" else [], names)
