"""Replayable augmentation: view parameters as a pure function of (seed, sample, view), applied in batch.

A view is fully described by a small int16 parameter vector, so the teacher cache can store the
parameters beside the teacher's outputs and the student can later be shown exactly the same pixels
(docs/design.md section 2). Making a view and replaying a cached one are the same call: `apply_views`.

Two kinds of view:
- `crop_flip` (small images, the CIFAR recipe): zero-pad by `pad`, crop back to H x W at offset
  (dx, dy), optionally mirror. Parameters (dx, dy, flip), exact in uint8.
- `rrc_flip` (ImageFolder data): torchvision's RandomResizedCrop box (top, left, height, width) in
  source pixels, resized back to H x W with `roi_align` (bilinear), optionally mirrored.
  Parameters (top, left, height, width, flip).

Random numbers come from a counter-based hash (splitmix64) of (seed, sample, view, draw), so the plan
does not depend on batch size, worker count, rank count or device.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import check, check_choice

KINDS = ("crop_flip", "rrc_flip", "none")
PARAMS_PER_KIND = {"crop_flip": 3, "rrc_flip": 5, "none": 1}


@dataclass
class AugmentConfig:
    kind: str = "crop_flip"  # crop_flip | rrc_flip | none
    pad: int = 2  # crop_flip: zero padding on each side before the crop (pixels)
    flip: bool = True  # mirror horizontally with probability 1/2
    scale_min: float = 0.35  # rrc_flip: smallest crop area as a fraction of the image
    ratio_min: float = 0.75  # rrc_flip: smallest crop aspect ratio (width / height); max is 1/ratio_min

    def __post_init__(self) -> None:
        check_choice(self.kind, KINDS, "augment.kind")
        check(0 <= self.pad <= 64, f"augment.pad = {self.pad} must be between 0 and 64 pixels")
        check(0 < self.scale_min <= 1, f"augment.scale_min = {self.scale_min} must be in (0, 1]")
        check(0 < self.ratio_min <= 1, f"augment.ratio_min = {self.ratio_min} must be in (0, 1]")

    @property
    def num_params(self) -> int:
        return PARAMS_PER_KIND[self.kind]


# ---------------------------------------------------------------- counter-based random numbers

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, samples: np.ndarray, views: np.ndarray, draw: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per (sample, view), a pure function of (seed, sample, view, draw).

    `samples` (n,) and `views` (V,) broadcast to (n, V).
    """
    with np.errstate(over="ignore"):
        s = np.asarray(samples, dtype=np.uint64)[:, None]
        v = np.asarray(views, dtype=np.uint64)[None, :]
        key = _splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(draw))
        x = _splitmix64(_splitmix64(key ^ s) + v * np.uint64(0xD6E8FEB86659FD93))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # (n, V)


# ---------------------------------------------------------------- planning views

def plan_views(
    cfg: AugmentConfig, seed: int, samples: np.ndarray, views: np.ndarray, height, width
) -> np.ndarray:
    """The int16 parameters of views `views` of samples `samples`: (n, V, P).

    `height` and `width` are the source images' size in pixels: one int for all (a tensor source), or one per
    sample, shape (n,) (files at native resolution), so each box is drawn on its own image as torchvision's
    RandomResizedCrop draws it. Equal sizes given either way give the same plan.
    """
    samples = np.asarray(samples)
    views = np.asarray(views)
    if cfg.kind == "none":
        return np.zeros((len(samples), len(views), 1), dtype=np.int16)
    flip = (uniform(seed, samples, views, 0) < 0.5) & cfg.flip  # (n, V)
    if cfg.kind == "crop_flip":
        span = 2 * cfg.pad + 1
        dx = np.floor(uniform(seed, samples, views, 1) * span)
        dy = np.floor(uniform(seed, samples, views, 2) * span)
        return np.stack([dx, dy, flip], axis=-1).astype(np.int16)
    return _plan_resized_crops(cfg, seed, samples, views, height, width, flip)


def _plan_resized_crops(cfg, seed, samples, views, height, width, flip) -> np.ndarray:
    """RandomResizedCrop's rejection sampling (10 tries, then a centre crop), vectorised over samples and views."""
    height = np.broadcast_to(np.asarray(height, dtype=np.int64), (len(samples),))[:, None]  # (n, 1)
    width = np.broadcast_to(np.asarray(width, dtype=np.int64), (len(samples),))[:, None]
    area = height * width
    shape = (len(samples), len(views))
    box = np.zeros(shape + (4,), dtype=np.int64)
    found = np.zeros(shape, dtype=bool)
    log_lo, log_hi = math.log(cfg.ratio_min), math.log(1.0 / cfg.ratio_min)
    for attempt in range(10):
        base = 3 + 4 * attempt
        target = area * (cfg.scale_min + (1.0 - cfg.scale_min) * uniform(seed, samples, views, base))
        ratio = np.exp(log_lo + (log_hi - log_lo) * uniform(seed, samples, views, base + 1))
        w = np.round(np.sqrt(target * ratio)).astype(np.int64)
        h = np.round(np.sqrt(target / ratio)).astype(np.int64)
        ok = (w > 0) & (h > 0) & (w <= width) & (h <= height) & ~found
        top = np.floor(uniform(seed, samples, views, base + 2) * (height - h + 1)).astype(np.int64)
        left = np.floor(uniform(seed, samples, views, base + 3) * (width - w + 1)).astype(np.int64)
        box[ok] = np.stack([top, left, h, w], axis=-1)[ok]
        found |= ok
    # fallback: the largest centred crop within the ratio bounds (np.round halves to even, as Python's round)
    in_ratio = width / height  # (n, 1)
    narrow, wide = in_ratio < cfg.ratio_min, in_ratio > 1.0 / cfg.ratio_min
    w = np.where(wide, np.round(height / cfg.ratio_min).astype(np.int64), width)
    h = np.where(narrow, np.round(width / cfg.ratio_min).astype(np.int64), height)
    centre = np.broadcast_to(np.stack([(height - h) // 2, (width - w) // 2, h, w], axis=-1), shape + (4,))
    box[~found] = centre[~found]
    return np.concatenate([box, flip[..., None]], axis=-1).astype(np.int16)


# ---------------------------------------------------------------- applying views

def apply_views(images: torch.Tensor, params: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """The views described by `params` (B, P) of `images` (B, C, H, W) uint8 -> (B, C, H, W) uint8.

    Pure batched tensor ops on the images' device, no per-sample Python.
    """
    if cfg.kind == "none":
        return images
    params = params.to(images.device, torch.long)
    if cfg.kind == "crop_flip":
        out = _crop(images, params[:, 0], params[:, 1], cfg.pad)
    else:
        out = _resized_crop(images, params[:, :4])
    flip = params[:, -1].bool()  # (B,)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _crop(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by `pad` and crop H x W at (dy, dx) in the padded image.

    `unfold` makes every possible crop a strided view (no copy), and one advanced index picks each
    image's own crop: faster on the CPU than gathering (row, column) index grids.
    """
    b, c, h, w = images.shape
    if pad == 0:
        return images
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # (B, C, 2p+1, 2p+1, H, W), a view
    return windows[torch.arange(b, device=images.device), :, dy, dx]  # (B, C, H, W)


def views_of_image(image: torch.Tensor, params: torch.Tensor, cfg: AugmentConfig, size: int) -> torch.Tensor:
    """The views `params` (V, P) of one image (C, H, W) uint8 at its own resolution -> (V, C, size, size) uint8.

    What a file source does with one decode: every planned box (drawn on this image's own size) is cropped and
    resized to size x size from the same pixels. A box no larger than the view is resized as `apply_views` does
    (so on a tensor holding the same image at size x size the views are equal, bit for bit); a larger one is cut
    down with antialiasing by torchvision's own resized crop (bilinear, antialias=True: RandomResizedCrop's
    transform). `none` is the whole image resized.
    """
    from torchvision.transforms.v2 import functional as TF

    if cfg.kind == "crop_flip":
        raise ValueError("crop_flip pads and crops at the source's own size: views from files need rrc_flip or none")
    params = params.to(image.device, torch.long)  # (V, P)
    v, (c, h, w) = len(params), image.shape
    if cfg.kind == "none":  # the whole image, unflipped
        params = torch.tensor([[0, 0, h, w, 0]], device=image.device).expand(v, 5)
    out = torch.empty(v, c, size, size, dtype=torch.uint8, device=image.device)
    small = (params[:, 2] <= size) & (params[:, 3] <= size)  # (V,) upscales: the tensor source's op
    if small.any():
        out[small] = _resized_crop(image[None], params[small, :4], (size, size),
                                   index=torch.zeros(int(small.sum()), dtype=torch.long))
    for k in torch.nonzero(~small).flatten().tolist():
        top, left, bh, bw = params[k, :4].tolist()
        out[k] = TF.resized_crop(image, top, left, bh, bw, [size, size], antialias=True)  # (C, size, size)
    flip = params[:, -1].bool()  # (V,)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def _resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int] | None = None,
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """Crop-and-resize of one box (top, left, height, width) per row to `size` (default: the images' H x W).

    Box i reads image `index[i]` (default: image i). One bilinear sample at each output pixel's centre: crops
    are never larger than the output here (an upscale, no aliasing to average away), and a full-image box is
    the identity. (`views_of_image` cuts larger boxes down with antialiasing.)
    """
    from torchvision.ops import roi_align

    b = boxes.shape[0]
    size = size or (images.shape[2], images.shape[3])
    top, left, bh, bw = boxes.unbind(1)
    idx = (torch.arange(b, device=images.device) if index is None else index.to(images.device)).float()
    rois = torch.stack([idx, left.float(), top.float(), (left + bw).float(), (top + bh).float()], 1)  # (B, 5)
    out = roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)  # (B, C, size, size)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 standardised per channel (mean and std in [0, 1] units)."""
    m, s = _moments(tuple(mean), tuple(std), images.device)
    return (images.float() - m) / s


@functools.lru_cache(maxsize=32)
def _moments(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) * 255 as (1, C, 1, 1) float32 on `device`, made once: a tensor built from a tuple on
    every step is a host-to-device copy, which on CUDA waits for the queue of launched kernels to drain."""
    return (torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0,
            torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)
