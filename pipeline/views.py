"""The view plan: which augmented view of every training sample the teachers saw (`data/views.zarr`).

Written once by `python -m stages.plan_views` and shared by every teacher cache and by the student
(docs/design.md section 2). It holds

- `aug` (N, V, P) int16: the `pipeline.augment` parameters of view v of sample i, a pure function of
  (seed, i, v), so the plan does not depend on how the samples were split into blocks, on worker or
  rank counts, or on the device;
- `labels` (N,) int16: the training labels in the order the plan and the caches index samples;
- with `views.mix` (pipeline.mix): `mix/partner` (N, V) int32, `mix/lam` (N, V) float32 and `mix/box` (N, V, 4)
  int16, each view's partner, lambda and CutMix box, drawn from (seed, sample, view) as `aug` is (the partner is
  seen through its own view, aug[j, v]); the mix spec joins the attrs. A plan without mixing has neither, so its
  fingerprint is what it was before mixing existed, and a mixing plan's `unmixed()` twin (its views unmixed)
  is exactly the plan `views.mix.kind: none` gives;
- attrs: dataset name, split, N, dataset fingerprint, augment spec, seed, V, and the plan's
  `fingerprint`, a sha256 of everything above. Every teacher cache records the fingerprint of the plan
  it replayed, and the distill stage refuses caches whose fingerprint is not the plan's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import paths
from pipeline.augment import AugmentConfig, plan_views
from pipeline.checkpoints import swap_in
from pipeline.config import UserError, build, check, to_dict
from pipeline.mix import STORED, MixConfig, MixPlan, plan_mix

PLAN_FORMAT = 1  # bump when the layout of views.zarr changes
PLAN_BLOCK = 65536  # samples planned (and stored per zarr chunk) at a time: bounds the planner's memory


@dataclass
class ViewsConfig:
    num_views: int = 8  # V, augmented views cached per training sample (the student replays view e mod V)
    seed: int = 0  # seed of the augmentation parameters (a pure function of seed, sample, view)
    augment: dict[str, Any] = field(default_factory=lambda: {"kind": "crop_flip", "pad": 2, "flip": True})
    mix: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})  # mixup / CutMix views (pipeline.mix)

    def __post_init__(self) -> None:
        check(1 <= self.num_views <= 4096, f"views.num_views = {self.num_views} must be between 1 and 4096")
        check(0 <= self.seed < 2**63, f"views.seed = {self.seed} must be in [0, 2^63)")
        build(AugmentConfig, self.augment, "views.augment")  # fail now, in one line, on a bad key
        build(MixConfig, self.mix, "views.mix")

    @property
    def augment_config(self) -> AugmentConfig:
        return build(AugmentConfig, self.augment, "views.augment")

    @property
    def mix_config(self) -> MixConfig:
        return build(MixConfig, self.mix, "views.mix")


@dataclass
class ViewPlan:
    aug: np.ndarray  # (N, V, P) int16 view parameters
    labels: np.ndarray  # (N,) int16
    attrs: dict[str, Any]  # dataset, split, num_samples, dataset_fingerprint, augment, seed, num_views, ...
    fingerprint: str  # sha256 hex of aug, labels, sizes and the defining attrs
    path: str | None = None  # where it was read from (for messages)
    sizes: np.ndarray | None = None  # (N, 2) int16 (height, width) each box was drawn on: files source only
    mix: MixPlan | None = None  # each view's partner, its crop, lambda and box (N, V, ...); None: no mixing

    @property
    def num_samples(self) -> int:
        return int(self.aug.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.aug.shape[1])

    @property
    def dataset_fingerprint(self) -> str:
        return self.attrs["dataset_fingerprint"]

    @property
    def augment(self) -> AugmentConfig:
        return build(AugmentConfig, self.attrs["augment"], "view plan augment")

    @property
    def mix_config(self) -> MixConfig:
        return build(MixConfig, self.attrs.get("mix", {}), "view plan mix")

    def unmixed(self) -> "ViewPlan":
        """This plan with its views unmixed: the very plan `views.mix.kind: none` gives (same crops, same
        fingerprint), whose caches FKD's approximation mixes (distill.mix_targets: fkd)."""
        if self.mix is None:
            return self
        attrs = {k: v for k, v in self.attrs.items() if k != "mix"}
        return ViewPlan(aug=self.aug, labels=self.labels, attrs=attrs, sizes=self.sizes, path=self.path,
                        fingerprint=plan_fingerprint(self.aug, self.labels, attrs, self.sizes))


def plan_fingerprint(aug: np.ndarray, labels: np.ndarray, attrs: dict[str, Any],
                     sizes: np.ndarray | None = None, mix: MixPlan | None = None) -> str:
    """sha256 of the plan: its defining attrs (canonical JSON), then aug, labels and (files) the image sizes as
    little-endian int16, then (mixing) the mix arrays in STORED order."""
    digest = hashlib.sha256()
    defining = {k: v for k, v in attrs.items() if k != "fingerprint"}
    digest.update(json.dumps(defining, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(aug, dtype="<i2").tobytes())
    digest.update(np.ascontiguousarray(labels, dtype="<i2").tobytes())
    if sizes is not None:
        digest.update(np.ascontiguousarray(sizes, dtype="<i2").tobytes())
    if mix is not None:
        for name, array in mix.stored().items():
            digest.update(np.ascontiguousarray(array, dtype=STORED[name]).tobytes())
    return digest.hexdigest()


def make_view_plan(cfg: ViewsConfig, data, block: int = PLAN_BLOCK) -> ViewPlan:
    """The plan for `data`: an ImageData (images (N, C, H, W), labels, name, split, fingerprint), or a FileData,
    whose boxes are drawn on each image's own size (`sizes`, stored in the plan) and whose decoder is part of the
    plan's identity.

    Samples are planned `block` at a time; the result does not depend on `block` (plan_views is a
    pure function of (seed, sample, view)), which the tests check.
    """
    n = len(data.labels)
    aug_cfg = cfg.augment_config
    sizes = data.sizes if data.source == "files" else None  # (N, 2): each file's (height, width)
    if sizes is not None:
        check(aug_cfg.kind != "crop_flip", "views.augment.kind = crop_flip pads and crops images of one size: "
                                           "data.source = files needs rrc_flip (or none)")
        height, width = data.image_size, data.image_size  # the views' size; boxes use each image's own
    else:
        height, width = int(data.images.shape[2]), int(data.images.shape[3])
    labels = np.asarray(data.labels)
    check(n == 0 or (labels.min() >= 0 and labels.max() < 2**15), "labels must fit in int16 for the view plan")
    views = np.arange(cfg.num_views)
    aug = np.empty((n, cfg.num_views, aug_cfg.num_params), dtype=np.int16)  # (N, V, P)
    mix_cfg, mixes = cfg.mix_config, []
    for start in range(0, n, block):
        samples = np.arange(start, min(n, start + block))
        source = (height, width) if sizes is None else (sizes[samples, 0], sizes[samples, 1])  # (n,) each
        aug[start:start + len(samples)] = plan_views(aug_cfg, cfg.seed, samples, views, *source)
        if mix_cfg.active:
            mixes.append(plan_mix(mix_cfg, cfg.seed, samples, views, n, (height, width)))
    mix = MixPlan.with_views({k: np.concatenate([m[k] for m in mixes]) for k in STORED}, aug) if mixes else None
    attrs = {
        "format_version": PLAN_FORMAT,
        "dataset": data.name,
        "split": data.split,
        "num_samples": n,
        "dataset_fingerprint": data.fingerprint,
        "image_size": [height, width],  # what models see
        "augment": to_dict(aug_cfg),
        "seed": cfg.seed,
        "num_views": cfg.num_views,
        "num_params": aug_cfg.num_params,
    }
    if mix is not None:  # only a mixing plan names its mix: a plain plan keeps the fingerprint it always had
        attrs["mix"] = to_dict(mix_cfg)
    if sizes is not None:
        from pipeline.data.files import decoder_identity

        attrs.update(source="files", decoder=decoder_identity())
        sizes = sizes.astype(np.int16)
    labels16 = labels.astype(np.int16)
    return ViewPlan(aug=aug, labels=labels16, attrs=attrs, sizes=sizes, mix=mix,
                    fingerprint=plan_fingerprint(aug, labels16, attrs, sizes, mix))


def write_view_plan(plan: ViewPlan, path: str | Path | None = None) -> bool:
    """Write `plan` to `path` (zarr v3); False (and nothing touched) when the same plan is already there.

    The new plan is written beside the old one and swapped in only once complete, so a failed or killed
    write never leaves a half plan behind, nor removes a good one.
    """
    import zarr

    path = Path(path or paths.view_plan())
    if path.exists():
        try:
            if open_view_plan(path).fingerprint == plan.fingerprint:
                return False
        except UserError:
            pass  # unreadable or stale: replace it
    tmp = path.with_name(path.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        n, v, p = plan.aug.shape
        rows = max(1, min(n, PLAN_BLOCK))
        root.create_array("aug", shape=(n, v, p), chunks=(rows, v, p), dtype="int16", fill_value=0,
                          dimension_names=("sample", "view", "param"))[...] = plan.aug
        root.create_array("labels", shape=(n,), chunks=(rows,), dtype="int16", fill_value=-1,
                          dimension_names=("sample",))[...] = plan.labels
        if plan.sizes is not None:
            root.create_array("sizes", shape=(n, 2), chunks=(rows, 2), dtype="int16", fill_value=0,
                              dimension_names=("sample", "side"))[...] = plan.sizes
        for name, array in (plan.mix.stored() if plan.mix is not None else {}).items():
            root.create_array(f"mix/{name}", shape=array.shape, chunks=(rows, *array.shape[1:]),
                              dtype=np.dtype(STORED[name]).newbyteorder("="), fill_value=0,
                              dimension_names=("sample", "view", "param")[:array.ndim])[...] = array
        root.attrs.update({**plan.attrs, "fingerprint": plan.fingerprint})
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write the view plan at {path} ({exc.strerror or exc}): "
                        f"make its folder writable") from None
    swap_in(tmp, path)
    return True


def open_view_plan(path: str | Path | None = None) -> ViewPlan:
    """Read the plan at `path` (default `paths.view_plan()`), checking its fingerprint."""
    import zarr

    path = Path(path or paths.view_plan())
    if not path.exists():
        raise UserError(f"view plan {path} not found: run python -m stages.plan_views")
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
        aug = np.asarray(root["aug"][...], dtype=np.int16)
        labels = np.asarray(root["labels"][...], dtype=np.int16)
        sizes = np.asarray(root["sizes"][...], dtype=np.int16) if attrs.get("source") == "files" else None
        mix = MixPlan.with_views({k: np.asarray(root[f"mix/{k}"][...], dtype=np.dtype(t).newbyteorder("="))
                                  for k, t in STORED.items()}, aug) if "mix" in attrs else None
        stored = attrs.pop("fingerprint")
    except Exception as exc:  # a foreign or damaged folder: one line, no traceback
        raise UserError(f"view plan {path} cannot be read ({type(exc).__name__}): "
                        f"delete it and rerun python -m stages.plan_views") from None
    fingerprint = plan_fingerprint(aug, labels, attrs, sizes, mix)
    if fingerprint != stored:
        raise UserError(f"view plan {path} does not match its recorded fingerprint (damaged?): "
                        f"delete it and rerun python -m stages.plan_views")
    return ViewPlan(aug=aug, labels=labels, attrs=attrs, fingerprint=fingerprint, path=str(path), sizes=sizes,
                    mix=mix)
