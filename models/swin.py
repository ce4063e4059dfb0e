"""torchvision's Swin-T, the model of the cifar100/tiny prototypes (ImageNet-pretrained, new head).

Pretrained weights come from torchvision's cache (`~/.cache/torch/hub/checkpoints`) or a download;
`build_model` gives random weights, and `load_pretrained_swin` swaps in the ImageNet trunk.
"""
from __future__ import annotations

import torch
from torch import nn

from models.registry import BackdoorNet, register_model
from utils.compat import import_torchvision
from utils.errors import UserError


class SwinT(BackdoorNet):
    head_name = "head"
    stage_channels_last = True  # stages are (N, H, W, C) token grids

    def __init__(self, num_classes: int, in_channels: int):
        super().__init__()
        tv = import_torchvision()
        net = tv.models.swin_t(weights=None)
        if in_channels != 3:
            old = net.features[0][0]
            net.features[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride)
        self.trunk = net.features
        self.norm = net.norm
        self.head = nn.Linear(net.head.in_features, num_classes)

    def feature_maps(self, x):
        return self.norm(self.trunk(x)).permute(0, 3, 1, 2)  # tokens (N, H, W, C) as maps (N, C, H, W)

    def pool(self, maps):
        return torch.flatten(maps.mean(dim=(2, 3)), 1)

    def stage_modules(self):
        # torchvision's features: embedding, then stage / merge pairs; stages 2 and 3, then the
        # final norm over stage 4 (what feature_maps returns)
        return [self.trunk[3], self.trunk[5], self.norm]

    def load_imagenet_trunk(self) -> None:
        """Copy the ImageNet-1k weights into everything but the head (needs them cached or online)."""
        tv = import_torchvision()
        try:
            state = tv.models.Swin_T_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as err:  # network or cache problems all mean the same to the user
            raise UserError(f"cannot get ImageNet weights for swin_t ({err.__class__.__name__}); put "
                            "swin_t-704ceda3.pth into ~/.cache/torch/hub/checkpoints or set pretrained: false") from None
        trunk = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        norm = {k[len("norm."):]: v for k, v in state.items() if k.startswith("norm.")}
        self.trunk.load_state_dict(trunk)
        self.norm.load_state_dict(norm)


@register_model("swin_t", heavy=True)
def swin_t(num_classes: int, in_channels: int = 3, image_size: int = 224) -> SwinT:
    return SwinT(num_classes, in_channels)
