"""VGG-19 with BatchNorm, with torchvision's classifier layout (`avgpool`, `classifier.6` head).

BackdoorBench trains torchvision's vgg19_bn directly on 32x32 CIFAR images, so its 4096-wide
classifier and 7x7 adaptive pool are kept; the conv trunk is called `convs` because `features` is
the accessor. Five max-pools need a side of at least 32, so smaller inputs (Fashion-MNIST's 28) are
zero-padded symmetrically, which after normalisation is the mean colour.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import BackdoorNet, register_model

_CFG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(BackdoorNet):
    head_name = "classifier.6"
    min_input_size = 32

    def __init__(self, num_classes: int, in_channels: int, hidden: int = 4096):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in _CFG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.convs = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 49, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def feature_maps(self, x):
        short = self.min_input_size - min(x.shape[-2:])
        if short > 0:
            x = F.pad(x, (short // 2, short - short // 2, short // 2, short - short // 2))
        return self.convs(x)

    def pool(self, maps):
        return self.classifier[:6](torch.flatten(self.avgpool(maps), 1))

    def stage_modules(self):
        # the ends (max-pools) of the last three conv blocks; the last is the feature maps
        return [m for m in self.convs if isinstance(m, nn.MaxPool2d)][-3:]


@register_model("vgg19_bn", heavy=True)
def vgg19_bn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> VGG:
    return VGG(num_classes, in_channels)
