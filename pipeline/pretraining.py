"""Teacher pretraining: cross-entropy with pad-and-crop + flip, SGD with Nesterov momentum, a pure LR schedule.

The epoch loop lives in `pretrain()`, visible top to bottom; `train_one_epoch` is a plain function, and the
seeded order, logging cadence, throughput and evaluation are distillation's too (pipeline.training). A checkpoint (a plain dict) is written after every epoch, so a killed run resumes from
its last finished epoch instead of starting over. Under torchrun (pipeline.dist) each rank trains its shard
of every global batch in DDP, and rank 0 alone evaluates and saves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.augment import AugmentConfig, normalize, plan_views
from pipeline.config import UserError, build, check
from pipeline.data import ImageData, resident, source_sizes, step_views
from pipeline.device import autocast, memory_format
from pipeline.dist import World, all_reduce_sum, barrier, shard, shard_weight, sync_batchnorm, wrap_ddp
from pipeline.optim import SGDConfig, make_sgd, param_groups, set_lr, sgd_lr
from pipeline.training import epoch_order, evaluate, images_per_s, log_due


@dataclass(kw_only=True)
class PretrainConfig(SGDConfig):
    # SGDConfig's fields lead, in its order; redeclared here are those whose defaults are pretraining's own
    lr: float = 0.2  # peak learning rate (SGD)
    nesterov: bool = True  # Nesterov momentum (when momentum > 0)
    schedule: str = "onecycle"  # cosine | onecycle | constant | step (pipeline.optim), per optimizer step
    warmup_epochs: float = 1.0  # linear warm-up length (epochs)
    epochs: int = 10  # passes over the training split
    batch_size: int = 256  # images per optimizer step
    label_smoothing: float = 0.1  # cross-entropy label smoothing (fraction)
    seed: int = 0  # seeds weights, shuffling and augmentation
    augment: dict[str, Any] = field(default_factory=lambda: {"kind": "crop_flip", "pad": 2, "flip": True})
    eval_batch_size: int = 1024  # images per forward pass at test time
    eval_every: int = 1  # test every this many epochs, and always after the last (CPU profiles: save time)

    def __post_init__(self) -> None:
        check(self.epochs >= 1, f"pretrain.epochs = {self.epochs} must be at least 1")
        check(self.batch_size >= 1, f"pretrain.batch_size = {self.batch_size} must be at least 1")
        self.check_sgd("pretrain", self.epochs)
        check(0 <= self.label_smoothing < 1, f"pretrain.label_smoothing = {self.label_smoothing} must be in [0, 1)")
        check(self.eval_batch_size >= 1, f"pretrain.eval_batch_size = {self.eval_batch_size} must be at least 1")
        check(self.eval_every >= 1, f"pretrain.eval_every = {self.eval_every} must be at least 1")
        build(AugmentConfig, self.augment, "pretrain.augment")  # validate now, before any work

    @property
    def augment_config(self) -> AugmentConfig:
        return build(AugmentConfig, self.augment, "pretrain.augment")


@dataclass
class TeacherSpec:
    arch: str = "resnet18"  # a name from pipeline.models.ZOO, or torchvision:NAME / timm:NAME
    model: dict[str, Any] = field(default_factory=dict)  # constructor kwargs, e.g. {width: 0.5}; torchvision and
    # timm models: blocks (module names), input_size (pixels, 0 = the data's), mean and std
    pretrain: dict[str, Any] = field(default_factory=dict)  # overrides of the shared `pretrain` section
    weights: str = ""  # a local weights file (torch state dict or .safetensors): the teacher is imported by the
    # pretrain stage, not trained; "" = train it here


def teacher_spec(params: dict[str, Any], name: str) -> tuple[TeacherSpec, PretrainConfig]:
    """The named teacher's spec and its pretrain config (shared section + the teacher's overrides)."""
    teachers = params.get("teachers") or {}
    if name not in teachers:
        known = ", ".join(teachers) or "(none)"
        raise UserError(f"teacher '{name}' is not listed under `teachers` in the params; known: {known}")
    spec = build(TeacherSpec, teachers[name], f"teachers.{name}")
    merged = {**(params.get("pretrain") or {}), **spec.pretrain}
    return spec, build(PretrainConfig, merged, "pretrain")  # the message names the key; it may be a teacher override


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: ImageData,
    images: torch.Tensor | None,
    labels: torch.Tensor,
    cfg: PretrainConfig,
    epoch: int,
    device: torch.device,
    progress: bool = True,
    world: World = World(),
) -> dict[str, float]:
    """One pass over the training split; returns mean loss and accuracy. `images`: the split's (N, C, H, W) uint8
    already on `device`, or None where its files are decoded batch by batch (pipeline.data.step_views).

    The epoch's augmentation is view `epoch` of the seeded plan (pipeline.augment), so it is replayable.
    `model` may be DDP-wrapped: then this rank trains its shard of each global batch (pipeline.dist).
    """
    model.train()
    aug = cfg.augment_config
    n = len(labels)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    order = epoch_order(cfg.seed, epoch, n).to(device)  # (N,)
    views = torch.from_numpy(plan_views(aug, cfg.seed, np.arange(n), np.array([epoch]), *source_sizes(data))[:, 0])
    views = views.to(device)  # (N, P)
    steps = [shard(order[i * cfg.batch_size:(i + 1) * cfg.batch_size], world) for i in range(steps_per_epoch)]
    batches = step_views(data, images, steps, views, aug, device)  # this rank's (b,) rows of each global batch
    fmt = memory_format(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not progress)
    for i in bar:
        set_lr(optimizer, sgd_lr(cfg, epoch * steps_per_epoch + i, steps_per_epoch, cfg.epochs))
        idx = steps[i]  # (b,) this rank's share of the global batch (all of it with one process)
        x = normalize(next(batches), data.mean, data.std)  # (b, C, H, W)
        x = x.contiguous(memory_format=fmt)
        y = labels[idx]
        with autocast(device):
            logits, _ = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        weight = shard_weight(len(idx), min(cfg.batch_size, n - i * cfg.batch_size), world)  # b_r / B
        (loss * weight if weight != 1.0 else loss).backward()  # DDP averages the gradients over the ranks
        optimizer.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        if progress and log_due(i, steps_per_epoch):  # one host sync per interval, not per step
            bar.set_postfix(loss=f"{loss_sum.item() * world.size / ((i + 1) * cfg.batch_size):.3f}")
    totals = all_reduce_sum(torch.stack([loss_sum, correct.to(loss_sum.dtype)]), world)  # over every rank's rows
    return {"train_loss": totals[0].item() / n, "train_acc": totals[1].item() / n}


def pretrain(
    model: nn.Module,
    train: ImageData,
    test: ImageData,
    cfg: PretrainConfig,
    device: torch.device,
    state: dict[str, Any] | None,
    save: Callable[[dict[str, Any]], None],
    progress: bool = True,
    world: World = World(),
    sync_bn: bool = False,
) -> dict[str, Any]:
    """The epoch loop. `state` is a checkpoint to resume from (or None); `save` persists a checkpoint dict.

    Returns the final checkpoint dict (also passed to `save`; complete on rank 0 only under torchrun, where
    the others neither evaluate nor save). `sync_bn`: BatchNorm over the global batch (pipeline.dist).
    """
    if sync_bn:
        model = sync_batchnorm(model, world, device)
    model.to(device=device, memory_format=memory_format(device))
    optimizer = make_sgd(param_groups(model, cfg.weight_decay, cfg.decay_all), cfg)
    progress = progress and world.main
    history: list[dict[str, float]] = []
    start_epoch, wall = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history, wall = state["epoch"], list(state["history"]), state.get("wall_time_s", 0.0)
    images = resident(train, device)  # (N, C, H, W) uint8 for the whole run; None: files, read per batch
    labels = train.labels.to(device)
    ckpt: dict[str, Any] = dict(state or {})
    trained = wrap_ddp(model, world, device)  # the model itself with one process
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        stats = train_one_epoch(trained, optimizer, train, images, labels, cfg, epoch, device, progress, world)
        train_time = time.perf_counter() - t0
        last = epoch + 1 == cfg.epochs
        tested = world.main and (last or (epoch + 1) % cfg.eval_every == 0)
        test_stats = evaluate(model, test, device, cfg.eval_batch_size) if tested else {}
        elapsed = time.perf_counter() - t0
        wall += elapsed
        row = {"epoch": epoch + 1, **stats, "test_acc": test_stats.get("accuracy"), "test_nll": test_stats.get("nll"),
               "epoch_time_s": elapsed, "train_time_s": train_time, "images_per_s": images_per_s(len(train), train_time)}
        history.append(row)
        if progress:
            tested_text = f"  test {test_stats['accuracy']:.4f}" if tested else ""
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {stats['train_loss']:.4f}  train {stats['train_acc']:.4f}"
                       f"{tested_text}  {elapsed:.1f}s")
        ckpt.update(model={k: v.cpu() for k, v in model.state_dict().items()}, optimizer=optimizer.state_dict(),
                    epoch=epoch + 1, history=history, wall_time_s=wall, test_acc=test_stats.get("accuracy"),
                    finished=last)  # the config is the caller's: it is part of the checkpoint's identity
        if world.main:
            save(ckpt)
        barrier(world)  # the epoch's checkpoint is on disk before any rank starts the next epoch
    return ckpt
