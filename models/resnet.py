"""CIFAR ResNet-18 (3x3 stride-1 stem, no max-pool) and PreAct-ResNet-18 (BackdoorBench default)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import BackdoorNet, register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


def _stages(block, cin: int) -> list[nn.Sequential]:
    stages = []
    for i, width in enumerate((64, 128, 256, 512)):
        stages.append(nn.Sequential(block(cin, width, 1 if i == 0 else 2), block(width, width, 1)))
        cin = width
    return stages


class ResNet(BackdoorNet):
    """Four stages of two blocks (64/128/256/512), global average pool, linear head `linear`."""

    head_name = "linear"

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(BasicBlock, 64)
        self.linear = nn.Linear(512, num_classes)

    def feature_maps(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def pool(self, maps):
        return torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1)

    def stage_modules(self):
        return [self.layer2, self.layer3, self.layer4]  # NAD's three deepest groups


class PreActResNet(BackdoorNet):
    """Pre-activation variant as BackdoorBench builds it: plain conv stem, and the last stage's
    output goes straight to the pool and the head (no final BatchNorm+ReLU), so BackdoorBench
    PreActResNet18 state dicts load with strict key matching."""

    head_name = "linear"

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(PreActBlock, 64)
        self.linear = nn.Linear(512, num_classes)

    def feature_maps(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))

    def pool(self, maps):
        return torch.flatten(F.adaptive_avg_pool2d(maps, 1), 1)

    def stage_modules(self):
        return [self.layer2, self.layer3, self.layer4]  # NAD's three deepest groups


@register_model("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> ResNet:
    return ResNet(num_classes, in_channels)


@register_model("preactresnet18")
def preactresnet18(num_classes: int, in_channels: int = 3, image_size: int = 32) -> PreActResNet:
    return PreActResNet(num_classes, in_channels)
