"""Every shipped profile is a complete, valid params file: each stage's configs build from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cache import CacheConfig
from pipeline.config import build, load_params, section
from pipeline.data import DataConfig
from pipeline.dist import DistConfig
from pipeline.runs import run_names
from pipeline.pretraining import teacher_spec
from pipeline.views import ViewsConfig
from pipeline.runs import read_settings

ROOT = Path(__file__).parents[1]
PROFILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_profile_builds_every_config(path):
    params = load_params(path)
    build(DataConfig, section(params, "data"), "data")
    assert params["teachers"], "a profile needs at least one teacher"
    for name in params["teachers"]:
        teacher_spec(params, name)
    build(ViewsConfig, section(params, "views"), "views")
    build(CacheConfig, section(params, "cache"), "cache")
    assert {"nproc_per_node", "sync_bn"} <= set(section(params, "dist")), "dvc.yaml reads dist.nproc_per_node, dist.sync_bn"
    build(DistConfig, section(params, "dist"), "dist")
    runs = run_names(section(params, "distill"))
    assert "scratch" in runs  # every profile compares against the student trained from scratch
    if path.name in ("params.yaml", "gpu.yaml", "tiny.yaml"):  # the method comparisons; the others are recipes
        assert {"kd", "meal", "meal_coop", "meal_v2", "anc"} <= set(runs)
    for run in runs:
        settings = read_settings(params, None, None, None, False, run)
        assert settings.run_name == run
