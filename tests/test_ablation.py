"""scripts/ablation.py on tiny data: the pipeline's own stages per run x seed, scored on the validation split,
MEAL V2's official fine-tuning started from the same seed's scratch student."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).parents[1]


def tiny_ablation(tmp_path: Path, fashion_root):
    """scripts/ablation.py as a module, and a tiny profile (one teacher, 128 images, one epoch) in tmp_path."""
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "scripts" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    params = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    params["data"].update(root=str(fashion_root), limit=128)
    params["teachers"] = {"cnn": params["teachers"]["cnn"]}
    params["distill"]["epochs"] = 1
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(params))
    return ablation


def test_ablation_runs_each_seed_on_the_validation_split(tmp_path, fashion_root):
    ablation = tiny_ablation(tmp_path, fashion_root)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(ablation.main, ["--params", str(tmp_path / "tiny.yaml"), "--work", str(tmp_path / "w"),
                                                "--val-size", "64", "--seeds", "0,1", "--runs", "scratch,meal_v2_ft",
                                                "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["run"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"scratch", "meal_v2_ft"} and all(r["seeds"] == [0, 1] for r in rows.values())
    work = tmp_path / "w" / "profile"
    metrics = json.loads((work / "metrics" / "distill" / "scratch.json").read_text())
    for seed in (0, 1):
        assert metrics["test_acc"][seed] * 100 == rows["scratch"]["val_top1"][seed]
        ft = torch.load(work / "data" / "student" / "meal_v2_ft" / f"seed{seed}.pt", weights_only=False)
        assert ft["identity"]["data"]["val_size"] == 64 and ft["identity"]["student_init_sha256"]
        assert ft["identity"]["distill"]["seed"] == seed
    assert "| scratch |" in result.output
    bad = CliRunner().invoke(ablation.main, ["--params", str(tmp_path / "tiny.yaml"), "--runs", "nope"])
    assert bad.exit_code != 0 and "nope" in bad.output


def test_ablation_trains_the_same_runs_from_topk_caches_of_the_same_teachers(tmp_path, fashion_root):
    ablation = tiny_ablation(tmp_path, fashion_root)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(ablation.main, ["--params", str(tmp_path / "tiny.yaml"), "--work", str(tmp_path / "w"),
                                                "--val-size", "64", "--seeds", "0", "--runs", "kd", "--topk", "2",
                                                "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {r["run"] for r in json.loads(out.read_text())["rows"]} == {"kd", "kd (top-2)"}
    compact = tmp_path / "w" / "topk2" / "data"
    assert (compact / "teachers").is_symlink() and not (compact / "cache").is_symlink()  # its own top-k caches
    from pipeline.cache import open_cache

    with open_cache(compact / "cache" / "cnn.zarr") as cache:
        assert cache.layout.topk == 2


def test_ablation_trains_the_same_runs_on_mixed_views_and_fkd_from_the_unmixed_caches(tmp_path, fashion_root):
    ablation = tiny_ablation(tmp_path, fashion_root)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(ablation.main, ["--params", str(tmp_path / "tiny.yaml"), "--work", str(tmp_path / "w"),
                                                "--val-size", "64", "--seeds", "0", "--runs", "kd", "--mix", "cutmix",
                                                "--fkd", "kd", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {r["run"] for r in json.loads(out.read_text())["rows"]} == {"kd", "kd (cutmix)", "kd_fkd (cutmix)"}
    data = tmp_path / "w" / "mix_cutmix" / "data"
    assert not (data / "views.zarr").is_symlink() and (data / "cache" / "unmixed").is_symlink()
    from pipeline.views import open_view_plan

    plan = open_view_plan(data / "views.zarr")
    assert plan.mix_config.kind == "cutmix"
    assert plan.unmixed().fingerprint == open_view_plan(tmp_path / "w" / "profile" / "data" / "views.zarr").fingerprint
    fkd = torch.load(data / "student" / "kd_fkd" / "seed0.pt", weights_only=False)
    assert fkd["identity"]["distill"]["mix_targets"] == "fkd"
    bad = CliRunner().invoke(ablation.main, ["--params", str(tmp_path / "tiny.yaml"), "--fkd", "kd"])
    assert bad.exit_code != 0 and "--mix" in bad.output
