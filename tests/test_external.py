"""Your own teachers and student: torchvision and timm models from local weight files, blocks by module name,
each model's own input size and normalisation, on an ImageFolder the test writes.

Tiny setup: 3 classes x 16 training and 6 test PNGs of 40x40 pixels, loaded at 32x32, 2 random-resized-crop
views; teachers a torchvision ResNet-18 (at 48 pixels, its state dict saved DDP-style under `state_dict`) and a
timm ResNet-10t (a safetensors file), randomly initialised; students a torchvision MobileNetV3-Small at 40
pixels and a timm MobileNetV3-Small-050.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline import paths
from pipeline.align import AlignConfig, align_all
from pipeline.augment import apply_views, normalize
from pipeline.cache import open_cache
from pipeline.models import load_teacher
from pipeline.config import UserError, build
from pipeline.data import DataConfig, load_split
from pipeline.models.external import External, read_state_dict
from pipeline.models import build_model, constructor_kwargs
from pipeline.views import open_view_plan
from stages import cache_teachers, distill, plan_views, pretrain
from helpers import one_line_error, private_copy

timm = pytest.importorskip("timm")
CLASSES, TRAIN, TEST = 3, 16, 6
TV_BLOCKS = ["layer2", "layer3", "layer4"]
STUDENT = {"arch": "torchvision:mobilenet_v3_small",
           "model": {"blocks": ["features.3", "features.8", "features.12"], "input_size": 40}}
TIMM_STUDENT = {"arch": "timm:mobilenetv3_small_050", "model": {"blocks": ["blocks.1", "blocks.3", "blocks.5"]}}


def write_imagefolder(root: Path, size: int = 40) -> Path:
    """root/{train,test}/<class>/*.png: class k a colour-tinted noise image with a bright square."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN), ("test", TEST)):
        for k in range(CLASSES):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
                img[..., k] += 120
                y, x = rng.integers(0, size - 10, 2)
                img[y:y + 10, x:x + 10] = 240
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


def invoke(stage, *args: str):
    return CliRunner().invoke(stage.main, ["--quiet", "--device", "cpu", *args])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The whole pipeline up to the caches, through the real stages, in a module-wide folder."""
    import torchvision
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("external")
    images = write_imagefolder(root / "images")
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=CLASSES)
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}},
               root / "resnet18.pth")  # as a DDP training script saves it
    tm = timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(root / "resnet10t.safetensors"))
    params = {
        "data": {"name": "imagefolder", "root": str(images), "image_size": 32},
        "teachers": {
            "tv": {"arch": "torchvision:resnet18", "model": {"blocks": TV_BLOCKS, "input_size": 48},
                   "weights": str(root / "resnet18.pth")},
            "tm": {"arch": "timm:resnet10t", "model": {"blocks": ["layer2", "layer3", "layer4"]},
                   "weights": str(root / "resnet10t.safetensors")},
        },
        "views": {"num_views": 2, "seed": 0, "augment": {"kind": "rrc_flip", "flip": True}},
        "cache": {"align": {"kind": "channel", "length": 8}, "chunk_rows": 16, "batch_size": 20},
        "student": STUDENT,
        "distill": {"method": "kd", "epochs": 1, "batch_size": 16, "lr": 0.05, "eval_batch_size": 64, "seeds": [0],
                    "eval_every": 1},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with contextlib.chdir(root):
        for t in ("tv", "tm"):
            result = invoke(pretrain, "--teacher", t)
            assert result.exit_code == 0 and "imported from" in result.output, result.output
        assert CliRunner().invoke(plan_views.main, []).exit_code == 0
        for t in ("tv", "tm"):
            result = invoke(cache_teachers, "--teacher", t)
            assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def work(built, tmp_path, monkeypatch) -> Path:
    return private_copy(built, tmp_path, monkeypatch)


# ---------------------------------------------------------------- models and weights


def test_weights_files_are_unwrapped_and_load_into_the_named_architecture(built):
    import torchvision

    state = read_state_dict(built / "resnet18.pth")  # `state_dict` entry, `module.` prefix
    assert "conv1.weight" in state and not any(k.startswith("module.") for k in state)
    torch.manual_seed(0)
    want = torchvision.models.resnet18(num_classes=CLASSES).eval()  # the same seed: the saved weights
    model, ckpt = load_teacher(built / paths.teacher_checkpoint("tv"))
    assert ckpt["imported"] and ckpt["arch"] == "torchvision:resnet18" and ckpt["weights_sha256"]
    x = torch.randn(2, 3, 32, 32)  # data-normalised, at the stored size
    kw = ckpt["model_kwargs"]
    raw = x * torch.tensor(kw["data_std"]).view(1, 3, 1, 1) + torch.tensor(kw["data_mean"]).view(1, 3, 1, 1)
    net_in = (raw - torch.tensor(kw["mean"]).view(1, 3, 1, 1)) / torch.tensor(kw["std"]).view(1, 3, 1, 1)
    net_in = torch.nn.functional.interpolate(net_in, size=(48, 48), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits, feats = model(x)
        torch.testing.assert_close(logits, want(net_in), rtol=1e-4, atol=1e-5)  # the adapter, then the network
    assert [f.shape[1:] for f in feats] == [(128, 6, 6), (256, 3, 3), (512, 2, 2)]


def test_the_cache_of_an_imported_teacher_equals_it_run_live_on_the_replayed_views(work):
    train = load_split(build(DataConfig, yaml.safe_load(Path("params.yaml").read_text())["data"], "data"), "train")
    plan = open_view_plan(paths.view_plan())
    for name in ("tv", "tm"):
        cache = open_cache(paths.teacher_cache(name))
        kwargs = cache.attrs["model_kwargs"]
        assert {"input_size", "mean", "std", "data_mean", "data_std", "blocks"} <= set(kwargs)  # in the identity
        model, _ = load_teacher(paths.teacher_checkpoint(name))
        rows, views = np.arange(0, 48, 5), np.arange(10) % 2
        x = apply_views(train.images[rows], torch.from_numpy(plan.aug[rows, views]), plan.augment)
        with torch.no_grad():
            logits, feats = model(normalize(x, train.mean, train.std))
        live = [logits.numpy(), *[f.numpy() for f in align_all(feats, AlignConfig("channel", 8))]]
        for array, want in zip(["logits", *cache.blocks], live):
            got = np.asarray(cache.array(array)[...])[rows, views].astype(np.float32)
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max(), err_msg=f"{name} {array}")
        cache.close()


def test_a_reimport_of_the_same_file_keeps_the_checkpoint(work):
    before = paths.teacher_checkpoint("tv").read_bytes()
    again = invoke(pretrain, "--teacher", "tv")
    assert again.exit_code == 0 and "already imported" in again.output
    assert paths.teacher_checkpoint("tv").read_bytes() == before


@pytest.mark.parametrize("method", ["scratch", "kd", "meal", "meal_v2", "anc"])
def test_a_torchvision_student_distills_with_every_method(work, method):
    result = invoke(distill, "--method", method)
    assert result.exit_code == 0, result.output
    ckpt = torch.load(paths.student_checkpoint(method), weights_only=False)
    assert ckpt["finished"] and ckpt["arch"] == STUDENT["arch"]


@pytest.mark.parametrize("method", ["kd", "meal"])
def test_a_timm_student_distills(work, method):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["student"] = TIMM_STUDENT
    Path("params.yaml").write_text(yaml.safe_dump(params))
    result = invoke(distill, "--method", method)
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- one-line errors


def _with(change) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    change(params)
    Path("params.yaml").write_text(yaml.safe_dump(params))


def test_weights_that_do_not_fit_and_a_wrong_block_end_in_one_line(work):
    import torchvision

    torch.save(torchvision.models.resnet34(num_classes=CLASSES).state_dict(), "r34.pt")
    _with(lambda p: p["teachers"]["tv"].update(weights="r34.pt"))
    line = one_line_error(invoke(pretrain, "--teacher", "tv"))
    assert "weights file r34.pt does not fit torchvision:resnet18: unexpected keys (" in line
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), "r18_7.pt")
    _with(lambda p: p["teachers"]["tv"].update(weights="r18_7.pt"))
    line = one_line_error(invoke(pretrain, "--teacher", "tv"))
    assert "mis-shaped keys (2): fc.weight, fc.bias (fc.weight: file (7, 512), model (3, 512))" in line
    _with(lambda p: p["teachers"]["tv"]["model"].update(num_classes=7))  # the file's classes, not the data's
    line = one_line_error(invoke(pretrain, "--teacher", "tv"))
    assert "is for 7 classes" in line and "set teachers.tv.model.num_classes to 3, or remove it" in line
    _with(lambda p: p["teachers"]["tv"]["model"].pop("num_classes"))
    _with(lambda p: p["teachers"]["tv"].update(weights="nope.pt"))
    assert "weights file nope.pt not found" in one_line_error(invoke(pretrain, "--teacher", "tv"))

    _with(lambda p: p["teachers"]["tv"]["model"].update(blocks=["layer2", "layer3", "layer9"]))
    line = one_line_error(invoke(pretrain, "--teacher", "tv"))
    assert "torchvision:resnet18 has no module 'layer9'; blocks may be: conv1, bn1" in line and "layer4" in line
    _with(lambda p: p["teachers"]["tv"]["model"].update(blocks=["layer0", "layer2", "layer3", "layer4"]))
    assert "has no module 'layer0'" in one_line_error(invoke(pretrain, "--teacher", "tv"))  # beyond the last three too
    _with(lambda p: p["student"]["model"].update(blocks=["features.3", "features.8", "flatten"]))
    assert "the last block 'flatten' is not a module" in one_line_error(invoke(distill, "--method", "anc"))
    _with(lambda p: p["student"]["model"].update(blocks=["features.3", "stages.8", "features.12"]))
    line = one_line_error(invoke(distill, "--method", "kd"))
    assert "has no module 'stages.8'; blocks may be: features, features.0" in line
    _with(lambda p: p.update(student={"arch": "timm:mobilenetv3_small_050", "model": {"blocks": ["blocks.9"] * 3}}))
    assert "has no feature module 'blocks.9'; blocks may be: bn1, blocks.0" in one_line_error(invoke(distill))
    _with(lambda p: p.update(student={"arch": "torchvision:resnet181", "model": {"blocks": TV_BLOCKS}}))
    assert "did you mean resnet18" in one_line_error(invoke(distill))


def test_a_timm_model_without_timm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(UserError, match=r"timm is not installed: pip install 'meal-distill\[timm\]'"):
        build_model("timm:resnet10t", 3, 3, blocks=["layer2", "layer3", "layer4"])


def test_input_defaults_are_resolved_into_the_recorded_kwargs():
    class Data:  # what constructor_kwargs reads of an ImageData
        num_classes, in_channels, mean, std = 3, 1, (0.5,), (0.25,)

    kw = constructor_kwargs("timm:resnet10t", {"blocks": ["layer2", "layer3", "layer4"]}, Data)
    assert kw["input_size"] == 0 and len(kw["mean"]) == 1 and kw["data_mean"] == [0.5]  # grey: one channel
    kw = constructor_kwargs("torchvision:resnet18", {"blocks": TV_BLOCKS, "mean": [0.1] * 3, "std": [0.2] * 3}, Data)
    assert kw["mean"] == [0.1] * 3 and kw["in_channels"] == 1
    model = build_model("torchvision:resnet18", **kw)  # a grey image is repeated to the network's 3 channels
    assert isinstance(model, External) and model(torch.randn(2, 1, 32, 32))[0].shape == (2, 3)
    assert constructor_kwargs("resnet18", {"width": 0.5}, Data) == {"num_classes": 3, "in_channels": 1, "width": 0.5}


def test_evaluate_reports_imported_teachers_and_an_external_student(work):
    import json

    from stages import evaluate

    for method in ("scratch", "kd"):
        assert invoke(distill, "--method", method).exit_code == 0
    _with(lambda p: p["distill"].update(runs={"scratch": {"method": "scratch"}, "kd": {"method": "kd"}}))
    result = CliRunner().invoke(evaluate.main, ["--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(paths.evaluate_metrics().read_text())
    text = json.dumps(metrics)
    assert "torchvision:resnet18" in text and "timm:resnet10t" in text and "torchvision:mobilenet_v3_small" in text
