"""SIG (Barni et al. 2019): a horizontal sinusoid added to target-class images, clean label."""
from __future__ import annotations

import torch

from utils.attacks import triggers
from utils.attacks.registry import AttackSpec, Params, register_attack
from utils.config import Option, positive, within
from utils.data.datasets import DatasetInfo

# --- SIG (clean label) ----------------------------------------------------------------------

def _sig_build(cfg: dict, info: DatasetInfo) -> Params:
    return {"pattern": triggers.sig_pattern(info.channels, info.image_size, cfg["sig_delta"], cfg["sig_f"])}


def _sig_apply(images: torch.Tensor, params: Params, train: bool) -> torch.Tensor:
    return triggers.apply_additive(images, params["pattern"])


SIG = register_attack(AttackSpec(
    name="sig", title="SIG",
    options=[
        Option("sig_delta", float, 40.0, "amplitude of the sinusoid in pixel units (0..255)", check=within(0, 255)),
        Option("sig_f", float, 6.0, "number of periods across the image width", check=positive),
    ],
    build=_sig_build, apply=_sig_apply, clean_label=True,
    description="clean-label: add delta * sin(2 pi j f / W) along the columns, clip",
))
