"""The file source (pipeline.data.files): splits listed from an image folder or a list file, boxes planned on each
image's own size, pixels decoded batch by batch in DataLoader workers.

Oracles: the file source shows the very views the tensor source shows when both hold the same pixels; a cache
made from files equals the live teacher on the replayed views; a cache pass killed after a chunk resumes to the
bytes of an uninterrupted one. Every broken input ends in one line naming the file, or with
`data.bad_files: skip` is left out and counted. The stages run from files end to end on a generated folder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from bench.cache_io import fake_teacher
from pipeline import paths
from pipeline.augment import AugmentConfig, normalize
from pipeline.align import AlignConfig, align_all
from pipeline.cache import CacheConfig, open_cache
from pipeline.cache.write import cache_teacher
from pipeline.config import UserError
from pipeline.data import DataConfig, eval_views, load_split, resident, skipped_note, step_views
from pipeline.data.files import clear_listings, decode, file_views
from pipeline.models import load_teacher
from pipeline.views import ViewsConfig, make_view_plan, open_view_plan, write_view_plan

REPO = Path(__file__).resolve().parents[1]
RRC = {"kind": "rrc_flip", "scale_min": 0.25}

pytestmark = pytest.mark.usefixtures("one_thread")


def generate(out: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_image_folder.py"), "--out", str(out), "--classes",
                    "3", "--train-per-class", "12", "--test-per-class", "4", "--min-side", "40", "--max-side", "96",
                    "--grey-every", "5", "--workers", "1", *extra], check=True, capture_output=True)
    clear_listings()
    return out


def files_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(**{"name": "imagefolder", "root": str(root), "source": "files", "image_size": 32,
                         "workers": 1, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("files") / "gen")


# ---------------------------------------------------------------- listing and decoding


def test_a_split_is_its_files_labels_and_header_sizes(folder):
    train, test = load_split(files_cfg(folder), "train"), load_split(files_cfg(folder), "test")
    assert (len(train), len(test), train.num_classes, train.in_channels) == (36, 12, 3, 3)
    assert train.classes == ["c0000", "c0001", "c0002"] and train.labels.tolist() == [0, 1, 2] * 12  # round-robin
    for i in (0, 7, 35):
        with Image.open(train.path(i)) as img:
            assert tuple(train.sizes[i]) == (img.height, img.width)  # from the header
        assert decode(train.path(i)).shape == (3, *train.sizes[i])  # grey images come out RGB
    val = load_split(files_cfg(folder, val_size=6), "val")
    rest = load_split(files_cfg(folder, val_size=6), "train")
    assert len(val) == 6 and len(rest) == 30 and not set(val.files) & set(rest.files)
    assert train.fingerprint == load_split(files_cfg(folder), "train").fingerprint != rest.fingerprint


def test_a_test_split_from_a_list_file(tmp_path):
    root = generate(tmp_path / "g", "--test-layout", "list")
    test = load_split(files_cfg(root), "test")
    assert len(test) == 12 and test.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert all(f.startswith("test/c000") for f in test.files)
    listing = root / "test.txt"
    lines = listing.read_text().splitlines()
    listing.write_text("\n".join(lines[:-1] + [lines[-1].split()[0] + " 7"]) + "\n")
    clear_listings()
    assert "label 7 is outside 0..2" in error_of(lambda: load_split(files_cfg(root), "test"))
    listing.write_text("test/missing.jpg 0\n")
    clear_listings()
    assert "test/missing.jpg is neither in" in error_of(lambda: load_split(files_cfg(root), "test"))


def error_of(call) -> str:
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in err.value.message
    return err.value.message


def test_broken_inputs_end_in_one_line_naming_the_file_or_are_skipped_and_counted(tmp_path):
    root = generate(tmp_path / "g", "--bad")
    line = error_of(lambda: load_split(files_cfg(root), "train"))
    assert "train/zz_empty_class holds no images" in line
    (root / "train" / "zz_empty_class").rmdir()
    clear_listings()
    line = error_of(lambda: load_split(files_cfg(root), "train"))
    assert "zz_not_an_image.jpg" in line and "data.bad_files: skip" in line
    skipping = load_split(files_cfg(root, bad_files="skip"), "train")
    assert skipping.skipped == ["train/c0000/zz_not_an_image.jpg"] and len(skipping) == 37  # the cut one stays
    assert "train: 1 unreadable file(s) left out (data.bad_files: skip)" in skipped_note(skipping)
    cut = skipping.files.index("train/c0000/zz_truncated.jpg")
    aug = AugmentConfig(**RRC)
    params = torch.zeros(len(skipping), 5, dtype=torch.int16)
    params[:, 2:4] = torch.from_numpy(skipping.sizes)  # the whole image
    (x,) = step_views(skipping, None, [torch.tensor([cut])], params, aug, torch.device("cpu"))
    assert x.shape == (1, 3, 32, 32)  # decoded as far as it goes
    (root / "train" / "c0000" / "zz_not_an_image.jpg").unlink()
    clear_listings()
    strict = load_split(files_cfg(root), "train")
    with pytest.raises(UserError, match="cannot decode image .*zz_truncated.jpg "):
        list(step_views(strict, None, [torch.tensor([cut])], params, aug, torch.device("cpu")))
    shutil.rmtree(root / "test" / "c0002")
    clear_listings()
    assert "missing here: c0002" in error_of(lambda: load_split(files_cfg(root), "test"))
    assert "data.source = files reads an image folder" in error_of(lambda: DataConfig(source="files"))


# ---------------------------------------------------------------- the same views as the tensor source


def test_the_file_and_tensor_sources_show_the_same_views(tmp_path):
    """PNG files of the training size hold exactly the pixels the tensor source loads: every planned view, cut
    from one decode per image in worker processes, is the tensor source's view, bit for bit."""
    root = tmp_path / "png"
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 3)):
        for k in range(2):
            (root / split / f"k{k}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"k{k}" / f"{i}.png")
    tensors = load_split(DataConfig(name="imagefolder", root=str(root), image_size=32), "train")
    files = load_split(files_cfg(root, workers=2), "train")
    assert torch.equal(tensors.labels, files.labels)
    views = ViewsConfig(num_views=3, augment=RRC)
    memory_plan, file_plan = make_view_plan(views, tensors), make_view_plan(views, files)
    assert np.array_equal(memory_plan.aug, file_plan.aug)  # equal sizes: equal boxes
    steps = [torch.tensor([3, 0, 17]), torch.tensor([5]), torch.arange(19, 6, -1)]
    for v in range(3):
        params = torch.from_numpy(file_plan.aug[:, v])
        want = step_views(tensors, resident(tensors, torch.device("cpu")), steps, params, file_plan.augment,
                          torch.device("cpu"))
        got = step_views(files, None, steps, params, file_plan.augment, torch.device("cpu"))
        for a, b in zip(want, got, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- the cache from files


@pytest.fixture(scope="module")
def cached(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("cached")
    data = load_split(files_cfg(folder), "train")
    plan = make_view_plan(ViewsConfig(num_views=3, augment=RRC), data)
    ckpt = fake_teacher(root / "t.pt", data, width=0.25)
    return {"root": root, "data": data, "plan": plan, "ckpt": ckpt}


def build(cached, out: Path, **kw):
    cfg = CacheConfig(chunk_rows=8, batch_size=7, align={"kind": "channel", "length": 8})
    return cache_teacher(cached["ckpt"], out, cached["plan"], cached["data"], cfg, progress=False, **kw)


def test_a_cache_from_files_equals_the_live_teacher_on_the_replayed_views(cached, tmp_path):
    build(cached, tmp_path / "t.zarr")
    cache = open_cache(tmp_path / "t.zarr")
    assert cache.complete and cache.num_samples == 36 and cache.num_views == 3
    data, plan = cached["data"], cached["plan"]
    model, _ = load_teacher(cached["ckpt"])
    rng = np.random.default_rng(1)
    rows, views = rng.integers(0, 36, 20), rng.integers(0, 3, 20)  # random (sample, view) pairs
    x = torch.cat(list(file_views(data, rows, plan.aug[rows, views][:, None], plan.augment,
                                  [np.arange(20)])))  # (20, 3, 32, 32): replayed from the files
    with torch.no_grad():
        logits, feats = model(normalize(x, data.mean, data.std))
    live = [logits.numpy(), *[f.numpy() for f in align_all(feats, AlignConfig(kind="channel", length=8))]]
    for name, want in zip(["logits", *cache.blocks], live):
        got = np.asarray(cache.array(name)[...])[rows, views].astype(np.float32)
        rounded = want.astype(np.float16).astype(np.float32)
        assert np.all(np.abs(got - rounded) <= np.spacing(np.abs(rounded.astype(np.float16))).astype(np.float32))
    cache.close()


def test_a_mixed_cache_from_files_equals_the_live_teacher_on_the_replayed_mixed_views(cached, tmp_path):
    """Partners decoded in the worker, each with its own box on its own image size; the live teacher on views
    replayed the distill stage's way (step_views, one view per sample) matches the cache pass's (all V at once)."""
    from pipeline.data import step_views

    data = cached["data"]
    plan = make_view_plan(ViewsConfig(num_views=3, augment=RRC, mix={"kind": "both", "prob": 0.9}), data)
    partners = plan.mix.partner[plan.mix.partner >= 0]
    assert len(partners) > 50 and (plan.mix.aug[plan.mix.partner >= 0][:, 2] <= data.sizes[partners, 0]).all()
    cfg = CacheConfig(chunk_rows=8, batch_size=7, align={"kind": "channel", "length": 8})
    cache_teacher(cached["ckpt"], tmp_path / "t.zarr", plan, data, cfg, progress=False)
    model, _ = load_teacher(cached["ckpt"])
    view = 2
    steps = [torch.arange(0, 20), torch.arange(20, 36)]
    x = torch.cat(list(step_views(data, None, steps, torch.from_numpy(plan.aug[:, view]), plan.augment,
                                  torch.device("cpu"), plan.mix.take(slice(None), view))))  # (36, 3, 32, 32)
    with torch.no_grad():
        logits, _ = model(normalize(x, data.mean, data.std))
    with open_cache(tmp_path / "t.zarr") as cache:
        got = cache.view_slab(view, ["logits"])["logits"].astype(np.float32)
    rounded = logits.numpy().astype(np.float16).astype(np.float32)
    assert np.all(np.abs(got - rounded) <= np.spacing(np.abs(rounded.astype(np.float16))).astype(np.float32))
    plain = make_view_plan(ViewsConfig(num_views=3, augment=RRC), data)
    assert plan.unmixed().fingerprint == plain.fingerprint
    # two decoding workers and another batch size: the same bytes
    cfg = CacheConfig(chunk_rows=8, batch_size=12, align={"kind": "channel", "length": 8})
    cache_teacher(cached["ckpt"], tmp_path / "w2.zarr", plan, dataclasses.replace(data, workers=2), cfg, progress=False)
    with open_cache(tmp_path / "t.zarr") as one, open_cache(tmp_path / "w2.zarr") as two:
        for name in ["logits", *one.blocks]:
            assert np.asarray(one.array(name)[...]).tobytes() == np.asarray(two.array(name)[...]).tobytes(), name


class Boom(Exception):
    pass


def test_a_killed_file_backed_cache_resumes_to_the_same_bytes(cached, tmp_path):
    build(cached, tmp_path / "ref.zarr")

    def killed(k):
        raise Boom(k)

    with pytest.raises(Boom):
        build(cached, tmp_path / "t.zarr", on_chunk=killed)
    assert not open_cache(tmp_path / "t.zarr").complete
    build(cached, tmp_path / "t.zarr")
    ref, got = open_cache(tmp_path / "ref.zarr"), open_cache(tmp_path / "t.zarr")
    for name in ["logits", *ref.blocks]:
        assert np.asarray(got.array(name)[...]).tobytes() == np.asarray(ref.array(name)[...]).tobytes(), name


def test_the_plan_keeps_each_images_size_and_the_decoder(cached, tmp_path):
    plan = cached["plan"]
    assert plan.attrs["source"] == "files" and plan.attrs["decoder"].startswith("PIL ")
    assert plan.attrs["image_size"] == [32, 32] and np.array_equal(plan.sizes, cached["data"].sizes)
    top, left, h, w = (plan.aug[..., k].astype(int) for k in range(4))
    assert (top + h <= plan.sizes[:, :1]).all() and (left + w <= plan.sizes[:, 1:]).all()
    write_view_plan(plan, tmp_path / "views.zarr")
    back = open_view_plan(tmp_path / "views.zarr")
    assert back.fingerprint == plan.fingerprint and np.array_equal(back.sizes, plan.sizes)
    with pytest.raises(UserError, match="crop_flip"):
        make_view_plan(ViewsConfig(num_views=2), cached["data"])


def test_evaluation_resizes_and_centre_crops(folder):
    """The evaluation view of a file: its centre, 87.5% of the shorter side, resized to the view size."""
    from torchvision.transforms.v2 import functional as TF

    test = load_split(files_cfg(folder), "test")
    (x,) = list(eval_views(test, torch.device("cpu"), len(test)))
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8
    for i in (0, 5):
        image = decode(test.path(i))
        short = min(image.shape[1:])
        reference = TF.center_crop(TF.resize(image, [round(32 / 0.875)], antialias=True), [32, 32])
        assert (x[i].float() - reference.float()).abs().mean() < 6, short  # two antialiased resamplings


# ---------------------------------------------------------------- the stages from files


def test_the_stages_run_from_files(folder, tmp_path, monkeypatch):
    from stages import cache_teachers, distill, evaluate, plan_views, pretrain

    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    params["data"] = {"name": "imagefolder", "root": str(folder), "image_size": 32, "source": "files",
                      "workers": 1}
    params["teachers"] = {"cnn": {"arch": "student_cnn", "model": {"width": 0.25}, "pretrain": {}}}
    params["pretrain"].update(epochs=1, augment=RRC)
    params["views"]["augment"] = RRC
    params["cache"]["chunk_rows"] = 8  # 36 samples: 5 chunks, read by distill 2 at a time (shuffle: chunks)
    params["distill"].update(teachers=["cnn"], epochs=2, seeds=[0], runs={"kd": {"method": "kd"}}, batch_size=8,
                             shuffle="chunks", shuffle_window=2)
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runner = CliRunner()
    for stage, args in ((pretrain, ["--teacher", "cnn"]), (plan_views, []), (cache_teachers, ["--teacher", "cnn"]),
                        (distill, ["--run", "kd"]), (evaluate, [])):
        result = runner.invoke(stage.main, [*args, *(["--quiet"] if stage not in (plan_views, evaluate) else [])])
        assert result.exit_code == 0, (stage.__name__, result.output)
    assert open_cache(paths.teacher_cache("cnn")).complete
    assert open_view_plan().attrs["source"] == "files"
    report = json.loads(paths.evaluate_metrics().read_text())
    assert set(report["teachers"]) == {"cnn"} and set(report["students"]) == {"kd"}
    assert report["num_samples"] == 12  # the test split, centre-cropped from its files


def test_a_thousand_classes_end_to_end_from_topk_caches(tmp_path, monkeypatch):
    """The 1,000-class path on a tiny generated folder (2 training images a class, small JPEGs): a top-k cache
    (k = 5), then KD, MEAL and MEAL V2 from it, MEAL V2 with the official discriminator at K = 8
    (1000 -> 125 -> 15 -> 2) on a step schedule, and evaluate."""
    from stages import cache_teachers, distill, evaluate, plan_views, pretrain

    root = generate(tmp_path / "k", "--classes", "1000", "--train-per-class", "2", "--test-per-class", "1",
                    "--min-side", "20", "--max-side", "40", "--grey-every", "0", "--workers", "2")
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load((REPO / "profiles" / "tiny.yaml").read_text())
    params["data"] = {"name": "imagefolder", "root": str(root), "image_size": 16, "source": "files", "workers": 1}
    params["teachers"] = {"cnn": {"arch": "student_cnn", "model": {"width": 0.25}, "pretrain": {}}}
    params["pretrain"].update(epochs=1, augment=RRC, batch_size=250)
    params["views"].update(num_views=2, augment=RRC)
    params["cache"].update(logits="topk", topk=5, chunk_rows=500, batch_size=250)
    options = {"adversarial": "cooperative", "discriminator": "official", "d_reduction": 8, "d_optimizer": "sgd",
               "adv_weight": 1.0, "d_lr": 0.01}
    params["distill"].update(teachers=["cnn"], epochs=2, seeds=[0], batch_size=250, schedule="step", milestones=[1],
                             gamma=0.1, shuffle="chunks", shuffle_window=2,
                             meal_v2={**params["distill"]["meal_v2"], **options},
                             runs={"kd": {"method": "kd"}, "meal": {"method": "meal"}, "meal_v2": {"method": "meal_v2"}})
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    runner = CliRunner()
    steps = [(pretrain, ["--teacher", "cnn"]), (plan_views, []), (cache_teachers, ["--teacher", "cnn"])]
    steps += [(distill, ["--run", run]) for run in ("kd", "meal", "meal_v2")] + [(evaluate, [])]
    for stage, args in steps:
        result = runner.invoke(stage.main, [*args, *(["--quiet"] if stage not in (plan_views, evaluate) else [])])
        assert result.exit_code == 0, (stage.__name__, result.output)
    with open_cache(paths.teacher_cache("cnn")) as cache:
        assert cache.num_classes == 1000 and cache.layout.topk == 5 and cache.complete
    ckpt = torch.load(paths.student_checkpoint("meal_v2", 0), weights_only=False)
    widths = [tuple(w.shape) for k, w in ckpt["discriminators"].items() if k.endswith("weight")]
    assert widths == [(125, 1000), (15, 125), (2, 15)]  # the official D at K = 8
    lrs = [row["lr"] for row in ckpt["history"]]
    assert lrs[0] == pytest.approx(params["distill"]["lr"]) and lrs[1] == pytest.approx(params["distill"]["lr"] * 0.1)
    report = json.loads(paths.evaluate_metrics().read_text())
    assert set(report["students"]) == {"kd", "meal", "meal_v2"} and report["num_samples"] == 1000
