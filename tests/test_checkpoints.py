"""The shared guards and the shared optimizer: resuming only a checkpoint made with the same settings, a
checkpoint that must fit the data, SGD as both trainings build it, and a schedule that spares fixed rates."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from pipeline.checkpoints import check_fits_data, load_resumable, save_checkpoint
from pipeline.config import UserError, build
from pipeline.optim import SGDConfig, make_sgd, param_groups, set_lr
from pipeline.pretraining import PretrainConfig


@dataclass
class FakeData:
    fingerprint: str = "abc"
    num_classes: int = 10
    in_channels: int = 1
    name: str = "fashion_mnist"
    split: str = "train"


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = exc.value.message
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- load_resumable


def test_resumable_checkpoint_same_settings_none_or_refused(tmp_path):
    path = tmp_path / "t.pt"
    identity = {"arch": "cnn", "config": {"lr": 0.1}}
    assert load_resumable(path, identity, restart=False, what="teacher checkpoint") is None  # no file: fresh
    save_checkpoint(path, {**identity, "epoch": 2})
    assert load_resumable(path, identity, restart=False, what="teacher checkpoint")["epoch"] == 2
    changed = {"arch": "cnn", "config": {"lr": 0.2}}
    with pytest.raises(UserError) as exc:
        load_resumable(path, changed, restart=False, what="teacher checkpoint")
    assert one_line(exc) == (f"teacher checkpoint {path} was made with different config: pass --restart to start "
                             f"over, or delete it")
    assert load_resumable(path, changed, restart=True, what="teacher checkpoint") is None
    assert path.is_file()  # refusing or restarting never deletes: the next save replaces it


def test_resumable_identity_under_a_key_and_another_flag(tmp_path):
    path = tmp_path / "s.pt"
    save_checkpoint(path, {"identity": {"method": "kd", "seed": 0}, "epoch": 1, "method": "kd"})
    assert load_resumable(path, {"method": "kd", "seed": 0}, False, "student checkpoint", stored="identity")["epoch"] == 1
    with pytest.raises(UserError) as exc:
        load_resumable(path, {"method": "meal", "seed": 1}, False, "student checkpoint", "--fresh", stored="identity")
    assert "was made with different method, seed: pass --fresh to start over" in one_line(exc)
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_resumable(tmp_path / "bad.pt", {}, False, "student checkpoint")


# ---------------------------------------------------------------- check_fits_data


def test_checkpoint_must_fit_the_data():
    data, fix = FakeData(), "retrain it with python -m stages.pretrain --teacher t --restart"
    check_fits_data("teacher checkpoint", "t.pt", "abc", {"num_classes": 10, "in_channels": 1}, data, fix)
    with pytest.raises(UserError) as exc:
        check_fits_data("teacher checkpoint", "t.pt", "other", {"num_classes": 10, "in_channels": 1}, data, fix)
    assert one_line(exc) == ("teacher checkpoint t.pt was trained on other data than the fashion_mnist train split "
                             f"the `data` params give: {fix}")
    with pytest.raises(UserError) as exc:
        check_fits_data("student checkpoint", "s.pt", "abc", {"num_classes": 100, "in_channels": 3}, data, fix)
    assert one_line(exc) == f"student checkpoint s.pt is for 100 classes and 3 channels, the data has 10 and 1: {fix}"
    with pytest.raises(UserError, match="is for None classes"):
        check_fits_data("teacher checkpoint", "t.pt", "abc", {}, data, fix)


# ---------------------------------------------------------------- the optimizer


def test_set_lr_scales_lr_scale_groups():
    """The cooperative game's discriminators follow the student's schedule at their own peak rate (the official
    code's one MultiStepLR over every group): a group with lr_scale gets lr * lr_scale."""
    a, b, d = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b]}, {"params": [d], "lr": 1e-3, "lr_scale": 0.01}], lr=0.1)
    set_lr(opt, 0.05)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.05, 5e-4])


def test_make_sgd_and_param_groups():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = param_groups(model, 5e-4)
    assert [len(g["params"]) for g in groups] == [2, 4]  # conv and linear weights; BN scale/shift and biases
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    cfg = PretrainConfig()
    opt = make_sgd(groups, cfg)
    assert opt.defaults["lr"] == 0.2 and opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    plain = make_sgd(param_groups(model, 0.0), build(PretrainConfig, {"momentum": 0.0}, "pretrain"))
    assert not plain.defaults["nesterov"]  # torch refuses Nesterov without momentum


def test_sgd_checks_name_the_section():
    for values, message in (({"lr": 0.0}, "pretrain.lr = 0.0 must be positive"),
                            ({"momentum": 1.0}, "pretrain.momentum = 1.0 must be in [0, 1)"),
                            ({"weight_decay": -1.0}, "pretrain.weight_decay = -1.0 must be >= 0"),
                            ({"schedule": "steps"}, "pretrain.schedule = 'steps' is not one of cosine, onecycle, constant, step"),
                            ({"warmup_epochs": 11.0}, "pretrain.warmup_epochs = 11.0 must be in [0, epochs]")):
        with pytest.raises(UserError) as exc:
            build(PretrainConfig, values, "pretrain")
        assert one_line(exc) == message
    with pytest.raises(UserError, match="distill.lr = -1"):
        SGDConfig(lr=-1, nesterov=False, schedule="cosine", warmup_epochs=0.0).check_sgd("distill", 5)
