"""The model zoo: teachers and students behind one dict, `ZOO`, from architecture name to constructor.

The contract every model keeps (docs/design.md section 4): `forward(x)` returns `(logits, [f_1, f_2, f_3])`,
logits (B, num_classes) and the outputs of its last NUM_BLOCKS stages, each (B, C, H, W) for a conv
stage or (B, D) for a fully connected one. NUM_BLOCKS is the same for every model, so any teacher
pairs block by block with any student; the alignment pooling later maps each feature to a vector.

Every constructor takes keyword arguments `num_classes`, `in_channels` and `width` (a channel
multiplier); students also take `dropout`, the noise ANC calls z: applied to the last block's output,
so the classifier and whoever reads that block (ANC's discriminator) see the same noisy feature. Every model accepts inputs of 28x28 and larger with any channel count.

This file holds the small networks (the LeNet-4 / NiN pair of Adversarial Network Compression and
two tiny students); the CIFAR teachers of MEAL live in `pipeline.models.cifar`.

    python -c "from pipeline.models import parameter_table; print(parameter_table())"   # the README's zoo table
    load_teacher(path)            # a pretrained teacher from its checkpoint, frozen, in eval mode
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.checkpoints import load_checkpoint
from pipeline.config import UserError
from pipeline.models.external import External, default_input, is_external
from pipeline.models.cifar import (
    NUM_BLOCKS, BasicBlock, Head, ResNet, conv_bn_relu, densenet_cifar, dpn92, feature_noise, init_weights,
    preact_resnet18, resnet18, scaled, vgg11, vgg16, vgg19_bn,
)

__all__ = ["NUM_BLOCKS", "ZOO", "STUDENTS", "TAKES_DROPOUT", "build_model", "constructor_kwargs", "count_parameters", "block_dims",
           "parameter_table"]


# ---------------------------------------------------------------- LeNet-4 and NiN (the ANC pair)


class LeNet4(nn.Module):
    """LeNet-4 (LeCun et al. 1995): two 5x5 conv + max-pool stages, one hidden FC layer, the classifier.

    Widths as in the original: 4 and 16 feature maps, 120 hidden units (the second conv is fully
    connected rather than LeCun's hand-picked map pairs). The conv output is average-pooled to 4x4,
    which is exact for 28x28 inputs, so the FC size does not depend on the input size.
    Blocks: conv1 (4, H/2 - 2), conv2 (16, 4x4 after pooling) and the hidden FC layer (B, 120).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        c1, c2, hidden = scaled(4, width), scaled(16, width), scaled(120, width)
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f1 = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, c1, 12, 12) for 28x28
        f2 = F.max_pool2d(F.relu(self.conv2(f1)), 2)  # (B, c2, 4, 4) for 28x28
        f2 = F.adaptive_avg_pool2d(f2, 4)  # (B, c2, 4, 4) whatever the input size
        f3 = self.dropout(F.relu(self.fc1(f2.flatten(1))))  # (B, hidden), with the noise z
        return self.fc2(f3), [f1, f2, f3]


def mlpconv(cin: int, widths: tuple[int, int, int], kernel: int) -> nn.Sequential:
    """NiN's "micro network": one k x k conv then two 1x1 convs, each with BN and ReLU."""
    a, b, c = widths
    return nn.Sequential(
        nn.Conv2d(cin, a, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(a), nn.ReLU(inplace=True),
        nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True),
        nn.Conv2d(b, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
    )


class NiN(nn.Module):
    """Network in Network (Lin et al. 2014), CIFAR layout: three mlpconv blocks, global average pooling.

    Two changes from the paper, both for trainability with plain SGD: BatchNorm after every conv
    (instead of dropout between blocks), and the last 1x1 conv to `num_classes` maps is written as
    global pooling followed by a linear layer (the same function, since both are linear), so block 3
    keeps its 192 channels. Blocks: mlpconv1 (96, H), mlpconv2 (192, H/2), mlpconv3 (192, H/4).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        s = lambda *ns: tuple(scaled(n, width) for n in ns)  # noqa: E731
        self.block1 = mlpconv(in_channels, s(192, 160, 96), 5)
        self.block2 = nn.Sequential(nn.MaxPool2d(3, 2, padding=1), mlpconv(s(96)[0], s(192, 192, 192), 5))
        self.block3 = nn.Sequential(nn.AvgPool2d(3, 2, padding=1), mlpconv(s(192)[0], s(192, 192, 192), 3))
        self.head = Head(s(192)[0], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f1 = self.block1(x)  # (B, 96, H, W)
        f2 = self.block2(f1)  # (B, 192, H/2, W/2)
        f3 = self.block3(f2)  # (B, 192, H/4, W/4)
        return self.head(f3), [f1, f2, f3]


# ---------------------------------------------------------------- small students


class StudentCNN(nn.Module):
    """A fast three-stage conv net: conv-BN-ReLU at full resolution, then two max-pool + conv-BN-ReLU stages.

    24/40/64 channels, about 33k parameters at 1x28x28. Blocks: the three stage outputs
    (24, H), (40, H/2), (64, H/4).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0):
        super().__init__()
        c1, c2, c3 = scaled(24, width), scaled(40, width), scaled(64, width)
        self.stage1 = nn.Sequential(*conv_bn_relu(in_channels, c1))
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), *conv_bn_relu(c1, c2))
        self.stage3 = nn.Sequential(nn.MaxPool2d(2), *conv_bn_relu(c2, c3))
        self.noise = feature_noise(dropout)
        self.head = Head(c3, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f1 = self.stage1(x)  # (B, c1, H, W)
        f2 = self.stage2(f1)  # (B, c2, H/2, W/2)
        f3 = self.noise(self.stage3(f2))  # (B, c3, H/4, W/4), with the noise z
        return self.head(f3), [f1, f2, f3]


def lenet4(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> LeNet4:
    """LeNet-4, the ANC student (see `LeNet4`)."""
    return LeNet4(num_classes, in_channels, width, dropout)


def nin(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> NiN:
    """Network in Network, the ANC teacher (see `NiN`)."""
    return NiN(num_classes, in_channels, width)


def student_cnn(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                dropout: float = 0.0) -> StudentCNN:
    """The simple fast student (see `StudentCNN`)."""
    return StudentCNN(num_classes, in_channels, width, dropout)


def resnet8(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> ResNet:
    """A tiny CIFAR ResNet: 16-channel stem, one BasicBlock per stage at 16/32/64 channels (~78k params).

    Blocks: the three stage outputs (16, H), (32, H/2), (64, H/4).
    """
    c = [scaled(n, width) for n in (16, 32, 64)]
    return ResNet(BasicBlock, [1, 1, 1], c, c[0], num_classes, in_channels, dropout=dropout)


# ---------------------------------------------------------------- the zoo

ZOO: dict[str, Callable[..., nn.Module]] = {
    # MEAL's CIFAR teachers (pipeline.models.cifar)
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "vgg19_bn": vgg19_bn,
    "densenet_cifar": densenet_cifar,
    "dpn92": dpn92,
    # Adversarial Network Compression's teacher / student pair
    "nin": nin,
    "lenet4": lenet4,
    # small students
    "student_cnn": student_cnn,
    "resnet8": resnet8,
}

# The student-sized networks: under 100k parameters at width 1.
STUDENTS = ("lenet4", "student_cnn", "resnet8")
# The networks that take `dropout` (ANC's student noise): the students, and the ResNet-18s and VGGs, which
# serve as teacher-sized students (the GPU profile's ResNet-18, the default profile's narrow VGG-11).
TAKES_DROPOUT = STUDENTS + ("resnet18", "preact_resnet18", "vgg11", "vgg16", "vgg19_bn")


def build_model(arch: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """`ZOO[arch](num_classes=..., in_channels=..., **kwargs)`, with one-line UserErrors for bad input."""
    if is_external(arch):  # torchvision:NAME, timm:NAME (pipeline.models.external)
        constructor = functools.partial(External, arch)
    elif arch not in ZOO:
        raise UserError(f"unknown architecture '{arch}'; choose one of: {', '.join(ZOO)}, or torchvision:NAME, "
                        f"timm:NAME")
    else:
        constructor = ZOO[arch]
    # Check the keywords against the signature rather than catching TypeError from the call, so
    # that a genuine TypeError inside a constructor is not misreported as a bad argument.
    accepted = inspect.signature(constructor).parameters
    for key in kwargs:
        if key not in accepted or key in ("num_classes", "in_channels"):
            takes = ", ".join(k for k in accepted if k not in ("num_classes", "in_channels"))
            raise UserError(f"architecture '{arch}' does not take argument '{key}'; it takes: {takes}")
    if "width" in kwargs and not kwargs["width"] > 0:
        raise UserError(f"model width = {kwargs['width']!r} for '{arch}' must be > 0")
    if "dropout" in kwargs and not 0 <= kwargs["dropout"] < 1:
        raise UserError(f"model dropout = {kwargs['dropout']!r} for '{arch}' must be in [0, 1)")
    if num_classes < 1 or in_channels < 1:
        raise UserError(f"'{arch}' needs num_classes >= 1 and in_channels >= 1, got {num_classes}, {in_channels}")
    return constructor(num_classes=num_classes, in_channels=in_channels, **kwargs)


def constructor_kwargs(arch: str, model: dict, data) -> dict:
    """Constructor kwargs of `arch` for the ImageData `data`: its classes and channels, the params' `model`
    arguments and, for a torchvision or timm model, its input resolved to numbers (input_size, mean, std; the
    data's normalisation, which the input adapter undoes). Checkpoints and cache identities record them whole,
    so a cache made for another input size or normalisation is another cache."""
    kwargs = {"num_classes": data.num_classes, "in_channels": data.in_channels, **model}
    if not is_external(arch):
        return kwargs
    mean, std = default_input(arch)
    if arch.startswith("timm:") and data.in_channels == 1 and len(mean) == 3:  # timm's grey stem: one channel
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return {"input_size": 0, "mean": list(mean), "std": list(std), **kwargs,
            "data_mean": list(data.mean), "data_std": list(data.std)}


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not; buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def block_dims(model: nn.Module, in_channels: int, image_size: int | tuple[int, int]) -> list[int]:
    """The channel count (or D for a 2-D feature) of each of the model's blocks, from a dummy forward.

    The forward runs in eval mode without gradients (BatchNorm in train mode refuses a single value
    per channel) on the model's own device; the model's train/eval mode is restored afterwards.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, feats = model(torch.zeros(2, in_channels, h, w, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return [f.shape[1] for f in feats]


def parameter_table(widths: dict[str, float] | None = None) -> str:
    """A markdown table of every zoo model's parameter count (10 classes), at width 1 unless `widths` says otherwise.

    Models are built on the meta device: only shapes are allocated, so even DPN-92 costs nothing.
    """
    widths = dict(widths or {})
    unknown = [a for a in widths if a not in ZOO]
    if unknown:
        raise UserError(f"unknown architecture '{unknown[0]}'; choose one of: {', '.join(ZOO)}")
    rows = ["| arch | params (1x28x28, 10 classes) | params (3x32x32, 10 classes) |", "|---|---:|---:|"]
    for arch in ZOO:
        width = widths.get(arch, 1.0)
        kwargs = {} if width == 1.0 else {"width": width}
        with torch.device("meta"):
            counts = [count_parameters(build_model(arch, 10, c, **kwargs)) for c in (1, 3)]
        name = arch if width == 1.0 else f"{arch} (width {width:g})"
        rows.append(f"| {name} | {counts[0]:,} | {counts[1]:,} |")
    return "\n".join(rows)


def load_teacher(path: str | Path, device: torch.device | str = "cpu"):
    """A pretrained teacher in eval mode with frozen weights, and its checkpoint dict.

    The checkpoint records the architecture and its kwargs (see `stages.pretrain`), so a teacher is
    rebuilt from its file alone.
    """
    ckpt = load_checkpoint(path, "teacher checkpoint", "run `python -m stages.pretrain --teacher NAME` first")
    if not ckpt.get("finished", False):
        raise UserError(f"teacher checkpoint {path} is from an unfinished pretrain run: rerun stages.pretrain to finish it")
    model = build_model(ckpt["arch"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["model"])
    model.eval().requires_grad_(False).to(device)
    return model, ckpt
