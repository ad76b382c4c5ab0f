"""soft_labels / summary / the inspect stage, checked against direct numpy computations on the cached logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from bench.cache_io import fake_teacher, synthetic_data
from pipeline.cache import CacheConfig, open_cache
from pipeline.cache.write import cache_teacher
from pipeline.config import UserError
from pipeline.cache.frame import format_summary, summary
from pipeline.views import ViewsConfig, make_view_plan, write_view_plan
from stages import inspect as inspect_stage

N, V = 80, 3
BASE_COLUMNS = ["sample", "view", "teacher", "label", "pred", "p_label", "p_max", "entropy", "margin", "correct",
                "top1_class", "top1_prob", "top2_class", "top2_prob", "top3_class", "top3_prob"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict:
    """Three random LeNet-4 teachers (their predictions vary) cached over a 3-view plan: two zarr, one h5."""
    root = tmp_path_factory.mktemp("inspect")
    data = synthetic_data(N, seed=2)
    plan = make_view_plan(ViewsConfig(num_views=V), data)
    write_view_plan(plan, root / "views.zarr")
    out = []
    for i, fmt in enumerate(("zarr", "zarr", "h5")):
        ckpt = fake_teacher(root / f"lenet{i}.pt", data, arch="lenet4", width=1.0, seed=i)
        path = root / f"lenet{i}.{fmt}"
        cache_teacher(ckpt, path, plan, data, CacheConfig(format=fmt, chunk_rows=32), progress=False)
        out.append(path)
    return {"root": root, "plan_path": root / "views.zarr", "plan": plan, "paths": out, "labels": data.labels.numpy()}


def logits_of(path: Path) -> np.ndarray:
    with open_cache(path) as c:
        return np.asarray(c.array("logits")[...], dtype=np.float32)  # (N, V, C)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_one_cache_gives_the_documented_columns(caches):
    df = soft_labels_one(caches)
    assert list(df.columns) == BASE_COLUMNS
    assert len(df) == N * V
    assert (df["sample"].to_numpy() == np.repeat(np.arange(N), V)).all()
    assert (df["view"].to_numpy() == np.tile(np.arange(V), N)).all()
    assert (df.teacher == "lenet0").all()
    assert (df.label.to_numpy() == np.repeat(caches["labels"], V)).all()


def soft_labels_one(caches, **kw) -> pd.DataFrame:
    from pipeline.cache import soft_labels  # the notebook import path of docs/design.md section 1

    return soft_labels(caches["paths"][0], plan=caches["plan_path"], **kw)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_values_agree_with_a_direct_computation(caches, temperature):
    df = soft_labels_one(caches, temperature=temperature, top_k=4)
    z = logits_of(caches["paths"][0])
    p = softmax(z / temperature).reshape(N * V, -1)  # rows in (sample, view) order
    labels = np.repeat(caches["labels"], V)
    pred = z.reshape(N * V, -1).argmax(1)
    assert (df.pred.to_numpy() == pred).all() and (df.correct.to_numpy() == (pred == labels)).all()
    np.testing.assert_allclose(df.p_max, p.max(1), rtol=1e-5)
    np.testing.assert_allclose(df.p_label, p[np.arange(N * V), labels], rtol=1e-5)
    np.testing.assert_allclose(df.entropy, -(p * np.log(p)).sum(1), rtol=1e-4, atol=1e-6)
    top = np.sort(p, 1)[:, ::-1]
    np.testing.assert_allclose(df.margin, top[:, 0] - top[:, 1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(df[[f"top{i}_prob" for i in range(1, 5)]].to_numpy(), top[:, :4], rtol=1e-5)
    assert (df.top1_class == df.pred).all()
    assert "top4_class" in df and "top5_class" not in df


def test_accuracy_over_the_views_matches_argmax_of_the_logits(caches):
    from pipeline.cache.frame import soft_labels

    df = soft_labels(caches["paths"], plan=caches["plan_path"])
    assert list(df.columns) == BASE_COLUMNS + ["ensemble_pred", "agrees_with_ensemble"]
    assert len(df) == N * V * 3 and list(df.teacher.cat.categories) == ["lenet0", "lenet1", "lenet2"]
    accuracy = df.groupby("teacher", observed=True).correct.mean()
    logits = [logits_of(p) for p in caches["paths"]]
    for name, z in zip(["lenet0", "lenet1", "lenet2"], logits):
        direct = (z.argmax(-1) == caches["labels"][:, None]).mean()  # over all samples and views
        assert accuracy[name] == pytest.approx(direct)
    ensemble = np.mean([softmax(z) for z in logits], axis=0).argmax(-1)  # (N, V)
    for t, z in enumerate(logits):
        rows = df[df.teacher == f"lenet{t}"]
        assert (rows.agrees_with_ensemble.to_numpy() == (z.argmax(-1) == ensemble).reshape(-1)).all()
    assert 0 < df.agrees_with_ensemble.mean() < 1  # the random teachers do disagree

    tables = summary(df)
    assert tables["teachers"].loc["ensemble", "accuracy"] == pytest.approx((ensemble == caches["labels"][:, None]).mean())
    for name in ("lenet0", "lenet1", "lenet2"):
        assert tables["teachers"].loc[name, "accuracy"] == pytest.approx(accuracy[name])
    agreement = tables["agreement"]
    assert np.allclose(np.diag(agreement), 1) and np.allclose(agreement, agreement.T)
    assert agreement.loc["lenet0", "lenet1"] == pytest.approx((logits[0].argmax(-1) == logits[1].argmax(-1)).mean())
    per_class = tables["per_class"]
    assert per_class.shape[1] == 3 and set(per_class.index) <= set(range(10))
    text = format_summary(tables)
    assert "accuracy per class" in text and "agreement" in text


def test_refusals(caches, tmp_path):
    from pipeline.cache.frame import soft_labels

    other = make_view_plan(ViewsConfig(num_views=V, seed=9), synthetic_data(N, seed=2))
    with pytest.raises(UserError, match="another view plan"):
        soft_labels(caches["paths"][0], plan=other)
    with pytest.raises(UserError, match="temperature"):
        soft_labels(caches["paths"][0], plan=caches["plan"], temperature=0)
    with pytest.raises(UserError, match="not found"):
        soft_labels(tmp_path / "none.zarr", plan=caches["plan"])


def test_inspect_stage_prints_and_plots(caches, tmp_path):
    runner = CliRunner()
    plots = tmp_path / "plots"
    args = [*map(str, caches["paths"]), "--plan", str(caches["plan_path"]), "--temperature", "2",
            "--plots", str(plots), "--csv", str(tmp_path / "rows.csv")]
    result = runner.invoke(inspect_stage.main, args)
    assert result.exit_code == 0, result.output
    assert "per teacher" in result.output and "ensemble" in result.output and "teacher agreement" in result.output
    assert sorted(p.name for p in plots.iterdir()) == ["accuracy.png", "agreement.png", "entropy.png",
                                                       "per_class_accuracy.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.iterdir())
    assert len(pd.read_csv(tmp_path / "rows.csv")) == N * V * 3

    missing = runner.invoke(inspect_stage.main, [str(tmp_path / "none.zarr"), "--plan", str(caches["plan_path"])])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    lines = missing.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "not found" in lines[0]
