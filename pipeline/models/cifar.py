"""The CIFAR-style teachers of MEAL's zoo: ResNet-18, PreAct ResNet-18, VGG-BN, DenseNet and DPN-92.

Every network here follows the zoo contract of `pipeline.models` (docs/design.md section 4):
`forward(x)` returns `(logits, [f_1, f_2, f_3])`, the outputs of the last `NUM_BLOCKS` stages.
All use CIFAR stems (3x3 conv, stride 1, no max-pool), so a 32x32 image keeps its resolution
through the first stage, and end in adaptive average pooling, so any input of at least 28x28
works and the classifier size does not depend on the input size.

`width` multiplies every channel count (`scaled`), which gives small, fast versions of the
teachers for tests and quick experiments. The blocks shared with the small students of
`pipeline.models` (BasicBlock, ResNet, the classifier head) live here too, so that this module
depends on nothing in `pipeline.models` and there is no import cycle.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.device import mean_keep_layout

NUM_BLOCKS = 3  # features returned per model; the same for every model so any teacher pairs with any student


def scaled(channels: int, width: float) -> int:
    """`channels` times the width multiplier, rounded, never below one channel."""
    return max(1, round(channels * width))


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed by BatchNorm, whose shift makes a bias redundant.
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [conv3x3(cin, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def init_weights(model: nn.Module) -> nn.Module:
    """He-normal convs (they feed ReLUs), BatchNorm as identity, zero biases; Linear keeps torch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


class Head(nn.Module):
    """Global average pool, linear classifier: (B, C, H, W) -> (B, num_classes).

    `mean` pools: the layout-keeping mean by default (its gradient stays channels_last, docs/design.md
    section 5), the plain one where the caller compiles the model (`set_pooling`)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)
        self.mean = mean_keep_layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mean(x, (2, 3)))  # (B, C) global average pool -> (B, num_classes)


def feature_noise(dropout: float) -> nn.Module:
    """A student's noise (ANC's z) on its last block's map, before the head pools it and the caller reads it
    as the block's output. Whole channels drop: pooled, that is dropout on the pooled vector the classifier
    reads (the same distribution), and the discriminator on the last block sees the noise too."""
    return nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()


def set_pooling(model: nn.Module, mean) -> None:
    """Every Head of `model` pools with `mean` (pipeline.align.mean or pipeline.device.mean_keep_layout)."""
    for m in model.modules():
        if isinstance(m, Head):
            m.mean = mean


# ---------------------------------------------------------------- ResNet and PreAct ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016); a 1x1 conv+BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, cout, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU before each conv (He et al. 2016, identity mappings); the sum is left un-activated."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.shortcut = conv1x1(cin, cout, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # A projection shortcut reads the pre-activated input, so both paths see normalized data.
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)  # (B, cout, H/s, W/s)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class ResNet(nn.Module):
    """A CIFAR ResNet: 3x3 stem, then stages of residual blocks, each after the first halving the map.

    Blocks: the outputs of the last NUM_BLOCKS stages. With pre-activation blocks the last stage's
    output goes through a final BN-ReLU (so the feature, like every other model's, is post-ReLU).
    """

    def __init__(self, block: type[nn.Module], depths: list[int], channels: list[int], stem: int,
                 num_classes: int, in_channels: int, dropout: float = 0.0, preact: bool = False):
        super().__init__()
        assert len(depths) == len(channels) >= NUM_BLOCKS
        # A pre-activation network normalizes inside its blocks, so its stem is the bare conv.
        self.stem = nn.Sequential(conv3x3(in_channels, stem)) if preact else \
            nn.Sequential(*conv_bn_relu(in_channels, stem))
        self.stages = nn.ModuleList()
        cin = stem
        for i, (depth, cout) in enumerate(zip(depths, channels)):
            stride = 1 if i == 0 else 2
            blocks = [block(cin if j == 0 else cout, cout, stride if j == 0 else 1) for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
            cin = cout
        self.post = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.noise = feature_noise(dropout)
        self.head = Head(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stem(x)  # (B, stem, H, W)
        outs = []
        for stage in self.stages:  # stage i: (B, channels[i], H / 2^i, W / 2^i)
            x = stage(x)
            outs.append(x)
        outs[-1] = self.noise(self.post(outs[-1]))
        return self.head(outs[-1]), outs[-NUM_BLOCKS:]


def resnet18(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> ResNet:
    """CIFAR ResNet-18: BasicBlock x [2, 2, 2, 2], 64/128/256/512 channels (11.2M params at width 1).

    Blocks: stage 2 (128, H/2), stage 3 (256, H/4), stage 4 (512, H/8) channels at width 1.
    """
    c = [scaled(n, width) for n in (64, 128, 256, 512)]
    return ResNet(BasicBlock, [2, 2, 2, 2], c, c[0], num_classes, in_channels, dropout=dropout)


def preact_resnet18(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                    dropout: float = 0.0) -> ResNet:
    """Pre-activation ResNet-18: PreActBlock x [2, 2, 2, 2], 64/128/256/512 channels.

    Blocks: stage 2 (128, H/2), stage 3 (256, H/4), BN-ReLU(stage 4) (512, H/8) channels at width 1.
    """
    c = [scaled(n, width) for n in (64, 128, 256, 512)]
    return ResNet(PreActBlock, [2, 2, 2, 2], c, c[0], num_classes, in_channels, dropout=dropout, preact=True)


# ---------------------------------------------------------------- VGG with BatchNorm

# Conv widths per stage; stages are separated by 2x2 max-pools (Simonyan & Zisserman 2015, configs A, D, E).
VGG_STAGES = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(nn.Module):
    """VGG with BatchNorm after every conv; five conv stages, each but the first opened by a max-pool.

    The pools use ceil_mode so a 28x28 input shrinks 28-14-7-4-2 instead of reaching 0x0; the final
    max-pool of the classic net is replaced by the head's global average pool (a 32x32 input leaves
    stage 5 at 2x2). Blocks: the outputs of conv stages 3, 4, 5 (256, 512, 512 channels at width 1,
    at H/4, H/8, H/16).
    """

    def __init__(self, stages: list[list[int]], num_classes: int, in_channels: int, width: float,
                 dropout: float = 0.0):
        super().__init__()
        self.stages = nn.ModuleList()
        cin = in_channels
        for i, widths in enumerate(stages):
            layers: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if i > 0 else []
            for c in widths:
                layers += conv_bn_relu(cin, scaled(c, width))
                cin = scaled(c, width)
            self.stages.append(nn.Sequential(*layers))
        self.noise = feature_noise(dropout)  # a student's z (ANC), on the last block
        self.head = Head(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs = []
        for stage in self.stages:  # stage i: (B, C_i, ceil(H / 2^i), ceil(W / 2^i))
            x = stage(x)
            outs.append(x)
        outs[-1] = x = self.noise(x)
        return self.head(x), outs[-NUM_BLOCKS:]


def vgg11(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> VGG:
    """VGG-11 with BatchNorm (8 convs). Blocks: conv stages 3, 4, 5 (256, 512, 512 channels)."""
    return VGG(VGG_STAGES["vgg11"], num_classes, in_channels, width, dropout)


def vgg16(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> VGG:
    """VGG-16 with BatchNorm (13 convs). Blocks: conv stages 3, 4, 5 (256, 512, 512 channels)."""
    return VGG(VGG_STAGES["vgg16"], num_classes, in_channels, width, dropout)


def vgg19_bn(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, dropout: float = 0.0) -> VGG:
    """VGG-19 with BatchNorm (16 convs), a MEAL teacher. Blocks: conv stages 3, 4, 5 (256, 512, 512)."""
    return VGG(VGG_STAGES["vgg19"], num_classes, in_channels, width, dropout)


# ---------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (4 * growth) then BN-ReLU-3x3 conv (growth); its output is appended to its input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), conv1x1(cin, 4 * growth),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True), conv3x3(4 * growth, growth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)  # (B, cin + growth, H, W)


def transition(cin: int, cout: int) -> nn.Sequential:
    """Compress the channels with a 1x1 conv and halve the map between dense blocks."""
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), conv1x1(cin, cout), nn.AvgPool2d(2))


class DenseNet(nn.Module):
    """DenseNet-BC (Huang et al. 2017) for CIFAR: 3x3 stem of 2 * growth channels, four dense blocks.

    Stages: dense1+transition, dense2+transition, dense3+transition, dense4+BN-ReLU. Blocks: the
    last three, i.e. the output of dense2's transition, of dense3's transition and the final map.
    """

    def __init__(self, depths: list[int], growth: int, num_classes: int, in_channels: int,
                 reduction: float = 0.5):
        super().__init__()
        c = 2 * growth
        self.stem = conv3x3(in_channels, c)
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            layers: list[nn.Module] = [DenseLayer(c + j * growth, growth) for j in range(depth)]
            c += depth * growth
            if i < len(depths) - 1:
                cout = max(1, math.floor(c * reduction))
                layers.append(transition(c, cout))
                c = cout
            else:
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            self.stages.append(nn.Sequential(*layers))
        self.head = Head(c, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stem(x)  # (B, 2 * growth, H, W)
        outs = []
        for stage in self.stages:  # after stage i: (B, C_i, H / 2^(i+1), W / 2^(i+1)); the last keeps its size
            x = stage(x)
            outs.append(x)
        return self.head(x), outs[-NUM_BLOCKS:]


def densenet_cifar(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> DenseNet:
    """DenseNet-121 layout [6, 12, 24, 16] with growth rate 12 (width scales the growth rate), a MEAL teacher.

    Blocks at width 1: dense2+transition (96, H/4), dense3+transition (192, H/8), final (384, H/8).
    """
    return DenseNet([6, 12, 24, 16], scaled(12, width), num_classes, in_channels)


# ---------------------------------------------------------------- Dual Path Network


class DualPathBlock(nn.Module):
    """ResNeXt-style bottleneck whose output is split: `res` channels add to the residual path, `dense` concatenate.

    With `first`, a 1x1 projection (with the block's stride) brings the input to res + dense channels.
    Output channels: input channels + dense (first: res + 2 * dense).
    """

    def __init__(self, cin: int, mid: int, res: int, dense: int, stride: int, first: bool):
        super().__init__()
        self.res = res
        # Cardinality 32 as in DPN; at small widths the largest divisor of `mid` not above 32 is used.
        groups = math.gcd(32, mid)
        self.body = nn.Sequential(
            conv1x1(cin, mid), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            conv3x3(mid, mid, stride, groups), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            conv1x1(mid, res + dense), nn.BatchNorm2d(res + dense),
        )
        self.shortcut = nn.Sequential(conv1x1(cin, res + dense, stride), nn.BatchNorm2d(res + dense)) \
            if first else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)  # (B, res + dense, H', W')
        s = self.shortcut(x)  # (B, res + dense_so_far, H', W')
        r = self.res
        return F.relu(torch.cat([s[:, :r] + y[:, :r], s[:, r:], y[:, r:]], 1))


class DPN(nn.Module):
    """Dual Path Network (Chen et al. 2017), CIFAR version: 3x3 stem of 64 channels, four stages.

    Blocks: the outputs of stages 2, 3, 4.
    """

    def __init__(self, mids: list[int], res: list[int], dense: list[int], depths: list[int], stem: int,
                 num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(in_channels, stem))
        self.stages = nn.ModuleList()
        c = stem
        for i in range(len(depths)):
            blocks = []
            for j in range(depths[i]):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(DualPathBlock(c, mids[i], res[i], dense[i], stride, first=j == 0))
                c = res[i] + (j + 2) * dense[i]  # the residual width plus every dense slice so far
            self.stages.append(nn.Sequential(*blocks))
        self.head = Head(c, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stem(x)  # (B, stem, H, W)
        outs = []
        for stage in self.stages:  # stage i: (B, res_i + (depth_i + 1) * dense_i, H / 2^i, W / 2^i)
            x = stage(x)
            outs.append(x)
        return self.head(x), outs[-NUM_BLOCKS:]


def dpn92(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> DPN:
    """DPN-92 for CIFAR: depths [3, 4, 20, 3], bottleneck 96..768, residual 256..2048, dense 16/32/24/128.

    Blocks at width 1: stage 2 (512 + 5 * 32 = 672, H/2), stage 3 (1024 + 21 * 24 = 1528, H/4),
    stage 4 (2048 + 4 * 128 = 2560, H/8). A MEAL teacher.
    """
    s = lambda ns: [scaled(n, width) for n in ns]  # noqa: E731
    return DPN(s([96, 192, 384, 768]), s([256, 512, 1024, 2048]), s([16, 32, 24, 128]), [3, 4, 20, 3],
               scaled(64, width), num_classes, in_channels)
