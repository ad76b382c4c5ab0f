"""Mixed views (mixup, CutMix) as part of the view plan: the teachers are cached on the very mixed image the
student later replays.

A mixed view of sample i (its view v: crop/flip `aug[i, v]`) is blended with a partner sample j seen through j's
own planned view v, `aug[j, v]`: the crop j shows as itself in the same epoch, as in timm's batch pairing, and
the crop whose unmixed soft label FKD's approximation mixes. Partner, lambda and the CutMix box are drawn by the
counter-based generator (pipeline.augment.uniform) from (seed, i, v), like every other view parameter, and
stored in the plan (`MixPlan`): they do not depend on batch size, world size, worker count or device, unlike
batch-level mixing (timm's Mixup pairs a batch with its reverse, so the pairs change with the batch).

    mixup   x = round(lam x_i + (1 - lam) x_j), lam ~ Beta(mixup_alpha, mixup_alpha), in uint8 as timm's fast
            collate mixes
    cutmix  x = x_i with a box of x_j pasted in; the box is drawn as timm's rand_bbox draws it (side
            sqrt(1 - lam) of the view's, centre uniform, clipped to the view) and lam is corrected to the
            area kept, 1 - box area / view area (timm's correct_lam)

The label part of every method's loss is cross-entropy with lam one_hot(y_i) + (1 - lam) one_hot(y_j)
(`mixed_labels`): F.cross_entropy takes such probability targets, label smoothing included. The teachers'
part needs nothing: their cached outputs were computed on the mixed image. `fkd_targets` is FKD's
approximation instead, for comparison: the linear mix of the two samples' soft labels on their unmixed views.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import check, check_choice

KINDS = ("none", "mixup", "cutmix", "both")
MIX_DRAW = 100  # the generator's draw numbers of the mix (the view's own crop uses 0-42)
# what the plan stores of a MixPlan and hashes, as these dtypes (little-endian); `aug` follows from its own views
STORED = {"partner": "<i4", "lam": "<f4", "box": "<i2"}


@dataclass
class MixConfig:
    kind: str = "none"  # none | mixup | cutmix | both (a view is CutMix with probability switch_prob, else mixup)
    mixup_alpha: float = 0.8  # lam ~ Beta(alpha, alpha) of mixup (timm's mixup_alpha)
    cutmix_alpha: float = 1.0  # lam ~ Beta(alpha, alpha) of CutMix, before the area correction (timm's cutmix_alpha)
    prob: float = 1.0  # probability that a view is mixed at all (timm's prob); the rest are plain views
    switch_prob: float = 0.5  # kind both: probability of CutMix rather than mixup (timm's switch_prob)

    def __post_init__(self) -> None:
        check_choice(self.kind, KINDS, "views.mix.kind")
        for name, used in (("mixup_alpha", ("mixup", "both")), ("cutmix_alpha", ("cutmix", "both"))):
            alpha = getattr(self, name)
            check(self.kind not in used or alpha > 0,
                  f"views.mix.{name} = {alpha} must be > 0 (lam ~ Beta(alpha, alpha)); to mix fewer views lower "
                  f"views.mix.prob, to mix none set views.mix.kind: none")
        check(0 <= self.prob <= 1, f"views.mix.prob = {self.prob} must be a probability in [0, 1]")
        check(0 <= self.switch_prob <= 1, f"views.mix.switch_prob = {self.switch_prob} must be a probability in [0, 1]")
        check(self.kind == "none" or self.prob > 0,
              f"views.mix.prob = 0 mixes no view: set views.mix.kind: none (or a probability above 0)")

    @property
    def active(self) -> bool:
        return self.kind != "none"


@dataclass
class MixPlan:
    """The mixing of (sample, view) pairs; every field has the same leading shape: (N, V) in a plan, (N,) for one
    view, (n,) for some pairs. numpy in the plan, torch (`to`) where views are made."""

    partner: np.ndarray  # int32: the partner sample j; -1 where the pair is a plain view
    aug: np.ndarray  # (..., P) int16: the partner's view params, its own planned view aug[j, v] (`with_views`)
    lam: np.ndarray  # float32: the weight of sample i (its pixels outside the box, its label); 1 for a plain view
    box: np.ndarray  # (..., 4) int16: CutMix's box (top, left, height, width) in view pixels; empty for mixup

    def take(self, *index) -> "MixPlan":
        """The pairs `self.field[index]` of every field (numpy or torch indexing alike)."""
        return MixPlan(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device) -> "MixPlan":
        """Torch tensors on `device`: int64 partner and box (indexes), float32 lam, and aug int16 as the plan keeps
        every view's params (a cache pass holds all (N, V, P) of them on the device)."""
        def tensor(a, dtype):
            return (a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))).to(device, dtype)
        return MixPlan(tensor(self.partner, torch.long), tensor(self.aug, torch.int16), tensor(self.lam, torch.float32),
                       tensor(self.box, torch.long))

    def stored(self) -> dict[str, np.ndarray]:
        """The arrays the plan stores and hashes (`aug` is the plan's own views, looked up)."""
        return {name: getattr(self, name) for name in STORED}

    @classmethod
    def with_views(cls, stored: dict[str, np.ndarray], aug: np.ndarray) -> "MixPlan":
        """A plan's mixing (N, V, ...) from its stored arrays and its views `aug` (N, V, P): each partner is seen
        through its own view v (a plain pair through the sample's own, unused)."""
        partner = stored["partner"]  # (N, V)
        rows = np.where(partner >= 0, partner, np.arange(len(partner))[:, None])
        return cls(partner=partner, aug=aug[rows, np.arange(aug.shape[1])[None, :]], lam=stored["lam"],
                   box=stored["box"])


def beta_quantile(alpha: float, u: np.ndarray) -> np.ndarray:
    """Beta(alpha, alpha) by inversion of the uniforms `u`: a pure function of them, as the plan needs."""
    from scipy.special import betaincinv

    return betaincinv(alpha, alpha, u)


def plan_mix(cfg: MixConfig, seed: int, samples: np.ndarray, views: np.ndarray, num_samples: int,
             view_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """The stored mixing (STORED: partner, lam, box) of views `views` (V,) of samples `samples` (n,), each
    (n, V, ...); `view_size`: the (height, width) models see, on which the box is drawn."""
    from pipeline.augment import uniform

    check(num_samples >= 2, f"views.mix.kind = {cfg.kind} needs at least 2 training samples to pair")
    samples, views = np.asarray(samples, dtype=np.int64), np.asarray(views)

    def u(draw: int) -> np.ndarray:
        return uniform(seed, samples, views, MIX_DRAW + draw)  # (n, V)

    mixed = u(0) < cfg.prob
    cut = np.full(mixed.shape, cfg.kind == "cutmix") if cfg.kind != "both" else u(1) < cfg.switch_prob
    partner = (samples[:, None] + 1 + np.floor(u(2) * (num_samples - 1)).astype(np.int64)) % num_samples  # j != i
    lam = beta_quantile(np.where(cut, cfg.cutmix_alpha, cfg.mixup_alpha), u(3))  # (n, V)
    # CutMix's box: side sqrt(1 - lam) of the view's, centre uniform over the view, clipped; lam := area kept
    h, w = view_size
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = np.floor(h * ratio).astype(np.int64), np.floor(w * ratio).astype(np.int64)
    cy, cx = np.floor(u(4) * h).astype(np.int64), np.floor(u(5) * w).astype(np.int64)
    top, bottom = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h)
    left, right = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w)
    area_kept = 1.0 - (bottom - top) * (right - left) / float(h * w)
    lam = np.where(cut, area_kept, lam)
    box = np.stack([top, left, bottom - top, right - left], axis=-1) * (mixed & cut)[..., None]
    return {"partner": np.where(mixed, partner, -1).astype(np.int32),
            "lam": np.where(mixed, lam, 1.0).astype(np.float32), "box": box.astype(np.int16)}


# ---------------------------------------------------------------- pixels, labels, FKD's targets


def mix_pixels(own: torch.Tensor, other: torch.Tensor, mix: MixPlan) -> torch.Tensor:
    """The mixed views: `own` and `other` (B, C, H, W) uint8 (the sample's view and its partner's), `mix` the B
    pairs' torch fields -> (B, C, H, W) uint8. A plain pair (lam 1, no box) returns `own` exactly."""
    _, _, h, w = own.shape
    top, left, bh, bw = (c[:, None, None] for c in mix.box.to(own.device).unbind(1))  # (B, 1, 1) each
    ys = torch.arange(h, device=own.device)[None, :, None]
    xs = torch.arange(w, device=own.device)[None, None, :]
    inside = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)  # (B, H, W): CutMix's box
    lam = mix.lam.to(own.device)
    keep = torch.where(mix.box[:, 2].to(own.device) * mix.box[:, 3].to(own.device) > 0, torch.ones_like(lam), lam)
    keep = keep[:, None, None, None]  # (B, 1, 1, 1): mixup's weight, 1 on CutMix and plain rows
    blend = (own.float() * keep + other.float() * (1.0 - keep)).round_().clamp_(0, 255).to(torch.uint8)
    return torch.where(inside[:, None], other, blend)


def tensor_views(images: torch.Tensor, rows: torch.Tensor, params: torch.Tensor, aug,
                 mix: MixPlan | None = None) -> torch.Tensor:
    """The views (B, C, H, W) uint8 of `images[rows]` (rows (B,)) by `params` (B, P) (pipeline.augment), mixed
    with their partners' views where `mix` (the B pairs, torch on the images' device) is given."""
    from pipeline.augment import apply_views

    x = apply_views(images[rows], params, aug)
    if mix is None:
        return x
    return mix_pixels(x, apply_views(images[partner_rows(mix, rows)], mix.aug, aug), mix)


def partner_rows(mix: MixPlan, rows: torch.Tensor) -> torch.Tensor:
    """The partner of each pair (B,), its own sample where it is a plain view (so that every row indexes)."""
    return torch.where(mix.partner >= 0, mix.partner, rows)


def mixed_labels(labels: torch.Tensor, idx: torch.Tensor, mix: MixPlan, num_classes: int) -> torch.Tensor:
    """Probability targets (B, C) float32: lam one_hot(y_i) + (1 - lam) one_hot(y_j) for samples `idx` (B,),
    `mix` their pairs (torch); a plain view's row is its one-hot label."""
    own = F.one_hot(labels[idx], num_classes).float()
    other = F.one_hot(labels[partner_rows(mix, idx)], num_classes).float()
    lam = mix.lam[:, None]
    return own * lam + other * (1.0 - lam)


def fkd_targets(own: torch.Tensor, other: torch.Tensor, own_blocks: list[torch.Tensor] | None,
                other_blocks: list[torch.Tensor] | None, lam: torch.Tensor, temperature: float):
    """FKD's approximation of the teachers on a mixed image: the two unmixed views' soft labels mixed linearly.

    `own`, `other` (k, B, C) the teachers' logits on the sample's and the partner's unmixed views, `lam` (B,).
    Returns logits z (k, B, C) with softmax(z / T) = lam softmax(own / T) + (1 - lam) softmax(other / T), exactly
    what a method softening its targets at T = `temperature` then reads, and the blocks mixed linearly.
    """
    w = lam[None, :, None]
    probs = w * torch.softmax(own / temperature, -1) + (1.0 - w) * torch.softmax(other / temperature, -1)
    logits = temperature * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    if own_blocks is None:
        return logits, None
    return logits, [w * a + (1.0 - w) * b for a, b in zip(own_blocks, other_blocks)]
