"""A small fast CNN for CPU work, in the spirit of airbench's CIFAR net.

Stem conv, then three blocks of (conv, max-pool, BN, GELU, conv, BN, GELU) with widths 64/128/256,
global max-pool and a linear head. It trains at several hundred images per second on two CPU cores
and reaches ~90% on Fashion-MNIST in a few epochs, which is what makes CPU runs of the whole
attack -> purification pipeline practical.
"""
from __future__ import annotations

import torch
from torch import nn

from models.registry import BackdoorNet, register_model


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


class SmallCNN(BackdoorNet):
    head_name = "linear"

    def __init__(self, num_classes: int, in_channels: int, widths=(64, 128, 256)):
        super().__init__()
        layers: list[nn.Module] = _conv_bn(in_channels, 32)
        cin = 32
        block_ends = []  # trunk positions of each block's last activation: the stages
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(w), nn.GELU(), *_conv_bn(w, w)]
            block_ends.append(len(layers) - 1)
            cin = w
        self.trunk = nn.Sequential(*layers)
        self._block_ends = tuple(block_ends)
        self.linear = nn.Linear(cin, num_classes)

    def feature_maps(self, x):
        return self.trunk(x)

    def pool(self, maps):
        return torch.amax(maps, dim=(2, 3))

    def stage_modules(self):
        return [self.trunk[i] for i in self._block_ends]


@register_model("smallcnn")
def smallcnn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> SmallCNN:
    return SmallCNN(num_classes, in_channels)
