"""Blended (Chen et al. 2017): a full-size key image blended into the input, dirty label."""
from __future__ import annotations

import torch

from utils.attacks import triggers
from utils.attacks.registry import AttackSpec, Params, register_attack
from utils.config import Option, within
from utils.data.datasets import DatasetInfo
from utils.errors import UserError

# --- Blended --------------------------------------------------------------------------------

def _blended_build(cfg: dict, info: DatasetInfo) -> Params:
    for key in ("blend_alpha", "blend_alpha_test"):
        if not 0.0 <= cfg[key] <= 1.0:
            raise UserError(f"{key} must be within [0, 1], got {cfg[key]}")
    key_image = triggers.blend_key(info.channels, info.image_size, cfg["trigger_path"] or None, cfg["blend_key"])
    return {"key": key_image, "alpha": float(cfg["blend_alpha"]), "alpha_test": float(cfg["blend_alpha_test"])}


def _blended_apply(images: torch.Tensor, params: Params, train: bool) -> torch.Tensor:
    return triggers.apply_blend(images, params["key"], params["alpha"] if train else params["alpha_test"])


BLENDED = register_attack(AttackSpec(
    name="blended", title="Blended",
    options=[
        Option("blend_alpha", float, 0.2, "blend weight of the trigger image in poisoned training images", check=within(0, 1)),
        Option("blend_alpha_test", float, 0.2, "blend weight at test time", check=within(0, 1)),
        Option("trigger_path", str, "", "trigger image file (empty: the built-in image named by blend_key)"),
        Option("blend_key", str, "landscape", "built-in blend image when trigger_path is empty: a smooth procedural "
               "landscape (natural-image-like, as the paper's Hello Kitty) or fixed-seed noise (high-frequency, "
               "a much easier trigger)", choices=triggers.BLEND_KEYS),
    ],
    build=_blended_build, apply=_blended_apply,
    description="x' = (1-a) x + a K with a fixed full-size image K",
))
