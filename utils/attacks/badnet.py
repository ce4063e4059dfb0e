"""BadNet (Gu et al. 2017): a small patch pasted in the bottom-right corner, dirty label."""
from __future__ import annotations

import torch

from utils.attacks import triggers
from utils.attacks.registry import AttackSpec, Params, register_attack
from utils.config import Option, within
from utils.data.datasets import DatasetInfo

# --- BadNet ---------------------------------------------------------------------------------

def _badnet_build(cfg: dict, info: DatasetInfo) -> Params:
    pattern, mask = triggers.badnet_trigger(cfg["patch"], info.channels, info.image_size, cfg["patch_size"])
    return {"pattern": pattern, "mask": mask}


def _badnet_apply(images: torch.Tensor, params: Params, train: bool) -> torch.Tensor:
    return triggers.apply_badnet(images, params["pattern"], params["mask"])


BADNET = register_attack(AttackSpec(
    name="badnet", title="BadNet",
    options=[
        Option("patch", str, "square", "BadNet trigger shape", choices=triggers.BADNET_PATTERNS),
        Option("patch_size", int, 3, "trigger side in pixels at 32 px (scaled with the image)", check=within(1, 64)),
    ],
    build=_badnet_build, apply=_badnet_apply,
    description="3x3 white square (or checkerboard grid) pasted in the bottom-right corner",
))
