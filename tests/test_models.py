"""The zoo contract: shapes, block dims, errors, parameter budgets and gradient flow."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import UserError
from pipeline.models import (
    NUM_BLOCKS, STUDENTS, TAKES_DROPOUT, ZOO, block_dims, build_model, count_parameters, parameter_table,
)

SMALL = {"lenet4", "nin", "student_cnn", "resnet8"}  # fast enough to test at full width
INPUTS = [(1, 28), (3, 32)]  # (channels, size): Fashion-MNIST and CIFAR shapes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Batch-2 forwards are hundreds of tiny ops; with 2 OpenMP threads on a busy 2-core machine each
    # op waits on a barrier, and DPN-92's first forward took 10 s instead of 0.2 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_width(arch: str) -> float:
    return 1.0 if arch in SMALL else 0.25


@pytest.mark.parametrize("channels,size", INPUTS)
@pytest.mark.parametrize("arch", list(ZOO))
def test_forward_contract(arch, channels, size):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, in_channels=channels, width=small_width(arch))
    logits, feats = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 7)
    assert isinstance(feats, list) and len(feats) == NUM_BLOCKS
    for f in feats:
        assert f.dim() in (2, 4) and f.shape[0] == 2
    assert [f.shape[1] for f in feats] == block_dims(model, channels, size)
    assert model.training  # block_dims restores the mode it found


def test_constructors_share_the_keyword_interface():
    for arch, constructor in ZOO.items():
        params = inspect.signature(constructor).parameters
        for key, default in (("num_classes", 10), ("in_channels", 3), ("width", 1.0)):
            assert params[key].default == default, (arch, key)
        assert ("dropout" in params) == (arch in TAKES_DROPOUT), arch


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="unknown architecture 'resnet1000'; choose one of: resnet18"):
        build_model("resnet1000", 10, 3)


def test_unknown_kwarg_is_a_user_error():
    with pytest.raises(UserError, match="'nin' does not take argument 'dropout'"):
        build_model("nin", 10, 3, dropout=0.1)
    with pytest.raises(UserError, match="'student_cnn' does not take argument 'depth'"):
        build_model("student_cnn", 10, 3, depth=3)


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"dropout": 1.0}])
def test_bad_values_are_user_errors(kwargs):
    with pytest.raises(UserError):
        build_model("resnet8", 10, 3, **kwargs)


@pytest.mark.parametrize("arch", STUDENTS)
def test_students_are_small(arch):
    for channels in (1, 3):
        assert count_parameters(build_model(arch, 10, channels)) < 100_000


@pytest.mark.parametrize("arch", list(ZOO))
def test_width_multiplier_reduces_parameters(arch):
    with torch.device("meta"):  # shapes only: building the full-width teachers costs nothing
        full = count_parameters(build_model(arch, 10, 3))
        half = count_parameters(build_model(arch, 10, 3, width=0.5))
    assert half < full


@pytest.mark.parametrize("arch", STUDENTS)
def test_gradients_reach_every_student_parameter(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, 1, dropout=0.2)
    logits, _ = model(torch.randn(4, 1, 28, 28))
    # A loss with varying targets: the plain sum of the logits has zero gradient through BatchNorm.
    F.cross_entropy(logits, torch.tensor([0, 3, 5, 9])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = build_model("student_cnn", 10, 1, dropout=0.5)
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    model.train()
    assert not torch.allclose(model(x)[0], model(x)[0])


def test_parameter_table():
    lines = parameter_table().splitlines()
    assert lines[0] == "| arch | params (1x28x28, 10 classes) | params (3x32x32, 10 classes) |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(ZOO)
    row = {line.split("|")[1].strip(): line for line in lines[2:]}
    assert "| 78,042 |" in row["resnet8"]  # the 3x32x32 count of the tiny ResNet
    assert "resnet8 (width 0.5)" in parameter_table({"resnet8": 0.5})
    with pytest.raises(UserError):
        parameter_table({"nope": 1.0})
