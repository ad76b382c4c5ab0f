"""What pretraining and distillation share: the seeded epoch order, the logging cadence, the throughput measure
and evaluation without augmentation.

    epoch_order(seed, epoch, n)   the epoch's permutation: a function of (seed, epoch) alone, whatever the world;
                                  with `block`, a chunk-window order whose windows read a few cache chunks each
    log_due(step, steps, every)   whether step `step` updates the progress bar (the loops' only host syncs)
    images_per_s(n, seconds)      throughput over the training steps alone (evaluation and checkpoints excluded)
    predict_logits(), evaluate()  the model on un-augmented images, in eval mode
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.augment import normalize
from pipeline.data import ImageData, eval_views
from pipeline.device import autocast, memory_format

LOG_EVERY = 25  # steps between progress-bar updates, unless a config says otherwise (distill.log_every)


def epoch_order(seed: int, epoch: int, n: int, block: int = 0, window: int = 1) -> torch.Tensor:
    """The epoch's permutation of the N samples (CPU, int64): the same for every rank and world size, and after a
    resume.

    block = 0: a uniform permutation. block = R > 0 (the teacher caches' chunk rows): the chunks [kR, (k+1)R) in
    a random order, cut into windows of `window` chunks, the samples shuffled within each window; so the steps of
    one window read only its chunks (FFCV's quasi-random order, for targets that do not fit in memory).
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if block <= 0:
        return torch.randperm(n, generator=gen)  # (N,)
    chunks = torch.randperm(-(-n // block), generator=gen)  # (n_chunks,)
    parts = []
    for w in range(0, len(chunks), window):
        rows = torch.cat([torch.arange(k * block, min(n, (k + 1) * block)) for k in chunks[w:w + window].tolist()])
        parts.append(rows[torch.randperm(len(rows), generator=gen)])  # (<= window * R,) this window's samples
    return torch.cat(parts)  # (N,)


def log_due(step: int, steps: int, every: int = LOG_EVERY) -> bool:
    """Step `step` (0-based) of `steps` ends a logging interval: every `every` steps, and the last one."""
    return (step + 1) % every == 0 or step + 1 == steps


def images_per_s(images: int, train_seconds: float) -> float:
    """Training throughput: images per second of the training steps (what a speed-up of the step changes)."""
    return images / max(train_seconds, 1e-9)


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageData, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Logits (N, C) float32 on the CPU for the un-augmented images (files: resized, centre-cropped), in eval mode."""
    was_training = model.training
    model.eval()
    fmt = memory_format(device)
    out = []
    for x in eval_views(data, device, batch_size):  # (b, C, H, W) uint8: a file is resized and centre-cropped
        x = normalize(x, data.mean, data.std).contiguous(memory_format=fmt)
        with autocast(device):
            logits, _ = model(x)
        out.append(logits.float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, data.num_classes)


def evaluate(model: nn.Module, data: ImageData, device: torch.device, batch_size: int = 1024) -> dict[str, float]:
    """Top-1 accuracy (fraction) and mean NLL on `data`, no augmentation."""
    logits = predict_logits(model, data, device, batch_size)
    return {
        "accuracy": (logits.argmax(1) == data.labels).float().mean().item(),
        "nll": F.cross_entropy(logits, data.labels).item(),
        "num_samples": len(data),
    }
