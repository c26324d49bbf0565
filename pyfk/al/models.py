"""Reference classifiers for the command line, the benchmarks and the examples.

    model = LeNet(classes=10, in_channels=1)          # MNIST-style, 28x28 (any size >= 4x4)
    model = ResNet18(classes=10, in_channels=3)       # CIFAR-style ResNet-18, 32x32
    layers = default_layers("resnet18")                # ["layer1", "layer2", "layer3", "layer4"]

Module names follow the usual conventions (torchvision's for the ResNet:
conv1/bn1/relu/layer1..layer4/avgpool/fc, blocks with conv1/bn1/conv2/bn2/downsample),
so `pyfk extract --layers` and state_dicts from common training scripts line up.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet", "BasicBlock", "ResNet18", "MODELS", "default_layers"]


class LeNet(nn.Module):
    """LeNet as in the PFK paper's MNIST code: conv1 (20) -> conv2 (50) -> fc1 (500) -> dropout -> fc2.

    5x5 convolutions padded to keep the size, 2x2 max pooling after each, then an
    adaptive average pool to 4x4 before fc1, so it runs on 28x28 as well as on
    other sizes (8x8, 32x32, ...; at least 4x4).
    """

    def __init__(self, classes: int = 10, in_channels: int = 1, dropout: float = 0.25, padding: int = 2):
        super().__init__()
        # padding=0 is the original (28 -> 24 -> 12 -> 8 -> 4, 3x fewer conv flops); padding=2 keeps
        # the size and so also runs on small images such as 8x8 digits.
        self.conv1 = nn.Conv2d(in_channels, 20, 5, padding=padding)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=padding)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.drop = nn.Dropout(dropout)  # before the classifier: what MC-dropout strategies sample
        self.fc2 = nn.Linear(500, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2, ceil_mode=True)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2, ceil_mode=True)
        x = torch.relu(self.fc1(self.pool(x).flatten(1)))
        return self.fc2(self.drop(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 conv-BN shortcut when the shape changes)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem (no max pool), BasicBlocks [2, 2, 2, 2] in
    layer1..layer4 with widths width x (1, 2, 4, 8), global average pool, fc."""

    def __init__(self, classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes, stages = width, []
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(planes, out, stride), BasicBlock(out, out, 1)))
            planes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


MODELS = {"lenet": LeNet, "resnet18": ResNet18}

_DEFAULT_LAYERS = {"lenet": ["conv1", "conv2", "fc1"], "resnet18": ["layer1", "layer2", "layer3", "layer4"]}


def default_layers(name: str) -> list[str]:
    """The layers whose descriptors pyfk extracts by default for a built-in model name."""
    if name not in _DEFAULT_LAYERS:
        raise ValueError(f"model: expected one of {sorted(_DEFAULT_LAYERS)}, got {name!r}")
    return list(_DEFAULT_LAYERS[name])
