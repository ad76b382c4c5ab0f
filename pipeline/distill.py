"""The one student training loop: every method (pipeline.methods) is a plan run through it.

    distill()            the epoch loop, top to bottom: slab for view e mod V, train, evaluate, checkpoint
    train_one_epoch()    one pass over the training split in a seeded order, on view e mod V
    epoch_steps()        that pass as a generator of steps (the benchmark steps several runs in lock-step)
    train_step()         student forward, the plan's losses, the discriminators' game, the optimizer steps
    evaluate()           test accuracy of the student (pipeline.train.evaluate)

The step never syncs with the host: losses and discriminator accuracies are summed on the device and
read once per `log_every` steps (progress bar) and once per epoch (metrics). Randomness is a function
of (seed, epoch) only (batch order, teacher draws, dropout), so a resumed run repeats the epochs it
did not finish exactly as an uninterrupted one would, and cached and online runs see the same batches.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from pipeline import train as pretraining
from pipeline.align import AlignConfig, align
from pipeline.align_tap import GradientTap
from pipeline.augment import AugmentConfig, apply_views, normalize
from pipeline.discriminators import (Discriminators, discriminator_loss, discriminator_step, fooling_loss,
                                     fooling_loss_grad)
from pipeline.losses import grad_reverse
from pipeline.config import UserError
from pipeline.methods import DistillConfig, Plan, StudentOut, Targets
from pipeline.device import autocast, fused_optimizer, memory_format
from pipeline.schedules import lr_at


@dataclass
class TrainSet:
    """The training split on the device, with the view plan that says what every epoch shows."""

    images: torch.Tensor  # (N, C, H, W) uint8 on the device
    labels: torch.Tensor  # (N,) int64 on the device
    aug: np.ndarray  # (N, V, P) int16 view parameters (pipeline.views)
    augment: AugmentConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_views(self) -> int:
        return int(self.aug.shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Run:
    """Everything a step touches: the plan, the models, their optimizers."""

    plan: Plan
    cfg: DistillConfig
    student: nn.Module
    discs: Discriminators | None  # one per name the plan gives, batched (None without a game)
    opt: torch.optim.Optimizer  # the student's SGD (and, in `cooperative`, the discriminators too)
    d_opt: torch.optim.Optimizer | None  # the discriminators' own optimizer (alternating, reversal)
    device: torch.device
    # with the tap: the student, x -> (logits, blocks); without: StudentVectors, x -> (logits, aligned vectors)
    # (torch.compile'd under distill.compile)
    forward: Callable[[torch.Tensor], Any]
    # the student's blocks -> (G, B, L) aligned vectors with their gradient tapped in place (pipeline.align_tap),
    # the loss terms' gradients in closed form (Plan.loss_grads); or None: through autograd (a plan without a
    # closed form; distill.compile; reversal and cooperative, whose discriminators take their gradient
    # from the same backward as the student)
    tap: GradientTap | None
    # without the tap: the student's objective through autograd (`objective`), torch.compile'd under
    # distill.compile so that its forward and backward fuse into a few kernels instead of ~100 launches
    head: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor | None]]


class StudentVectors(nn.Module):
    """The student with the alignment of the plan's distilled blocks folded in: x -> (logits (B, C), vectors
    (G, B, L), or None without blocks). Compiled as one, the alignment's forward and backward fuse with
    the student's."""

    def __init__(self, student: nn.Module, blocks: tuple[int, ...], align_cfg: AlignConfig):
        super().__init__()
        self.student, self.blocks, self.align_cfg = student, tuple(blocks), align_cfg

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, feats = self.student(x)
        if not self.blocks:
            return logits, None
        return logits, torch.stack([align(feats[b], self.align_cfg) for b in self.blocks])


def objective(plan: Plan, discs: Discriminators | None, device: torch.device, logits: torch.Tensor,
              blocks: torch.Tensor | None, tgt_logits: torch.Tensor | None, tgt_blocks: torch.Tensor | None,
              labels: torch.Tensor, fooled: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The student's terms through autograd: the plan's losses (under autocast) and, given the student's
    discriminator inputs `fooled` (G, B, D) float32 (the alternating game), w * the fooling term per D
    (G,) in float32. Plain tensors in, so that torch.compile traces it as one region."""
    out = StudentOut(logits, blocks)
    tgt = Targets(tgt_logits, tgt_blocks) if tgt_logits is not None else None
    with autocast(device):
        terms = plan.losses(out, tgt, labels)
    adv = None if fooled is None else plan.game.adv_weight * fooling_loss(discs, fooled)
    return terms, adv


def build_run(plan: Plan, cfg: DistillConfig, student: nn.Module, num_classes: int, align_cfg: AlignConfig,
              device: torch.device, closed_form: bool = True) -> Run:
    """Discriminators for the plan and both optimizers, on `device` (seed torch before calling).

    `closed_form=False`: every term through autograd even where the plan has a closed form (the reference
    the closed-form step is checked against)."""
    student.to(device=device, memory_format=memory_format(device))
    dims = plan.discriminators(num_classes, align_cfg.length)  # name -> input size
    discs = None
    if dims:
        if len(set(dims.values())) != 1:
            raise ValueError(f"plan {plan.name} asks for discriminators of different sizes {dims}: one bank needs one")
        discs = Discriminators(list(dims), next(iter(dims.values()))).to(device)
    groups = pretraining.param_groups(student, cfg.weight_decay)
    d_opt = None
    fused = fused_optimizer()
    if plan.game is not None:
        g = plan.game
        if g.adversarial == "cooperative":
            # The official MEAL code: D trains inside the student's optimizer, on the summed loss.
            groups.append({"params": list(discs.parameters()), "lr": g.d_lr, "weight_decay": g.d_weight_decay,
                           "fixed_lr": True})
        elif g.d_optimizer == "adam":
            d_opt = torch.optim.Adam(discs.parameters(), lr=g.d_lr, betas=(0.5, 0.999), weight_decay=g.d_weight_decay,
                                     **fused)
        else:
            d_opt = torch.optim.SGD(discs.parameters(), lr=g.d_lr, momentum=0.9, weight_decay=g.d_weight_decay, **fused)
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                          **fused)
    tap = (GradientTap(align_cfg) if closed_form and plan.closed_form and not cfg.compile
           and plan.adversarial in ("alternating", "none") else None)
    forward = student if tap is not None else StudentVectors(student, plan.feature_blocks, align_cfg)
    head = partial(objective, plan, discs, device)
    if cfg.compile:
        forward, head = torch.compile(forward), torch.compile(head)
    return Run(plan, cfg, student, discs, opt, d_opt, device, forward, tap, head)


def set_student_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The schedule drives the student's groups; a discriminator group keeps its constant rate."""
    for group in opt.param_groups:
        if not group.get("fixed_lr", False):
            group["lr"] = lr


# ---------------------------------------------------------------- one step


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, tgt: Targets | None) -> tuple[list[str], torch.Tensor]:
    """One optimizer step of the student (and of the discriminators). Returns the stats' names and their
    values (S,) float32 on the device (no host sync): the loss, its terms, the batch accuracy and, with a
    game, each discriminator's loss, accuracy and adversarial term."""
    plan, mode = run.plan, run.plan.adversarial
    tap = run.tap if plan.feature_blocks else None
    with autocast(run.device):
        if tap is not None:  # no graph past the student's outputs: the terms' gradients in closed form
            logits, feats = run.forward(x)  # (B, C), NUM_BLOCKS features
            chosen = [feats[b] for b in plan.feature_blocks]
            out = StudentOut(logits.detach(), tap.vectors(chosen))  # blocks (G, B, L)
            terms, g_logits, g_blocks = plan.loss_grads(out, tgt, y)  # weighted terms; (B, C), (G, B, L)
        else:
            logits, vectors = run.forward(x)  # (B, C), (G, B, L) aligned vectors or None
            out = StudentOut(logits, vectors)
        if mode != "none":
            s, t = plan.disc_inputs(out, tgt)  # (G, B, D) each: student, teacher
    fooled = None  # the alternating game through autograd: the student's inputs to D, for run.head
    if mode != "none":  # outside autocast: D's arithmetic is tiny, float32 throughout
        w, rows = plan.game.adv_weight, plan.adversarial_rows(len(y))
        names_d = run.discs.names
        if tap is not None and s is not out.blocks:
            raise ValueError(f"plan {plan.name} has a closed form but does not show D its blocks: build_run must not tap it")
        s, t = s.float(), t.float()
        if mode == "alternating":
            # The paper's game: first D maximises its accuracy against the student as it is (its gradient
            # by hand, the student's vectors detached) ...
            d_loss, acc = discriminator_step(run.discs, run.d_opt, t, s.detach(), rows)  # (G,) each
            # ... then the student tries to pass for the teacher with the updated D (D's weights held fixed).
            if tap is not None:
                adv, g_adv = fooling_loss_grad(run.discs, s, w)  # (G,), (G, B, L)
                g_blocks.add_(g_adv)
            else:
                fooled = s
        else:
            s_d = s
            if rows > 0:  # ANC's adversarial samples regularise D only: no student gradient through them
                s_d = torch.cat([s[:, :rows].detach(), s[:, rows:]], dim=1)
            if mode == "reversal":
                s_d = grad_reverse(s_d, w)  # D descends its loss, the student ascends w * it
            d_loss, acc = discriminator_loss(run.discs, t, s_d, rows)  # (G,) each
            d_total = d_loss.sum()
            # reversal reports what the student effectively minimises; cooperative: the student helps D
            adv = -w * d_loss.detach() if mode == "reversal" else w * d_loss
    if tap is None:  # the plan's terms (and the fooling term) through autograd: one compiled region under compile
        tgt_logits, tgt_blocks = (tgt.logits, tgt.blocks) if tgt is not None else (None, None)
        terms, fooling = run.head(out.logits, out.blocks, tgt_logits, tgt_blocks, y, fooled)
        if fooled is not None:
            adv = fooling  # (G,)
    if mode != "none":
        terms["adv"] = adv.sum()

    values = torch.stack(list(terms.values()))  # (T,) float32, "adv" last where there is a game
    loss = values.sum()
    run.opt.zero_grad(set_to_none=True)
    if tap is not None:
        tap.backward(logits, chosen, g_logits, g_blocks)  # = loss.backward(), the blocks' part tapped in place
    elif mode == "reversal":
        run.d_opt.zero_grad(set_to_none=True)
        (loss + d_total).backward()  # `adv` is detached here: the student's push comes through grad_reverse
    else:
        loss.backward()
    run.opt.step()
    if mode == "reversal":
        run.d_opt.step()

    # the stats as one vector, built with a few ops (one per stat cost ~3% of MEAL's step on the CPU)
    own = [k for k in terms if k != "adv"]
    names = ["loss", *own, "train_acc"]
    with torch.no_grad():
        parts = [loss.view(1), values[:len(own)], (logits.argmax(1) == y).float().mean().view(1)]
        if mode != "none":  # per discriminator: its loss, its accuracy and the student's term against it
            names += [f"{key}_{name}" for key in ("d_loss", "d_acc", "adv") for name in names_d]
            parts += [d_loss, acc, adv]
        return names, torch.cat(parts)


# ---------------------------------------------------------------- one epoch


def steps_per_epoch(n: int, cfg: DistillConfig) -> int:
    return math.ceil(n / cfg.batch_size)


def epoch_steps(run: Run, epoch: int, data: TrainSet, targets) -> Iterator[tuple[list[str], torch.Tensor, int]]:
    """The steps of one pass over the training split showing view `epoch mod V`, one per iteration.

    Yields (stat names, their batch-weighted values (S,) on the device, batch size) after each step.
    `targets(idx, x, picked) -> Targets` is a pipeline.slabs target source whose `start_epoch` has
    been called for this epoch's view. A generator, so that train_one_epoch and the throughput
    benchmark (which steps several runs in lock-step) run the very same step loop.
    """
    cfg, dev, plan = run.cfg, run.device, run.plan
    run.student.train()
    n, steps = len(data), steps_per_epoch(len(data), cfg)
    total_steps, warmup = steps * cfg.epochs, int(cfg.warmup_epochs * steps)
    view = epoch % data.num_views
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).to(dev)  # (N,)
    rng = random.Random(cfg.seed * 1_000_003 + epoch)  # the teacher draws (MEAL: one teacher per step)
    torch.manual_seed(cfg.seed * 10_007 + epoch)  # dropout masks: the same after a resume
    params = torch.from_numpy(np.ascontiguousarray(data.aug[:, view])).to(dev)  # (N, P)
    fmt = memory_format(dev)
    for i in range(steps):
        set_student_lr(run.opt, lr_at(epoch * steps + i, total_steps, cfg.lr, warmup, cfg.schedule))
        idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]  # (B,)
        x = normalize(apply_views(data.images[idx], params[idx], data.augment), data.mean, data.std)
        x = x.contiguous(memory_format=fmt)  # (B, C, H, W) float32, the view the teachers saw
        y = data.labels[idx]
        picked = plan.pick(rng)
        tgt = targets(idx, x, picked) if picked else None
        names, values = train_step(run, x, y, tgt)
        b = len(idx)
        yield names, values * b, b


def train_one_epoch(run: Run, epoch: int, data: TrainSet, targets, progress: bool = True) -> dict[str, float]:
    """One pass over the training split showing view `epoch mod V` (epoch_steps); mean losses and D accuracies."""
    steps = steps_per_epoch(len(data), run.cfg)
    keys: list[str] = []
    sums: torch.Tensor | None = None  # (S,) batch-weighted sums of the step's stats, on the device
    seen = 0
    bar = tqdm(total=steps, desc=f"{run.plan.name} epoch {epoch + 1}/{run.cfg.epochs}", leave=False,
               disable=not progress)
    for i, (keys, row, b) in enumerate(epoch_steps(run, epoch, data, targets)):
        sums = row if sums is None else sums + row  # a plan reports the same stats every step
        seen += b
        bar.update(1)
        if progress and ((i + 1) % run.cfg.log_every == 0 or i + 1 == steps):
            bar.set_postfix(_short(_means(keys, sums, seen)), refresh=False)  # the one host sync per interval
    bar.close()
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


def evaluate(run: Run, data, batch_size: int | None = None) -> dict[str, float]:
    """Accuracy (fraction), NLL and sample count of the student on `data` (an ImageData), no augmentation."""
    return pretraining.evaluate(run.student, data, run.device, batch_size or run.cfg.eval_batch_size)


def state_dict(run: Run) -> dict[str, Any]:
    """The trainable state for a checkpoint (on the CPU)."""
    cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
    return {
        "student": cpu(run.student.state_dict()),
        "discriminators": cpu(run.discs.state_dict()) if run.discs is not None else {},
        "optimizer": run.opt.state_dict(),
        "d_optimizer": run.d_opt.state_dict() if run.d_opt is not None else None,
    }


def load_state(run: Run, state: dict[str, Any]) -> None:
    run.student.load_state_dict(state["student"])
    try:
        if run.discs is not None:
            run.discs.load_state_dict(state["discriminators"])
        run.opt.load_state_dict(state["optimizer"])
        if run.d_opt is not None:
            run.d_opt.load_state_dict(state["d_optimizer"])
    except (KeyError, RuntimeError, ValueError) as err:  # e.g. discriminators saved per layer by an older version
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]  # load_state_dict: a header, then the keys
        reason = " ".join(lines)[:160] or type(err).__name__
        raise UserError(f"the checkpoint's discriminator or optimizer state does not fit this version ({reason}): "
                        f"pass --restart to start over") from None


def distill(
    run: Run,
    data: TrainSet,
    test,
    targets,
    state: dict[str, Any] | None,
    save: Callable[[dict[str, Any]], None],
    progress: bool = True,
) -> dict[str, Any]:
    """The epoch loop. `state`: a checkpoint to resume from (or None); `save(ckpt)` persists one.

    Epoch e trains on view e mod V: the slab of that view is loaded (already prefetched during the
    previous epoch) and the next epoch's slab is read in the background while this one trains.
    Returns the final checkpoint dict.
    """
    cfg = run.cfg
    history: list[dict[str, Any]] = []
    start, best_acc, best_epoch, wall = 0, -1.0, 0, 0.0
    if state is not None:
        load_state(run, state)
        start, history = state["epoch"], list(state["history"])
        best_acc, best_epoch, wall = state["best_acc"], state["best_epoch"], state["wall_time_s"]
    ckpt: dict[str, Any] = dict(state or {})
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        nxt = (epoch + 1) % data.num_views if epoch + 1 < cfg.epochs else None
        targets.start_epoch(epoch % data.num_views, nxt)
        stats = train_one_epoch(run, epoch, data, targets, progress)
        train_time = time.perf_counter() - t0
        row: dict[str, Any] = {"epoch": epoch + 1, "view": epoch % data.num_views, **stats}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            ev = evaluate(run, test)
            row.update(test_acc=ev["accuracy"], test_nll=ev["nll"])
            if ev["accuracy"] > best_acc:
                best_acc, best_epoch = ev["accuracy"], epoch + 1
        elapsed = time.perf_counter() - t0
        wall += elapsed
        row.update(lr=run.opt.param_groups[0]["lr"], epoch_time_s=elapsed, train_time_s=train_time,
                   images_per_s=len(data) / train_time)
        history.append(row)
        if progress:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items()
                              if k in ("loss", "test_acc") or k.startswith("d_acc_"))
            tqdm.write(f"{run.plan.name} epoch {epoch + 1}/{cfg.epochs}  {shown}  {elapsed:.1f}s")
        ckpt.update(state_dict(run), epoch=epoch + 1, finished=epoch + 1 == cfg.epochs, history=history,
                    best_acc=best_acc, best_epoch=best_epoch, test_acc=row.get("test_acc"), wall_time_s=wall)
        save(ckpt)
    return ckpt
