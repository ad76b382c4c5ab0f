"""The view plan: a pure function of (seed, sample, view), stored with a fingerprint, refused when damaged."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

from bench.cache_io import synthetic_data
from pipeline.augment import apply_views, plan_views
from pipeline.config import UserError, build
from pipeline.views import ViewsConfig, make_view_plan, open_view_plan, write_view_plan
from stages import plan_views as plan_stage


@pytest.fixture(scope="module")
def data():
    return synthetic_data(150, seed=3)


@pytest.mark.parametrize("augment", [{"kind": "crop_flip", "pad": 2, "flip": True},
                                     {"kind": "rrc_flip", "scale_min": 0.3}, {"kind": "none"}])
def test_plan_shape_and_labels(data, augment):
    plan = make_view_plan(ViewsConfig(num_views=3, seed=1, augment=augment), data)
    p = {"crop_flip": 3, "rrc_flip": 5, "none": 1}[augment["kind"]]
    assert plan.aug.shape == (150, 3, p) and plan.aug.dtype == np.int16
    assert plan.labels.dtype == np.int16 and np.array_equal(plan.labels, data.labels.numpy())
    assert plan.attrs["dataset_fingerprint"] == data.fingerprint == plan.dataset_fingerprint
    assert (plan.num_samples, plan.num_views) == (150, 3)
    assert plan.attrs["augment"]["kind"] == augment["kind"] and plan.augment.kind == augment["kind"]


def test_plan_does_not_depend_on_how_samples_are_split(data):
    cfg = ViewsConfig(num_views=4, seed=7)
    full = make_view_plan(cfg, data)
    for block in (1, 7, 64, 10_000):  # planner block size
        other = make_view_plan(cfg, data, block=block)
        assert np.array_equal(other.aug, full.aug) and other.fingerprint == full.fingerprint
    # a subset of samples (any order) and of views is the matching slice of the full plan
    rng = np.random.default_rng(0)
    samples, views = rng.permutation(150)[:40], np.array([3, 1])
    part = plan_views(cfg.augment_config, cfg.seed, samples, views, 28, 28)
    assert np.array_equal(part, full.aug[samples][:, views])
    # "workers": disjoint shards planned on threads, in any order, reassemble to the same plan
    shards = np.array_split(np.arange(150), 5)[::-1]
    out = np.zeros_like(full.aug)

    def work(idx):
        out[idx] = plan_views(cfg.augment_config, cfg.seed, idx, np.arange(4), 28, 28)

    threads = [threading.Thread(target=work, args=(s,)) for s in shards]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert np.array_equal(out, full.aug)


def test_fingerprint_tracks_what_defines_the_plan(data):
    base = make_view_plan(ViewsConfig(num_views=3), data)
    assert make_view_plan(ViewsConfig(num_views=3), data).fingerprint == base.fingerprint
    for cfg in (ViewsConfig(num_views=2), ViewsConfig(num_views=3, seed=1),
                ViewsConfig(num_views=3, augment={"kind": "crop_flip", "pad": 4})):
        assert make_view_plan(cfg, data).fingerprint != base.fingerprint
    assert make_view_plan(ViewsConfig(num_views=3), synthetic_data(150, seed=4)).fingerprint != base.fingerprint


def test_write_open_roundtrip(tmp_path, data):
    plan = make_view_plan(ViewsConfig(num_views=3), data)
    path = tmp_path / "views.zarr"
    assert write_view_plan(plan, path) is True
    back = open_view_plan(path)
    assert back.fingerprint == plan.fingerprint and back.path == str(path)
    assert np.array_equal(back.aug, plan.aug) and np.array_equal(back.labels, plan.labels)
    assert back.attrs == plan.attrs
    root = zarr.open_group(str(path), mode="r")
    assert root["aug"].metadata.dimension_names == ("sample", "view", "param")
    assert root["labels"].metadata.dimension_names == ("sample",)
    assert root.attrs["fingerprint"] == plan.fingerprint
    # same plan again: nothing rewritten
    stamp = (path / "zarr.json").stat().st_mtime_ns
    assert write_view_plan(plan, path) is False
    assert (path / "zarr.json").stat().st_mtime_ns == stamp
    # another plan replaces it whole, no temp folders left behind
    other = make_view_plan(ViewsConfig(num_views=2), data)
    assert write_view_plan(other, path) is True
    assert open_view_plan(path).fingerprint == other.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["views.zarr"]


def test_missing_and_damaged_plans_are_one_line_errors(tmp_path, data):
    with pytest.raises(UserError, match="run python -m stages.plan_views"):
        open_view_plan(tmp_path / "nope.zarr")
    path = tmp_path / "views.zarr"
    write_view_plan(make_view_plan(ViewsConfig(num_views=2), data), path)
    zarr.open_group(str(path), mode="r+")["aug"][0, 0, 0] += 1  # silently changed parameters
    with pytest.raises(UserError, match="fingerprint"):
        open_view_plan(path)
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(UserError, match="cannot be read"):
        open_view_plan(tmp_path / "junk.zarr")


def test_views_config_checks():
    with pytest.raises(UserError, match="num_views"):
        ViewsConfig(num_views=0)
    with pytest.raises(UserError, match="unknown key"):
        build(ViewsConfig, {"num_views": 2, "augment": {"kind": "crop_flip", "padding": 3}}, "views")
    with pytest.raises(UserError, match="unknown key"):
        build(ViewsConfig, {"views": 2}, "views")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replay_is_the_same_on_cuda(data):
    plan = make_view_plan(ViewsConfig(num_views=3, augment={"kind": "crop_flip", "pad": 2}), data)
    params = torch.from_numpy(plan.aug[:, 1])
    cpu = apply_views(data.images, params, plan.augment)
    gpu = apply_views(data.images.cuda(), params.cuda(), plan.augment).cpu()
    assert torch.equal(cpu, gpu)


def test_plan_views_stage(tmp_path, fashion_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {"data": {"name": "fashion_mnist", "root": str(fashion_root), "limit": 100},
              "views": {"num_views": 2, "seed": 5}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    runner = CliRunner()
    first = runner.invoke(plan_stage.main, [])
    assert first.exit_code == 0, first.output
    assert "written" in first.output
    plan = open_view_plan(Path("data/views.zarr"))
    assert plan.aug.shape == (100, 2, 3) and plan.attrs["seed"] == 5
    again = runner.invoke(plan_stage.main, [])
    assert again.exit_code == 0 and "unchanged" in again.output
    params["views"]["nmu_views"] = 3
    Path("params.yaml").write_text(yaml.safe_dump(params))
    bad = runner.invoke(plan_stage.main, [])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    lines = bad.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "nmu_views" in lines[0]
