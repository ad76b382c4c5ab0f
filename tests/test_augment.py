"""Replayable augmentation: batched views equal a per-image reference, plans are pure functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.augment import AugmentConfig, apply_views, normalize, plan_views, views_of_image
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


def test_boxes_are_drawn_on_each_images_own_size():
    """Files at native resolution: one (height, width) per sample. Each sample's boxes are those a plan of that
    sample alone on its size would draw (so equal sizes give today's plan), and lie inside its own image."""
    cfg = AugmentConfig(kind="rrc_flip", scale_min=0.08, ratio_min=0.3)
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(20, 500, 300), rng.integers(20, 500, 300)
    plan = plan_views(cfg, 4, np.arange(300), np.arange(3), heights, widths)  # (300, 3, 5)
    for i in range(300):
        alone = plan_views(cfg, 4, np.array([i]), np.arange(3), int(heights[i]), int(widths[i]))
        assert np.array_equal(plan[i], alone[0]), i
    top, left, h, w = (plan[..., k].astype(int) for k in range(4))
    assert (h > 0).all() and (w > 0).all()
    assert (top + h <= heights[:, None]).all() and (left + w <= widths[:, None]).all()
    odd = plan_views(AugmentConfig(kind="rrc_flip", scale_min=0.9, ratio_min=0.3), 4, np.arange(2), np.arange(3),
                     np.array([30, 400]), np.array([400, 30]))  # no try fits: the largest centred box in the ratio
    assert odd[0, :, :4].tolist() == [[0, 150, 30, 100]] * 3 and odd[1, :, :4].tolist() == [[150, 0, 100, 30]] * 3
    same = plan_views(cfg, 4, np.arange(300), np.arange(3), np.full(300, 64), np.full(300, 48))
    assert np.array_equal(same, plan_views(cfg, 4, np.arange(300), np.arange(3), 64, 48))


@pytest.mark.parametrize("kind", ["rrc_flip", "none"])
def test_views_of_one_decoded_image_equal_the_batched_replay(kind):
    """A file source decodes an image once and cuts all its views from it: at the tensor source's size those
    views are the tensor source's, bit for bit."""
    cfg = AugmentConfig(kind=kind, scale_min=0.2)
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    plan = torch.from_numpy(plan_views(cfg, 2, np.arange(6), np.arange(4), 40, 40))  # (6, 4, P)
    for i in range(6):
        one = views_of_image(images[i], plan[i], cfg, 40)  # (4, 3, 40, 40)
        for v in range(4):
            assert torch.equal(one[v], apply_views(images, plan[:, v], cfg)[i]), (i, v)


def test_a_large_box_is_antialiased_when_cut_down_to_the_training_size():
    """A 1-pixel checkerboard cut down fourfold is flat grey when antialiased (one bilinear sample per output
    pixel would alias it into stripes), and a box larger than the view is cut down exactly as torchvision's
    antialiased resized_crop (RandomResizedCrop's transform) cuts it."""
    from torchvision.transforms.v2 import functional as TF

    board = ((torch.arange(128)[:, None] + torch.arange(128)[None, :]) % 2 * 255).to(torch.uint8)[None]
    cfg = AugmentConfig(kind="rrc_flip", flip=False)
    out = views_of_image(board.expand(3, 128, 128), torch.tensor([[0, 0, 128, 128, 0]]), cfg, 32)
    assert out.float().std() < 2 and abs(out.float().mean() - 127.5) < 2
    y, x = torch.meshgrid(torch.arange(300.0), torch.arange(400.0), indexing="ij")
    smooth = (127 + 100 * torch.sin(x / 9) * torch.cos(y / 13)).round().to(torch.uint8).expand(3, 300, 400)
    box = torch.tensor([[20, 50, 240, 300, 0]])
    ours = views_of_image(smooth, box, cfg, 64)[0]
    theirs = TF.resized_crop(smooth, 20, 50, 240, 300, [64, 64], antialias=True)
    assert torch.equal(ours, theirs)


def test_crop_flip_has_no_meaning_on_images_of_their_own_sizes():
    with pytest.raises(ValueError, match="rrc_flip or none"):
        views_of_image(torch.zeros(3, 50, 60, dtype=torch.uint8), torch.zeros(1, 3), AugmentConfig(), 32)


def test_normalize_and_bad_config():
    x = torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(normalize(x, (0.5,), (0.5,)), torch.ones(1, 1, 2, 2))
    with pytest.raises(UserError, match="augment.kind"):
        AugmentConfig(kind="mixup")
    with pytest.raises(UserError, match="augment.pad"):
        AugmentConfig(pad=-1)
