"""The one student training loop: every method (pipeline.methods) is trained through it.

    distill()            the epoch loop, top to bottom: slab for view e mod V, train, evaluate, checkpoint
    train_one_epoch()    one pass over the training split in a seeded order, on view e mod V
    epoch_steps()        that pass as a generator of steps (the benchmark steps several trainers in lock-step)
    train_step()         the student's forward, the method's terms, the game's terms, backward, steps
    evaluate()           test accuracy of the student (pipeline.training.evaluate)
    open_sources()       where a run's targets come from: the caches' slabs, the teachers live, or none

Under torchrun (pipeline.dist) each rank trains its shard of every global batch, weighted so that the
averaged gradients are the global batch's; rank 0 alone evaluates and saves.

The step never syncs with the host: losses and discriminator accuracies are summed on the device and
read once per `log_every` steps (progress bar) and once per epoch (metrics). Randomness is a function
of (seed, epoch) only (batch order, teacher draws, dropout), so a resumed run repeats the epochs it
did not finish exactly as an uninterrupted one would, and cached and online runs see the same batches.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline import paths, training
from pipeline.align import AlignConfig, align
from pipeline.align import mean as plain_mean
from pipeline.augment import AugmentConfig, normalize
from pipeline.data import step_views
from pipeline.cache import (CacheConfig, CachedTargets, CacheSlabs, EpochReads, FkdTargets, NoTargets, OnlineTargets,
                            SlabLoader, open_cache, validate_caches)
from pipeline.checkpoints import check_fits_data, load_checkpoint, sha256_file
from pipeline.models import load_teacher
from pipeline.models.external import load_weights
from pipeline.config import UserError, build, check, check_choice
from pipeline.device import autocast, memory_format, mean_keep_layout
from pipeline.dist import World, all_reduce_sum, barrier, epoch_rows, shard, shard_weight, sync_batchnorm, wrap_ddp
from pipeline.methods.discriminators import Discriminators
from pipeline.methods import METHODS, Method, StudentOut, Targets, load_plugins
from pipeline.methods.games import Game, make_game
from pipeline.mix import MixPlan, mixed_labels
from pipeline.optim import SGDConfig, make_sgd, param_groups, set_lr, sgd_lr
from pipeline.training import LOG_EVERY, epoch_order, images_per_s, log_due
from pipeline.models.cifar import set_pooling


@dataclass
class StudentConfig:
    arch: str = "student_cnn"  # a name from pipeline.models.ZOO
    model: dict[str, Any] = field(default_factory=lambda: {"width": 1.0, "dropout": 0.0})  # constructor kwargs
    init: str = ""  # weights to start from (MEAL V2 fine-tunes a pretrained student): a state dict or .safetensors
    # file made elsewhere (e.g. torchvision's pretrained ResNet-50), or a student's
    # data/student/RUN/seed{seed}.pt ("{seed}" becomes the seed trained) or a teacher's
    # data/teachers/NAME.pt of this arch and kwargs; "" = random init


@dataclass
class DistillConfig(SGDConfig):
    method: str = "meal"  # a registered method: meal | meal_v2 | anc | kd | scratch, or a plugin's (--method overrides)
    teachers: list[str] = field(default_factory=list)  # teachers to distill from; [] = every entry of `teachers`
    epochs: int = 20  # passes over the training split; epoch e shows view e mod V
    batch_size: int = 128  # images per optimizer step
    shuffle: str = "full"  # the epoch's order. full: a uniform permutation, each epoch's teacher slab read whole into
    # memory; chunks: the caches' chunks in a new order, samples shuffled within windows of `shuffle_window` chunks,
    # the targets read window by window (memory flat in the number of samples; for data larger than memory)
    shuffle_window: int = 8  # chunks (cache.chunk_rows samples each) per shuffling window, under shuffle: chunks
    mix_targets: str = "exact"  # a mixing plan's teacher targets (views.mix). exact: the teachers' outputs on the
    # mixed image (the caches); fkd: FKD's approximation, the two samples' soft labels on their unmixed views mixed
    # by lambda (caches of `cache_teachers --unmixed`), for comparison
    lr: float = 0.1  # peak student learning rate (SGD)
    nesterov: bool = False  # Nesterov momentum
    schedule: str = "cosine"  # cosine | onecycle | constant | step (pipeline.optim), per optimizer step
    warmup_epochs: float = 0.0  # linear warm-up length (epochs)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # the run is trained once per seed, one
    # checkpoint each (data/student/RUN/seedS.pt); evaluate reports the mean and spread over them
    jobs: int = 0  # seeds trained at once, one process each; 0 = every seed at once on the CPU (threads
    # split between them), one at a time on a GPU; 1 = one after another in this process
    seed: int = 0  # the seed one training process runs (the stage sets it from `seeds`): it seeds the
    # student's weights, batch order, teacher draws and dropout. In params, list seeds under `seeds`.
    eval_batch_size: int = 1024  # images per forward pass at test time
    eval_every: int = 1  # evaluate on the test split every this many epochs (and always after the last)
    log_every: int = LOG_EVERY  # steps between progress-bar updates (the only host syncs of the step loop)
    compile: bool = False  # torch.compile the student with its blocks' alignment, and the method's terms
    plugins: list[str] = field(default_factory=list)  # modules registering methods of your own: dotted names or
    # .py paths (pipeline.methods.load_plugins); their options go under distill.<name> like the built-in ones'
    # Named runs (pipeline.runs): run name -> {method: NAME, overrides deep-merged into this section};
    # `stages.distill --run NAME` trains one, dvc.yaml has a distill@NAME stage per run.
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # method name -> its options: what `build` gathers from the keys named after registered methods
    # (distill.meal, distill.kd, ...; pipeline.methods.REGISTRY); each is built into the method's Config
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def gather(cls, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """`build`'s hook for the open-ended keys: the plugins are loaded first, then every key named after a
        registered method moves into `method_options`. Returns the values and the method names (for messages)."""
        plugins = values.get("plugins") or []
        if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
            load_plugins(plugins)
        options = {k: values.pop(k) for k in list(values) if k in METHODS}
        for name, value in options.items():
            if not isinstance(value, dict):
                raise UserError(f"params distill.{name} must be a mapping of {name}'s options, got {value!r}")
        return {**values, "method_options": {**values.get("method_options", {}), **options}}, list(METHODS)

    def __post_init__(self) -> None:
        check_choice(self.method, METHODS, "distill.method")
        check(self.epochs >= 1, f"distill.epochs = {self.epochs} must be at least 1")
        check(self.batch_size >= 1, f"distill.batch_size = {self.batch_size} must be at least 1")
        check_choice(self.shuffle, ("full", "chunks"), "distill.shuffle")
        check(self.shuffle_window >= 1, f"distill.shuffle_window = {self.shuffle_window} must be at least 1 chunk")
        check_choice(self.mix_targets, ("exact", "fkd"), "distill.mix_targets")
        check(self.mix_targets == "exact" or self.shuffle == "full",
              "distill.mix_targets: fkd reads a sample's partner, anywhere in the view: it needs distill.shuffle: full")
        self.check_sgd("distill", self.epochs)
        check(0 <= self.seed < 2**31, f"distill.seed = {self.seed} must be in [0, 2^31)")
        check(len(self.seeds) >= 1 and all(isinstance(v, int) and 0 <= v < 2**31 for v in self.seeds),
              f"distill.seeds = {self.seeds} must be a non-empty list of integers in [0, 2^31)")
        check(len(set(self.seeds)) == len(self.seeds), f"distill.seeds = {self.seeds} lists a seed twice")
        check(self.jobs >= 0, f"distill.jobs = {self.jobs} must be >= 0 (0 = every seed at once on the CPU)")
        check(self.eval_batch_size >= 1, f"distill.eval_batch_size = {self.eval_batch_size} must be at least 1")
        check(self.eval_every >= 1, f"distill.eval_every = {self.eval_every} must be at least 1")
        check(self.log_every >= 1, f"distill.log_every = {self.log_every} must be at least 1")
        check(len(set(self.teachers)) == len(self.teachers), f"distill.teachers = {self.teachers} lists a teacher twice")


@dataclass
class TrainSet:
    """The training split, with the view plan that says what every epoch shows."""

    images: torch.Tensor | None  # (N, C, H, W) uint8 on the device; None: `files` decoded batch by batch
    labels: torch.Tensor  # (N,) int64 on the device
    aug: np.ndarray  # (N, V, P) int16 view parameters (pipeline.views)
    augment: AugmentConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    files: Any = None  # the FileData the images come from (pipeline.data.files), where they are not resident
    chunk_rows: int = 0  # R, samples per teacher-cache chunk: what distill.shuffle: chunks keeps together
    mix: MixPlan | None = None  # the plan's mixing (N, V, ...) numpy (pipeline.mix); None: plain views
    num_classes: int = 0  # C, for the mixed labels' probability targets

    @property
    def num_views(self) -> int:
        return int(self.aug.shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class StudentVectors(nn.Module):
    """The student with the alignment of the method's blocks folded in: x -> (logits (B, C), vectors
    [(B, L_g) per block], or None without blocks). Compiled as one, the alignment's forward and backward
    fuse with the student's."""

    def __init__(self, student: nn.Module, blocks: tuple[int, ...], align_cfg: AlignConfig, mean=plain_mean):
        super().__init__()
        self.student, self.blocks, self.align_cfg, self.mean = student, tuple(blocks), align_cfg, mean

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        logits, feats = self.student(x)
        if not self.blocks:
            return logits, None
        lengths = self.align_cfg.lengths(len(feats))
        return logits, [align(feats[b], self.align_cfg, self.mean, lengths[b]) for b in self.blocks]


def method_terms(method: Method, logits: torch.Tensor, blocks: list[torch.Tensor] | None,
                 tgt_logits: torch.Tensor | None, tgt_blocks: list[torch.Tensor] | None,
                 labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`method.losses` on plain tensors, so that torch.compile traces it as one region."""
    tgt = Targets(tgt_logits, tgt_blocks) if tgt_logits is not None else None
    return method.losses(StudentOut(logits, blocks), tgt, labels)


@dataclass
class Trainer:
    """Everything a step touches: the method, its game, the models, their optimizers."""

    method: Method
    cfg: DistillConfig
    student: nn.Module
    discs: Discriminators | None  # one per name the method gives (None without a game)
    game: Game | None  # plays the adversarial part (pipeline.methods.games); None without discriminators
    opt: torch.optim.Optimizer  # the student's SGD (and, in `cooperative`, the discriminators too)
    device: torch.device
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor] | None]]  # StudentVectors, maybe compiled
    terms: Callable[..., dict[str, torch.Tensor]]  # method_terms for this method, maybe compiled
    world: World = field(default_factory=World)  # this rank's place in a torchrun job (World(): one process)

    @property
    def d_opt(self) -> torch.optim.Optimizer | None:
        """The discriminators' own optimizer (alternating, reversal), or None."""
        return self.game.opt if self.game is not None else None


def build_trainer(method: Method, cfg: DistillConfig, student: nn.Module, num_classes: int, align_cfg: AlignConfig,
                  device: torch.device, world: World = World(), sync_bn: bool = False) -> Trainer:
    """Discriminators for the method, its game and the optimizers, on `device` (seed torch before calling).
    Under torchrun the student trains in DDP (its BatchNorms over the global batch with `sync_bn`) and the
    game averages the discriminators' gradients over the ranks."""
    if sync_bn:
        student = sync_batchnorm(student, world, device)
    student.to(device=device, memory_format=memory_format(device))
    dims = method.discriminators(num_classes, align_cfg.lengths(len(method.block_names)))  # name -> input size
    discs = Discriminators(dims, method.game.discriminator, method.game.d_reduction).to(device) if dims else None
    game = make_game(method.game, discs, method.disc_weights(), world) if discs is not None else None
    groups = param_groups(student, cfg.weight_decay, cfg.decay_all) + (game.student_groups(cfg.lr) if game else [])
    opt = make_sgd(groups, cfg)
    # The one speed choice of the step: the layout-keeping mean for an eager student (docs/design.md
    # section 5); compiled, the plain mean, which the compiler fuses and lays out itself.
    mean = plain_mean if cfg.compile else mean_keep_layout
    set_pooling(student, mean)
    forward = StudentVectors(wrap_ddp(student, world, device), method.feature_blocks, align_cfg, mean)
    terms = partial(method_terms, method)
    if cfg.compile:
        forward, terms = torch.compile(forward), torch.compile(terms)
    return Trainer(method, cfg, student, discs, game, opt, device, forward, terms, world)


# ---------------------------------------------------------------- one step


def train_step(tr: Trainer, x: torch.Tensor, y: torch.Tensor, tgt: Targets | None,
               weight: float = 1.0) -> tuple[list[str], torch.Tensor]:
    """One optimizer step of the student (and of the discriminators). Returns the stats' names and their
    values (S,) float32 on the device (no host sync): the loss, its terms, the batch accuracy and, with a
    game, each discriminator's loss, accuracy and adversarial term. `weight`: this rank's shard weight
    (pipeline.dist.shard_weight; 1 with one process), on what is differentiated, not on the stats."""
    method, game = tr.method, tr.game
    with autocast(tr.device):
        logits, vectors = tr.forward(x)  # (B, C), [(B, L_g)] aligned vectors or None
        terms = tr.terms(logits, vectors, *((tgt.logits, tgt.blocks) if tgt is not None else (None, None)), y)
        if game is not None:
            s, t = method.disc_inputs(StudentOut(logits, vectors), tgt)  # (B, D_g) per D: student, teacher
    objective = sum(terms.values())
    if game is not None:  # outside autocast: D's arithmetic is tiny, float32 throughout
        s, t = [v.float() for v in s], [v.float() for v in t]
        played = game.play(s, t, method.adversarial_rows(len(y)), weight)  # D's own turn, where it has one
        terms["adv"] = played.adv.sum()
        objective = objective + played.objective
    tr.opt.zero_grad(set_to_none=True)
    (objective * weight if weight != 1.0 else objective).backward()  # DDP averages the student's gradients
    if game is not None:
        game.after_backward()  # the discriminators' gradients, averaged where the student's step uses them
    tr.opt.step()
    if game is not None:
        game.step()

    # the stats as one vector, built with a few ops (one op per stat would cost more than the stats' worth)
    values = torch.stack(list(terms.values())).detach()  # (T,) float32, "adv" last where there is a game
    own = [k for k in terms if k != "adv"]
    names = ["loss", *own, "train_acc"]
    hard = y if y.dim() == 1 else y.argmax(1)  # mixed labels: accuracy against the heavier of the two
    parts = [values.sum().view(1), values[:len(own)], (logits.detach().argmax(1) == hard).float().mean().view(1)]
    if game is not None:  # per discriminator: its loss, its accuracy and the student's term against it
        names += [f"{key}_{name}" for key in ("d_loss", "d_acc", "adv") for name in tr.discs.names]
        parts += [played.d_loss, played.d_acc, played.adv.detach()]
    return names, torch.cat(parts)


# ---------------------------------------------------------------- one epoch


def steps_per_epoch(n: int, cfg: DistillConfig) -> int:
    return math.ceil(n / cfg.batch_size)


def epoch_steps(tr: Trainer, epoch: int, data: TrainSet, targets) -> Iterator[tuple[list[str], torch.Tensor, int]]:
    """The steps of one pass over the training split showing view `epoch mod V`, one per iteration.

    Yields (stat names, their batch-weighted values (S,) on the device, batch size) after each step.
    `targets(idx, x, picked) -> Targets` is a pipeline.cache.slabs target source whose `start_epoch` has
    been given this epoch's reads (epoch_reads). A generator, so that train_one_epoch and the throughput
    benchmark (which steps several trainers in lock-step) run the very same step loop.
    """
    cfg, dev, method = tr.cfg, tr.device, tr.method
    tr.student.train()
    n, steps = len(data), steps_per_epoch(len(data), cfg)
    view = epoch % data.num_views
    order = order_of(cfg, epoch, data).to(dev)  # (N,)
    rng = random.Random(cfg.seed * 1_000_003 + epoch)  # the teacher draws (MEAL: one teacher per step)
    torch.manual_seed(cfg.seed * 10_007 + epoch)  # dropout masks: the same after a resume
    params = torch.from_numpy(np.ascontiguousarray(data.aug[:, view])).to(dev)  # (N, P)
    mix = data.mix.take(slice(None), view) if data.mix is not None else None  # (N, ...) the view's pairs
    pairs = mix.to(dev) if mix is not None else None
    fmt = memory_format(dev)
    shares = [shard(order[i * cfg.batch_size:(i + 1) * cfg.batch_size], tr.world) for i in range(steps)]
    batches = step_views(data.files, data.images, shares, params, data.augment, dev, mix)  # (b, C, H, W) uint8 each
    for i in range(steps):
        targets.at_step(i)  # a new part of the epoch: its targets in place, the next part's read ahead
        set_lr(tr.opt, sgd_lr(cfg, epoch * steps + i, steps, cfg.epochs))
        idx = shares[i]  # (b,) this rank's share of the global batch (all of it with one process)
        x = normalize(next(batches), data.mean, data.std)
        x = x.contiguous(memory_format=fmt)  # (B, C, H, W) float32, the view the teachers saw
        y = data.labels[idx] if pairs is None else mixed_labels(data.labels, idx, pairs.take(idx), data.num_classes)
        picked = method.pick(rng)
        tgt = targets(idx, x, picked) if picked else None
        names, values = train_step(tr, x, y, tgt, shard_weight(len(idx), min(cfg.batch_size, n - i * cfg.batch_size),
                                                               tr.world))
        b = len(idx)
        yield names, values * b, b


def train_one_epoch(tr: Trainer, epoch: int, data: TrainSet, targets, progress: bool = True) -> dict[str, float]:
    """One pass over the training split showing view `epoch mod V` (epoch_steps); mean losses and D accuracies."""
    steps = steps_per_epoch(len(data), tr.cfg)
    keys: list[str] = []
    sums: torch.Tensor | None = None  # (S,) batch-weighted sums of the step's stats, on the device
    seen = 0
    bar = tqdm(total=steps, desc=f"{tr.method.name} epoch {epoch + 1}/{tr.cfg.epochs}", leave=False,
               disable=not progress)
    for i, (keys, row, b) in enumerate(epoch_steps(tr, epoch, data, targets)):
        sums = row if sums is None else sums + row  # a method reports the same stats every step
        seen += b
        bar.update(1)
        if progress and log_due(i, steps, tr.cfg.log_every):
            bar.set_postfix(_short(_means(keys, sums, seen)), refresh=False)  # the one host sync per interval
    bar.close()
    if tr.world.distributed and sums is not None:  # the epoch's stats over every rank's rows
        total = all_reduce_sum(torch.cat([sums, sums.new_tensor([seen])]), tr.world)
        sums, seen = total[:-1], int(total[-1].item())
    return _means(keys, sums, seen)


def _means(keys: list[str], sums: torch.Tensor | None, count: int) -> dict[str, float]:
    if sums is None:
        return {}
    return {k: v / count for k, v in zip(keys, sums.tolist())}  # one device -> host copy


def _short(stats: dict[str, float]) -> dict[str, str]:
    """Progress-bar fields: the loss and its terms, and each discriminator's accuracy (D losses omitted)."""
    keep = {k: v for k, v in stats.items() if not k.startswith("d_loss_") and k != "train_acc"}
    return {k.replace("d_acc_", "acc_D_"): f"{v:.3f}" for k, v in keep.items()}


# ---------------------------------------------------------------- evaluation and the epoch loop


def evaluate(tr: Trainer, data, batch_size: int | None = None) -> dict[str, float]:
    """Accuracy (fraction), NLL and sample count of the student on `data` (an ImageData), no augmentation."""
    return training.evaluate(tr.student, data, tr.device, batch_size or tr.cfg.eval_batch_size)


def state_dict(tr: Trainer) -> dict[str, Any]:
    """The trainable state for a checkpoint (on the CPU)."""
    cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
    return {
        "student": cpu(tr.student.state_dict()),
        "discriminators": cpu(tr.discs.state_dict()) if tr.discs is not None else {},
        "optimizer": tr.opt.state_dict(),
        "d_optimizer": tr.d_opt.state_dict() if tr.d_opt is not None else None,
    }


def load_state(tr: Trainer, state: dict[str, Any]) -> None:
    tr.student.load_state_dict(state["student"])
    try:
        if tr.discs is not None:
            tr.discs.load_state_dict(state["discriminators"])
        tr.opt.load_state_dict(state["optimizer"])
        if tr.d_opt is not None:
            tr.d_opt.load_state_dict(state["d_optimizer"])
    except (KeyError, RuntimeError, ValueError) as err:  # e.g. discriminators saved per layer by an older version
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]  # load_state_dict: a header, then the keys
        reason = " ".join(lines)[:160] or type(err).__name__
        raise UserError(f"the checkpoint's discriminator or optimizer state does not fit this version ({reason}): "
                        f"pass --restart to start over") from None


def distill(
    tr: Trainer,
    data: TrainSet,
    test,
    targets,
    state: dict[str, Any] | None,
    save: Callable[[dict[str, Any]], None],
    progress: bool = True,
) -> dict[str, Any]:
    """The epoch loop. `state`: a checkpoint to resume from (or None); `save(ckpt)` persists one.

    Epoch e trains on view e mod V: the slab of that view is loaded (already prefetched during the
    previous epoch) and the next epoch's slab is read in the background while this one trains; under
    torchrun, only the rows this rank trains. Rank 0 alone evaluates and saves; every rank returns the
    final checkpoint dict, complete on rank 0.
    """
    cfg, world = tr.cfg, tr.world
    progress = progress and world.main
    history: list[dict[str, Any]] = []
    start, best_acc, best_epoch, wall = 0, -1.0, 0, 0.0
    if state is not None:
        load_state(tr, state)
        start, history = state["epoch"], list(state["history"])
        best_acc, best_epoch, wall = state["best_acc"], state["best_epoch"], state["wall_time_s"]
    ckpt: dict[str, Any] = dict(state or {})
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        targets.start_epoch(epoch_reads(tr, epoch, data))
        stats = train_one_epoch(tr, epoch, data, targets, progress)
        train_time = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "view": epoch % data.num_views, **stats}
        if world.main and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            ev = evaluate(tr, test)
            row.update(test_acc=ev["accuracy"], test_nll=ev["nll"])
            if ev["accuracy"] > best_acc:
                best_acc, best_epoch = ev["accuracy"], epoch + 1
        elapsed = time.perf_counter() - t0
        wall += elapsed
        row.update(lr=tr.opt.param_groups[0]["lr"], epoch_time_s=elapsed, train_time_s=train_time,
                   images_per_s=images_per_s(len(data), train_time))
        history.append(row)
        if progress:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items()
                              if k in ("loss", "test_acc") or k.startswith("d_acc_"))
            tqdm.write(f"{tr.method.name} epoch {epoch + 1}/{cfg.epochs}  {shown}  {elapsed:.1f}s")
        ckpt.update(state_dict(tr), epoch=epoch + 1, finished=epoch + 1 == cfg.epochs, history=history,
                    best_acc=best_acc, best_epoch=best_epoch, test_acc=row.get("test_acc"), wall_time_s=wall)
        if world.main:
            save(ckpt)
        barrier(world)  # the epoch's checkpoint is on disk before any rank starts the next epoch
    return ckpt


def order_of(cfg: DistillConfig, epoch: int, data: TrainSet) -> torch.Tensor:
    """The epoch's sample order (N,) on the CPU, as `distill.shuffle` says (pipeline.training.epoch_order)."""
    if cfg.shuffle == "chunks":
        return epoch_order(cfg.seed, epoch, len(data), data.chunk_rows or len(data), cfg.shuffle_window)
    return epoch_order(cfg.seed, epoch, len(data))


def epoch_reads(tr: Trainer, epoch: int, data: TrainSet) -> EpochReads:
    """The teacher rows each part of `epoch` needs on this rank, and the next epoch's first part to read ahead.

    shuffle: full: one part, every sample (under torchrun the rows this rank trains). shuffle: chunks: a part per
    window's worth of steps (floor(window x R / batch) steps), each the sorted samples its steps train here.
    """
    cfg, n = tr.cfg, len(data)
    steps = steps_per_epoch(n, cfg)
    per = steps if cfg.shuffle == "full" else max(1, cfg.shuffle_window * (data.chunk_rows or n) // cfg.batch_size)
    whole = cfg.shuffle == "full" and (not tr.world.distributed or cfg.mix_targets == "fkd")  # fkd: any partner

    def parts(e: int) -> list[tuple[int, np.ndarray | None]]:
        if whole:
            return [(0, None)]
        order = order_of(cfg, e, data)
        return [(first, epoch_rows(order, cfg.batch_size, tr.world, first, min(steps, first + per)).numpy())
                for first in range(0, steps, per)]

    ahead = None
    if epoch + 1 < cfg.epochs:
        ahead = ((epoch + 1) % data.num_views, parts(epoch + 1)[0][1])
    return EpochReads(epoch % data.num_views, parts(epoch), ahead)


# ---------------------------------------------------------------- what a run starts from


def check_plan(plan, train) -> None:
    """The view plan must index this very training split, sample by sample."""
    if plan.dataset_fingerprint != train.fingerprint or plan.num_samples != len(train):
        raise UserError(f"view plan {plan.path} was made from other training data ({plan.num_samples} samples) "
                        f"than the `data` params give ({len(train)}): rerun python -m stages.plan_views, "
                        f"then the teacher caches")
    if not np.array_equal(plan.labels.astype(np.int64), train.labels.numpy()):
        raise UserError(f"view plan {plan.path} holds other labels than the training data: "
                        f"rerun python -m stages.plan_views")


@dataclass
class TargetSources:
    """Where a run's targets come from, opened and checked: the teachers' caches, the teachers themselves
    (online), or nothing (scratch). `targets(feature_blocks)` makes the step's target source."""

    align_cfg: AlignConfig  # the caches' align spec (online and scratch: the params')
    blocks: list[str] | None  # the caches' block names (None: the models' defaults)
    hashes: dict[str, Any]  # teacher name -> its checkpoint's sha256, for the run's identity
    caches: dict[str, Any] = field(default_factory=dict)  # teacher name -> TeacherCache
    models: list[nn.Module] = field(default_factory=list)  # the live teachers (online)
    autocast: bool = False  # online teachers under bf16 autocast on CUDA (cache.autocast)
    chunk_rows: int = 0  # R of the (first) cache, else the params' cache.chunk_rows: the unit shuffle: chunks moves
    fkd: MixPlan | None = None  # distill.mix_targets: fkd: the plan's mixing; the caches are its unmixed views'

    def targets(self, feature_blocks, device: torch.device, by_chunk: bool = False, temperature: float = 1.0):
        """`by_chunk` (shuffle: chunks): read the caches chunk by chunk, a part of the epoch at a time.
        `temperature`: the method's (FKD's approximation mixes soft labels at it)."""
        if self.caches:
            loader = SlabLoader(CacheSlabs(self.caches), feature_blocks, device, by_chunk)  # top-k stores: dense
            if self.fkd is not None:
                return FkdTargets(loader, self.fkd.to(device), temperature)
            return CachedTargets(loader)
        if self.models:
            return OnlineTargets(self.models, self.align_cfg, feature_blocks, device, self.autocast)
        return NoTargets()


def open_sources(teachers: list[str], online: bool, cache_cfg: CacheConfig, plan, train,
                 device: torch.device, mix_targets: str = "exact") -> TargetSources:
    """The run's target sources: every teacher's cache validated against the plan and the data, or with `online`
    every teacher loaded and checked against the data; nothing without teachers. `mix_targets: fkd`: the caches
    of the plan's unmixed views (paths.unmixed_teacher_cache), mixed step by step (FkdTargets)."""
    if not teachers:  # scratch
        return TargetSources(cache_cfg.align_config, None, {}, chunk_rows=cache_cfg.chunk_rows)
    fkd = mix_targets == "fkd"
    if fkd:
        check(plan.mix is not None, "distill.mix_targets: fkd mixes the soft labels of mixed views, but the view plan "
                                    "mixes none: set views.mix (and rerun plan_views) or use mix_targets: exact")
        check(not online, "distill.mix_targets: fkd mixes cached soft labels: the teachers run live (--online) see "
                          "the mixed image itself; drop one of the two")
    if online:
        models, hashes = [], {}
        for name in teachers:
            path = paths.teacher_checkpoint(name)
            model, ckpt = load_teacher(path, device)
            check_fits_data("teacher checkpoint", path, ckpt.get("dataset_fingerprint"), ckpt["model_kwargs"], train,
                            f"retrain it with python -m stages.pretrain --teacher {name} --restart")
            models.append(model)
            hashes[name] = sha256_file(path)
        return TargetSources(cache_cfg.align_config, None, hashes, models=models, autocast=cache_cfg.autocast,
                             chunk_rows=cache_cfg.chunk_rows)
    where = paths.unmixed_teacher_cache if fkd else paths.teacher_cache  # a missing store: open_cache names --unmixed
    caches = validate_caches([open_cache(where(t, cache_cfg.format), cache_cfg.leftover) for t in teachers],
                             plan.unmixed() if fkd else plan,
                             train.fingerprint, train.num_classes, check_checkpoints=True, teachers=teachers)
    align_cfg = build(AlignConfig, caches[0].align, f"align spec of {caches[0].path}")
    hashes = {t: c.attrs.get("checkpoint_sha256") for t, c in zip(teachers, caches)}
    return TargetSources(align_cfg, caches[0].blocks, hashes, caches=dict(zip(teachers, caches)),
                         chunk_rows=caches[0].layout.chunk_rows, fkd=plan.mix if fkd else None)


def load_student_init(student: nn.Module, arch: str, init: str, model_kwargs: dict[str, Any]) -> str:
    """`student.init` into `student`: the weights of a student checkpoint (data/student/RUN/seedS.pt) or a teacher
    checkpoint of the same architecture and kwargs (dropout aside), or a plain weights file made elsewhere (a
    torch state dict or .safetensors, as torchvision's pretrained weights or a training script leave them, checked
    key by key against the student). Returns the file's sha256."""
    path = Path(init)
    if path.suffix == ".safetensors":
        load_weights(student, path, arch)
        return sha256_file(path)
    ckpt = load_checkpoint(path, "student.init checkpoint", "train that run first, or fix student.init")
    if not isinstance(ckpt, dict) or "arch" not in ckpt:  # not one of ours: a state dict from elsewhere
        load_weights(student, path, arch)
        return sha256_file(path)
    weights = ckpt.get("student", ckpt.get("model"))
    theirs = {k: v for k, v in (ckpt.get("model_kwargs") or {}).items() if k != "dropout"}
    ours = {k: v for k, v in model_kwargs.items() if k != "dropout"}
    if weights is None or ckpt.get("arch") != arch or theirs != ours:
        raise UserError(f"student.init {path} holds {ckpt.get('arch')} {theirs}, not the student {arch} {ours}: "
                        f"point student.init at a checkpoint of this student")
    student.load_state_dict(weights)
    return sha256_file(path)
