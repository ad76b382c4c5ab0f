"""The teacher cache: equal to the live teacher (oracle), deterministic, resumable, never destroys work.

Tiny setup: 96 synthetic 1x28x28 images, V = 3 views, a random student_cnn (width 0.25) saved as a
teacher checkpoint, chunks of 32 rows (3 chunks) and forward batches of 40 pairs (not aligned with chunks).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner

from bench.cache_io import fake_teacher, synthetic_data
from pipeline import paths
from pipeline.cache import store as cache_store
from pipeline.align import AlignConfig, align_all
from pipeline.augment import apply_views, normalize
from pipeline.cache import CacheConfig, TeacherCache, open_cache, rerun_hint, validate_caches
from pipeline.cache.write import cache_teacher
from pipeline.dist import World
from pipeline.models import load_teacher
from pipeline.config import UserError, build
from pipeline.views import ViewsConfig, make_view_plan
from stages import cache_teachers as cache_stage
from helpers import one_line_error

N, V = 96, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = synthetic_data(N, seed=0)
    plan = make_view_plan(ViewsConfig(num_views=V), data)
    ckpt = fake_teacher(root / "teachers" / "t.pt", data, width=0.25, seed=0)
    return {"root": root, "data": data, "plan": plan, "ckpt": ckpt}


def config(fmt: str = "zarr", **kw) -> CacheConfig:
    return CacheConfig(**{"format": fmt, "chunk_rows": 32, "batch_size": 40, **kw})


def build_cache(setup, out: Path, fmt: str = "zarr", ckpt: Path | None = None, plan=None, overwrite: bool = False,
                on_chunk=None, repair: bool = False, **cfg):
    """Cache the fixture's teacher (or `ckpt`) into `out`; `cfg` overrides CacheConfig fields."""
    return cache_teacher(ckpt or setup["ckpt"], out, plan or setup["plan"], setup["data"], config(fmt, **cfg),
                         progress=False, overwrite=overwrite, on_chunk=on_chunk, repair=repair)


def arrays(path: Path) -> dict[str, np.ndarray]:
    with open_cache(path) as c:
        out = {name: np.asarray(c.array(name)[...]) for name in ["logits", *c.blocks]}
        out["done"] = np.asarray(c._store.done())
    return out


def tree_digest(path: Path) -> str:
    """A hash of every file (name and bytes) under a store: proves nothing was touched."""
    h = hashlib.sha256()
    for f in sorted([path] if path.is_file() else path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path.parent)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- oracle and layout


@pytest.mark.parametrize("fmt,kind", [("zarr", "channel"), ("zarr", "meal"), ("h5", "channel"), ("h5", "meal")])
def test_cache_equals_the_live_teacher_on_the_replayed_view(setup, tmp_path, fmt, kind):
    out = tmp_path / f"t.{fmt}"
    align = {"kind": kind, "length": 16}
    build_cache(setup, out, fmt, align=align)
    cache = open_cache(out)
    assert cache.complete and cache.format == fmt
    assert (cache.num_samples, cache.num_views, cache.num_classes) == (N, V, 10)
    assert cache.blocks == ["block1", "block2", "block3"] and cache.dims == {b: 16 for b in cache.blocks}
    assert cache.attrs["align"] == align and cache.attrs["view_plan_fingerprint"] == setup["plan"].fingerprint

    model, _ = load_teacher(setup["ckpt"])
    data, plan = setup["data"], setup["plan"]
    rng = np.random.default_rng(1)
    rows, views = rng.integers(0, N, 24), rng.integers(0, V, 24)  # random (sample, view) pairs
    x = apply_views(data.images[rows], torch.from_numpy(plan.aug[rows, views]), plan.augment)
    with torch.no_grad():
        logits, feats = model(normalize(x, data.mean, data.std))
    live = [logits.numpy(), *[f.numpy() for f in align_all(feats, AlignConfig(**align))]]
    for name, want in zip(["logits", *cache.blocks], live):
        got = np.asarray(cache.array(name)[...])[rows, views]  # (24, W) float16
        rounded = want.astype(np.float16)  # the live value in fp16
        # within fp16 rounding: at most one fp16 step apart (the batch differs, so fp32 sums may differ
        # in their last bits and round the other way), and nearly always exactly the rounded live value
        step = np.spacing(np.abs(rounded)).astype(np.float32)
        assert np.all(np.abs(got.astype(np.float32) - rounded.astype(np.float32)) <= step), name
        assert np.mean(got == rounded) > 0.95, name
    slab = cache.view_slab(2)
    assert set(slab) == {"logits", "block1", "block2", "block3"}
    assert slab["logits"].shape == (N, 10) and slab["block1"].shape == (N, 16)
    assert all(a.dtype == np.float16 for a in slab.values())
    assert np.array_equal(slab["logits"], np.asarray(cache.array("logits")[...])[:, 2])
    cache.close()


def test_store_layout_attrs_and_dimension_names(setup, tmp_path):
    out = tmp_path / "t.zarr"
    build_cache(setup, out)
    root = zarr.open_group(str(out), mode="r")
    assert root["logits"].metadata.dimension_names == ("sample", "view", "class")
    assert root["features/block2"].metadata.dimension_names == ("sample", "view", "feature")
    assert root["done"].metadata.dimension_names == ("chunk",)
    assert root["logits"].dtype == np.float16 and root["logits"].chunks == (32, 1, 10)
    assert root["done"].shape == (3,) and root["done"].dtype == np.uint8
    attrs = dict(root.attrs)
    for key in ("format_version", "teacher", "arch", "model_kwargs", "checkpoint_sha256", "view_plan_fingerprint",
                "dataset_fingerprint", "dataset", "num_classes", "num_samples", "num_views", "blocks", "dims",
                "align", "dtype", "software_version", "complete"):
        assert key in attrs, key
    assert attrs["complete"] is True and attrs["teacher"] == "t" and attrs["dtype"] == "float16"

    h5 = tmp_path / "t.h5"
    build_cache(setup, h5, "h5")
    import h5py

    with h5py.File(h5, "r") as f:
        assert [d.label for d in f["logits"].dims] == ["sample", "view", "class"]
        assert [d.label for d in f["features/block1"].dims] == ["sample", "view", "feature"]
        assert f["logits"].chunks == (32, 1, 10)
    assert open_cache(h5).attrs == {**attrs, "complete": True}  # same attrs through the same API


# ---------------------------------------------------------------- determinism and resume


def test_two_runs_and_both_formats_give_identical_arrays(setup, tmp_path):
    a, b, h = tmp_path / "a.zarr", tmp_path / "b.zarr", tmp_path / "a.h5"
    build_cache(setup, a)
    build_cache(setup, b)
    build_cache(setup, h, "h5")
    first, second, third = arrays(a), arrays(b), arrays(h)
    for name in first:
        assert first[name].tobytes() == second[name].tobytes() == third[name].tobytes(), name


class Boom(RuntimeError):
    pass


# ---------------------------------------------------------------- refusals that keep existing work


def test_existing_cache_from_another_checkpoint_plan_or_align_is_refused_untouched(setup, tmp_path):
    out = tmp_path / "t.zarr"
    build_cache(setup, out)
    before = tree_digest(out)
    other_ckpt = fake_teacher(tmp_path / "other" / "t.pt", setup["data"], seed=9)
    other_plan = make_view_plan(ViewsConfig(num_views=V, seed=1), setup["data"])
    for kwargs, what in (({"ckpt": other_ckpt}, "checkpoint"), ({"plan": other_plan}, "view plan"),
                         ({"align": {"kind": "meal", "length": 32}}, "align spec")):
        with pytest.raises(UserError, match=f"made with different.*{what}.*pass --overwrite to replace it, or delete it"):
            build_cache(setup, out, **kwargs)
        assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "t.zarr", "t.zarr.lock"]  # the writer lock stays, empty


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_overwrite_swaps_in_only_a_finished_store(setup, tmp_path, fmt):
    out = tmp_path / f"t.{fmt}"
    build_cache(setup, out, fmt)
    before = tree_digest(out)
    other_ckpt = fake_teacher(tmp_path / "other" / "t.pt", setup["data"], seed=9)

    def fail(k):
        raise Boom("killed")

    with pytest.raises(Boom):
        build_cache(setup, out, fmt, ckpt=other_ckpt, overwrite=True, on_chunk=fail)
    assert tree_digest(out) == before and open_cache(out).complete  # the old cache is still whole
    staging = out.with_name(out.name + ".new")
    assert staging.exists()
    written = []
    build_cache(setup, out, fmt, ckpt=other_ckpt, overwrite=True, on_chunk=written.append)
    assert len(written) == 2  # the interrupted overwrite resumed in its staging store
    assert not staging.exists() and not out.with_name(out.name + ".old").exists()
    with open_cache(out) as cache:
        assert cache.complete
        model, ckpt = load_teacher(other_ckpt)
        from pipeline.checkpoints import sha256_file

        assert cache.attrs["checkpoint_sha256"] == sha256_file(other_ckpt)


def test_missing_or_foreign_checkpoint_and_unwritable_path(setup, tmp_path):
    out = tmp_path / "t.zarr"
    with pytest.raises(UserError, match="not found"):
        build_cache(setup, out, ckpt=tmp_path / "nope.pt")
    other_data = synthetic_data(N, seed=5)  # another dataset, same shapes
    foreign = fake_teacher(tmp_path / "foreign.pt", other_data)
    with pytest.raises(UserError, match="trained on other data"):
        build_cache(setup, out, ckpt=foreign)
    assert not out.exists()
    (tmp_path / "file").write_text("a file where a folder should be")
    with pytest.raises(UserError, match="cannot write the cache"):
        build_cache(setup, tmp_path / "file" / "t.zarr")
    with pytest.raises(UserError, match="cannot write the cache"):
        build_cache(setup, tmp_path / "file" / "t.h5", "h5")
    with pytest.raises(UserError, match="was made from another dataset"):
        cache_teacher(setup["ckpt"], out, setup["plan"], other_data, config(), progress=False)


def test_foreign_files_at_the_output_path_are_kept_unless_overwrite(setup, tmp_path):
    for out in (tmp_path / "t.h5", tmp_path / "t.zarr"):
        if out.suffix == ".h5":
            out.write_bytes(b"someone's notes")
        else:
            (out / "sub").mkdir(parents=True)
            (out / "sub" / "notes.txt").write_text("keep me")
        before = tree_digest(out)
        with pytest.raises(UserError, match="cannot be read as a teacher cache .* pass --overwrite"):
            build_cache(setup, out, out.suffix[1:])
        assert tree_digest(out) == before
        build_cache(setup, out, out.suffix[1:], overwrite=True)
        assert open_cache(out).complete


def test_config_checks():
    with pytest.raises(UserError, match="not available for format h5"):
        CacheConfig(format="h5", codec="zstd")
    with pytest.raises(UserError, match="alignment kind"):
        CacheConfig(align={"kind": "max", "length": 4})
    with pytest.raises(UserError, match="unknown key"):
        build(CacheConfig, {"fromat": "zarr"}, "cache")
    for codec in ("zstd", "blosc"):
        CacheConfig(codec=codec)


@pytest.mark.parametrize("codec", ["zstd", "blosc"])
def test_compressed_stores_read_back_the_same(setup, tmp_path, codec):
    build_cache(setup, tmp_path / "raw.zarr")
    build_cache(setup, tmp_path / "c.zarr", codec=codec)
    got, want = arrays(tmp_path / "c.zarr"), arrays(tmp_path / "raw.zarr")
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)


# ---------------------------------------------------------------- validate_caches (the distill stage's guard)


def test_validate_caches(setup, tmp_path):
    data, plan = setup["data"], setup["plan"]
    a, b = tmp_path / "a.zarr", tmp_path / "b.h5"
    build_cache(setup, a)
    build_cache(setup, b, "h5")
    opened = validate_caches([a, b], plan, data.fingerprint, 10, checkpoint_path=lambda t: setup["ckpt"])
    assert all(isinstance(c, TeacherCache) for c in opened)

    with pytest.raises(UserError, match="view plan"):
        validate_caches([a], make_view_plan(ViewsConfig(num_views=V, seed=3), data), data.fingerprint, 10)
    with pytest.raises(UserError, match="view plan .* another dataset"):
        validate_caches([a], plan, "0" * 64, 10)
    with pytest.raises(UserError, match="has 10 classes but the data has 7"):
        validate_caches([a], plan, data.fingerprint, 7)
    meal = tmp_path / "meal.zarr"
    build_cache(setup, meal, align={"kind": "meal", "length": 32})
    with pytest.raises(UserError, match="disagree on the align spec"):
        validate_caches([a, meal], plan, data.fingerprint, 10)
    with pytest.raises(UserError, match="no teacher caches"):
        validate_caches([], plan, data.fingerprint, 10)

    # the teacher was retrained after its cache was made
    changed = tmp_path / "teachers" / "t.pt"
    fake_teacher(changed, data, seed=4)
    with pytest.raises(UserError, match=r"changed since cache .* --teacher t --overwrite"):
        validate_caches([a], plan, data.fingerprint, 10, checkpoint_path=lambda t: changed)
    validate_caches([a], plan, data.fingerprint, 10, check_checkpoints=False, checkpoint_path=lambda t: changed)
    validate_caches([a], plan, data.fingerprint, 10, checkpoint_path=lambda t: tmp_path / "gone.pt")


def test_open_cache_errors(tmp_path):
    with pytest.raises(UserError, match="not found: run python -m stages.cache_teachers --teacher x"):
        open_cache(tmp_path / "x.zarr")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="cannot be read"):
        open_cache(tmp_path / "junk.h5")


# ---------------------------------------------------------------- store formats: one registered class each


@pytest.fixture
def zarr2():
    """A store format registered for one test: zarr's class under another name and suffix, one writer only."""
    saved = dict(cache_store.FORMATS)

    @cache_store.register_format
    class Zarr2Store(cache_store.ZarrStore):
        name, label, suffixes, codecs, parallel_writers = "zarr2", "a zarr2 store", (".zarr2",), ("none",), False

    yield Zarr2Store
    cache_store.FORMATS.clear()
    cache_store.FORMATS.update(saved)


def test_a_store_format_is_one_registered_class(setup, tmp_path, zarr2):
    assert [cache_store.format_of(p) for p in ("c/t.zarr2", "c/t.zarr2.new", "c/t.h5.creating", "c/t.HDF5", "c/t")] \
        == ["zarr2", "zarr2", "h5", "h5", "zarr"]
    with pytest.raises(UserError, match="cache.codec = 'zstd' is not available for format zarr2: choose one of none$"):
        config("zarr2", codec="zstd")
    with pytest.raises(UserError, match="cache.format = 'parquet' is not one of zarr, h5, zarr2"):
        config("parquet")
    out = tmp_path / "t.zarr2"
    assert build_cache(setup, out, "zarr2")["chunks_written"] == 3
    with open_cache(out) as cache:
        assert cache.format == "zarr2" and cache.complete
    assert rerun_hint("t", "zarr2", repair=True) == "python -m stages.cache_teachers --teacher t --format zarr2 --repair"
    assert rerun_hint("t", "zarr") == "python -m stages.cache_teachers --teacher t"  # the default format
    with pytest.raises(UserError, match=r"a zarr2 store cannot be written by 2 processes \(format zarr2 has no "
                                        r"parallel writer\): write --format zarr, or run"):
        cache_teacher(setup["ckpt"], tmp_path / "u.zarr2", setup["plan"], setup["data"], config("zarr2"),
                      world=World(0, 2))
    with pytest.raises(TypeError, match="registered already"):
        cache_store.register_format(zarr2)
    with pytest.raises(TypeError, match="lacks .*create.*close"):
        cache_store.register_format(type("Half", (), {"name": "half", "suffixes": (".half",)}))


# ---------------------------------------------------------------- the click stage


@pytest.fixture
def stage_dir(tmp_path, fashion_root, monkeypatch):
    """tmp_path as the working directory: params, a view plan and a teacher checkpoint in place."""
    from pipeline.data import DataConfig, load_split
    from stages import plan_views as plan_stage

    monkeypatch.chdir(tmp_path)
    params = {"data": {"name": "fashion_mnist", "root": str(fashion_root), "limit": 64},
              "views": {"num_views": 2}, "cache": {"align": {"kind": "channel", "length": 8}, "chunk_rows": 16}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    assert CliRunner().invoke(plan_stage.main, []).exit_code == 0
    train = load_split(build(DataConfig, params["data"], "data"), "train")
    fake_teacher(paths.teacher_checkpoint("t"), train)
    return train


def invoke(*args: str):
    return CliRunner().invoke(cache_stage.main, ["--quiet", "--device", "cpu", *args])


def test_stage_writes_resumes_and_refuses(stage_dir):
    ok = invoke("--teacher", "t")
    assert ok.exit_code == 0, ok.output
    assert open_cache(paths.teacher_cache("t")).complete
    again = invoke("--teacher", "t")
    assert again.exit_code == 0 and "already complete" in again.output
    h5 = invoke("--teacher", "t", "--format", "h5", "--batch-size", "7")
    assert h5.exit_code == 0, h5.output
    assert arrays(paths.teacher_cache("t", "h5"))["logits"].tobytes() == arrays(paths.teacher_cache("t"))["logits"].tobytes()

    assert "teacher checkpoint data/teachers/nope.pt not found" in one_line_error(invoke("--teacher", "nope"))
    before = tree_digest(paths.teacher_cache("t"))
    fake_teacher(paths.teacher_checkpoint("t"), stage_dir, seed=3)  # retrained
    line = one_line_error(invoke("--teacher", "t"))
    assert "made with different checkpoint" in line and "--overwrite" in line
    assert tree_digest(paths.teacher_cache("t")) == before
    assert invoke("--teacher", "t", "--overwrite").exit_code == 0
    assert tree_digest(paths.teacher_cache("t")) != before


def test_stage_one_line_errors(stage_dir):
    import shutil

    shutil.move("data/views.zarr", "views-aside.zarr")
    assert "run python -m stages.plan_views" in one_line_error(invoke("--teacher", "t"))
    shutil.move("views-aside.zarr", "data/views.zarr")
    Path("data/cache").write_text("not a folder")
    assert "cannot write the cache" in one_line_error(invoke("--teacher", "t"))
    Path("data/cache").unlink()
    fake_teacher(paths.teacher_checkpoint("t"), synthetic_data(64, seed=1))
    assert "trained on other data" in one_line_error(invoke("--teacher", "t"))
    assert "cache.codec" in one_line_error(invoke("--teacher", "t", "--format", "h5", "--params", _params_with(codec="zstd")))


def _params_with(**cache) -> str:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["cache"].update(cache)
    Path("other.yaml").write_text(yaml.safe_dump(params))
    return "other.yaml"


# ---------------------------------------------------------------- the benchmark script runs


def test_bench_cache_io_runs(tmp_path):
    from bench.cache_io import main

    out = tmp_path / "bench.json"
    result = main(["--samples", "64", "--views", "2", "--repeats", "1", "--width", "0.25", "--batch-size", "32",
                   "--no-fashion-scale", "--cache", str(_tiny_cache(tmp_path)), "--out", str(out)])
    assert out.exists() and result["device"] == "cpu"
    assert result["stage"]["zarr_ratio"] > 0 and result["slab_reads"][0]["ratio"] > 0


def _tiny_cache(tmp_path: Path) -> Path:
    data = synthetic_data(40)
    plan = make_view_plan(ViewsConfig(num_views=2), data)
    out = tmp_path / "tiny.zarr"
    cache_teacher(fake_teacher(tmp_path / "tiny.pt", data), out, plan, data, config(), progress=False)
    return out


# ---------------------------------------------------------------- the storage plan


def test_the_plan_matches_the_written_store_and_a_store_that_cannot_fit_is_refused_unwritten(setup, tmp_path,
                                                                                            monkeypatch):
    import shutil as sh

    from pipeline.cache import plan as store_plans
    from pipeline.cache.write import block_channels

    out = tmp_path / "t.zarr"
    build_cache(setup, out)
    blocks = block_channels(load_teacher(setup["ckpt"])[0], setup["data"], torch.device("cpu"))
    plan = store_plans.store_plan("t", out, N, V, 10, dict(zip(blocks, config().align_config.lengths(len(blocks)))))
    with open_cache(out) as cache:
        written = {name: cache.array(name) for name in ["logits", *cache.blocks]}
        assert {("logits" if k == "logits" else f"features/{k}"): int(np.prod(a.shape)) * a.dtype.itemsize
                for k, a in written.items()} == {k: N * V * b for k, b in plan.arrays.items()}
    assert plan.pair_bytes == 2 * (10 + sum(config().align_config.lengths(3)))
    assert plan.total_bytes == N * V * plan.pair_bytes

    real = sh.disk_usage
    monkeypatch.setattr(store_plans.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=plan.total_bytes - 1))  # one byte short
    fresh = tmp_path / "u.zarr"
    with pytest.raises(UserError) as err:
        build_cache(setup, fresh)
    line = err.value.message
    assert f"the cache of t needs {store_plans.human(plan.total_bytes)} at {fresh}" in line and "\n" not in line
    assert "--plan" in line and not fresh.exists()  # refused before anything was written
    assert build_cache(setup, out)["chunks_written"] == 0  # a complete store needs no room
    monkeypatch.setattr(store_plans.shutil, "disk_usage", lambda p: real(p)._replace(free=plan.total_bytes))
    assert build_cache(setup, fresh)["chunks_written"] == 3  # exactly enough


def test_the_stage_prints_the_plan_of_every_teacher_before_any_is_trained(tiny_params):
    result = CliRunner().invoke(cache_stage.main, ["--plan"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    teachers = list(yaml.safe_load(tiny_params.read_text())["teachers"])
    assert [line.split(":")[0] for line in lines if not line.startswith(" ") and not line.startswith("all")] == teachers
    assert lines[-1].startswith(f"all {len(teachers)} store(s): ") and "free where they go" in lines[-1]
    assert "logits" in lines[1] and "bytes per (sample, view)" in lines[1]
    line = one_line_error(CliRunner().invoke(cache_stage.main, []))
    assert "give --teacher NAME" in line


# ---------------------------------------------------------------- the self-check that reruns the teacher


def test_recompute_passes_a_true_store_and_catches_other_views_and_other_weights(setup, tmp_path):
    from pipeline.cache.recompute import recompute_check

    out = tmp_path / "t.zarr"
    build_cache(setup, out)
    cpu = torch.device("cpu")
    good = recompute_check(out, setup["ckpt"], setup["plan"], setup["data"], 40, cpu)
    assert good.ok and len(good.pairs) == 40 and len(set(map(tuple, good.pairs.tolist()))) == 40
    assert set(good.worst) == {"logits", "features/block1", "features/block2", "features/block3"}
    assert max(good.worst.values()) < 2e-3
    # views from another augmentation (another plan seed): the checksums pass, the meaning does not
    other_views = tmp_path / "views.zarr"
    build_cache(setup, other_views, plan=make_view_plan(ViewsConfig(num_views=V, seed=7), setup["data"]))
    bad = recompute_check(other_views, setup["ckpt"], setup["plan"], setup["data"], 40, cpu)
    assert not bad.ok and bad.worst["logits"] > 0.05 and {name for _, _, name, _ in bad.bad} >= {"logits"}
    # numbers from another checkpoint's weights
    ckpt2 = fake_teacher(tmp_path / "teachers" / "t.pt", setup["data"], width=0.25, seed=1)
    other_weights = tmp_path / "w.zarr"
    build_cache(setup, other_weights, ckpt=ckpt2)
    bad = recompute_check(other_weights, setup["ckpt"], setup["plan"], setup["data"], 40, cpu)
    assert not bad.ok and len(bad.bad) >= 40  # every pair, in some array
    assert recompute_check(out, setup["ckpt"], setup["plan"], setup["data"], 10_000, cpu).pairs.shape == (N * V, 2)


def test_the_stage_recomputes_and_exits_non_zero_naming_the_pairs(tiny_params):
    from stages import plan_views as plan_stage, pretrain as pretrain_stage

    for stage, args in ((pretrain_stage, ["--teacher", "lenet", "--quiet"]), (plan_stage, []),
                        (cache_stage, ["--teacher", "lenet", "--quiet"])):
        result = CliRunner().invoke(stage.main, args)
        assert result.exit_code == 0, result.output
    ok = CliRunner().invoke(cache_stage.main, ["--teacher", "lenet", "--verify", "--recompute", "16"])
    assert ok.exit_code == 0, ok.output
    assert "16 random cached (sample, view) pairs recomputed, all within tolerance" in ok.output
    assert "logits" in ok.output and "largest relative error" in ok.output
    params = yaml.safe_load(tiny_params.read_text())
    params["pretrain"]["seed"] = 1  # the same teacher retrained from another seed: other weights behind the store
    tiny_params.write_text(yaml.safe_dump(params, sort_keys=False))
    assert CliRunner().invoke(pretrain_stage.main, ["--teacher", "lenet", "--quiet", "--restart"]).exit_code == 0
    bad = CliRunner().invoke(cache_stage.main, ["--teacher", "lenet", "--verify", "--recompute", "16"])
    assert bad.exit_code != 0 and "largest relative error" in bad.output  # the report, then the one error line
    line = bad.output.strip().splitlines()[-1]
    assert line.startswith("Error: cache data/cache/lenet.zarr does not hold what teacher lenet computes")
    assert "of 16 pairs differ, e.g. sample " in line and "--overwrite" in line
    assert "--recompute N checks a written store" in one_line_error(
        CliRunner().invoke(cache_stage.main, ["--teacher", "lenet", "--recompute", "4"]))


# ---------------------------------------------------------------- top-k soft labels


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_topk_targets_are_the_full_softmax_on_the_kept_classes_and_the_leftover_as_chosen(setup, tmp_path):
    from pipeline.cache.plan import store_plan
    from pipeline.cache.recompute import recompute_check

    full, top = tmp_path / "full.zarr", tmp_path / "top.zarr"
    build_cache(setup, full)
    build_cache(setup, top, logits="topk", topk=3)
    with open_cache(top) as cache:
        assert cache.layout.topk == 3 and cache.attrs["topk"] == 3
        stored = {name: cache.array(name) for name in cache.layout.widths()}
        assert stored["topk/classes"].dtype == np.uint16 and stored["topk/logits"].shape == (N, V, 3)
        sizes = {name: int(np.prod(a.shape)) * a.dtype.itemsize for name, a in stored.items()}
        plan = store_plan("t", top, N, V, 10, dict(zip(cache.blocks, cache.layout.feature_lengths)), 3)
        assert sizes == {name: N * V * b for name, b in plan.arrays.items()}  # the plan is the written store
        spread = cache.view_slab(1, ["logits"])["logits"]  # (N, C) dense
    with open_cache(full) as cache:
        z = cache.view_slab(1, ["logits"])["logits"]  # the same teacher's full fp16 logits
    with open_cache(top, leftover="renormalize") as cache:
        renorm = cache.view_slab(1, ["logits"])["logits"]
    p, q, r = softmax(z), softmax(spread), softmax(renorm)
    kept = np.argsort(-z.astype(np.float32), axis=1, kind="stable")[:, :3]  # (N, 3)
    p_kept = np.take_along_axis(p, kept, axis=1)
    np.testing.assert_allclose(np.take_along_axis(q, kept, axis=1), p_kept, rtol=2e-2, atol=2e-4)  # exact but fp16
    others = np.ones_like(p, dtype=bool)
    np.put_along_axis(others, kept, False, axis=1)
    leftover = 1 - p_kept.sum(axis=1, keepdims=True)  # (N, 1)
    np.testing.assert_allclose(q[others].reshape(N, 7), np.broadcast_to(leftover / 7, (N, 7)), rtol=5e-2, atol=2e-4)
    np.testing.assert_allclose(np.take_along_axis(r, kept, axis=1), p_kept / p_kept.sum(axis=1, keepdims=True),
                               rtol=2e-2, atol=2e-4)
    assert (r[others] < 1e-10).all() and np.array_equal(q.argmax(1), p.argmax(1))
    assert recompute_check(top, setup["ckpt"], setup["plan"], setup["data"], 30, torch.device("cpu")).ok
    from pipeline.cache import soft_labels

    frame, whole = soft_labels(top, top_k=3, plan=setup["plan"]), soft_labels(full, top_k=3, plan=setup["plan"])
    assert (frame["top1_class"] == whole["top1_class"]).all()  # the pandas face reads the compact form too
    np.testing.assert_allclose(frame["top1_prob"], whole["top1_prob"], rtol=2e-2)
    # the acceptance's figure: 1,000 classes, k = 5, three blocks of 32
    assert store_plan("t", top, 1, 1, 1000, {"b1": 32, "b2": 32, "b3": 32}, 5).pair_bytes == 214  # <= 240
    assert store_plan("t", top, 1, 1, 1000, {"b1": 32, "b2": 32, "b3": 32}).pair_bytes == 2192  # full logits
    with pytest.raises(UserError, match="cache.logits = 'top5' is not one of full, topk"):
        config(logits="top5")


def test_distill_trains_from_topk_caches(tiny_params):
    """The stages end to end with cache.logits: topk (k = 2 of 10): the caches are the compact form and KD and
    MEAL V2 train from them."""
    from stages import distill as distill_stage

    params = yaml.safe_load(tiny_params.read_text())
    params["cache"].update(logits="topk", topk=2)
    params["distill"].update(epochs=1, seeds=[0], runs={"kd": {"method": "kd"}, "meal_v2": {"method": "meal_v2"}})
    tiny_params.write_text(yaml.safe_dump(params, sort_keys=False))
    from helpers import build_tiny_pipeline

    build_tiny_pipeline(params)
    for name in params["teachers"]:
        with open_cache(paths.teacher_cache(name)) as cache:
            assert cache.layout.topk == 2 and "logits" not in cache.layout.widths()
    for run in ("kd", "meal_v2"):
        result = CliRunner().invoke(distill_stage.main, ["--run", run, "--quiet", "--device", "cpu"])
        assert result.exit_code == 0, result.output
