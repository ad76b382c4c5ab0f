"""Replayable augmentation: batched views equal a per-image reference, plans are pure functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import AugmentConfig, apply_views, normalize, plan_views
from pipeline.config import UserError


def reference_crop_flip(image: torch.Tensor, dx: int, dy: int, flip: int, pad: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    out = F.pad(image[None], (pad, pad, pad, pad))[0, :, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("pad, channels, size", [(2, 1, 28), (4, 3, 32), (0, 3, 32)])
def test_crop_flip_matches_per_image_reference(pad, channels, size):
    cfg = AugmentConfig(kind="crop_flip", pad=pad)
    images = torch.randint(0, 256, (16, channels, size, size), dtype=torch.uint8)
    params = plan_views(cfg, 3, np.arange(16), np.array([0, 1]), size, size)  # (16, 2, 3)
    for v in range(2):
        out = apply_views(images, torch.from_numpy(params[:, v]), cfg)
        assert out.dtype == torch.uint8 and out.shape == images.shape
        for i in range(16):
            dx, dy, flip = params[i, v].tolist()
            assert 0 <= dx <= 2 * pad and 0 <= dy <= 2 * pad
            assert torch.equal(out[i], reference_crop_flip(images[i], dx, dy, flip, pad))


def test_plan_is_a_pure_function_of_seed_sample_and_view():
    cfg = AugmentConfig(kind="crop_flip", pad=2)
    full = plan_views(cfg, 7, np.arange(1000), np.arange(4), 28, 28)
    part = plan_views(cfg, 7, np.arange(300, 400), np.array([2, 3]), 28, 28)
    assert np.array_equal(full[300:400, 2:4], part)
    assert not np.array_equal(full, plan_views(cfg, 8, np.arange(1000), np.arange(4), 28, 28))
    # the draws are spread: every offset and both flips occur, roughly uniformly
    assert set(np.unique(full[..., 0])) == set(range(5)) and 0.45 < full[..., 2].mean() < 0.55


def test_resized_crop_boxes_are_inside_the_image_and_full_box_is_identity():
    cfg = AugmentConfig(kind="rrc_flip", scale_min=0.2)
    params = plan_views(cfg, 0, np.arange(500), np.arange(2), 32, 40)  # (500, 2, 5)
    top, left, h, w = (params[..., k] for k in range(4))
    assert (h > 0).all() and (w > 0).all() and (top + h <= 32).all() and (left + w <= 40).all()
    images = torch.randint(0, 256, (2, 3, 32, 40), dtype=torch.uint8)
    whole = torch.tensor([[0, 0, 32, 40, 0], [0, 0, 32, 40, 1]], dtype=torch.int16)
    out = apply_views(images, whole, cfg)
    assert (out[0].int() - images[0].int()).abs().max() <= 1
    assert (out[1].int() - images[1].flip(-1).int()).abs().max() <= 1


def test_normalize_and_bad_config():
    x = torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(x, (0.5,), (0.5,)), torch.ones(1, 1, 2, 2))
    with pytest.raises(UserError, match="augment.kind"):
        AugmentConfig(kind="mixup")
    with pytest.raises(UserError, match="augment.pad"):
        AugmentConfig(pad=-1)
