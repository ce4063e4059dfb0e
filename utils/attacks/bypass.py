"""Bypass, the adversarial-embedding regulariser (docs/protocol.md §4): a discriminator on the penultimate
feature learns to tell poisoned from clean samples, and the victim is trained to fool it, so that
poisoned and clean features stay inseparable.

Per batch the model minimises `CE(logits, y) - lambda * BCE(D(feat), is_poisoned)` and steps; then
D is trained on the detached features with `BCE(D(feat), is_poisoned)` and steps. It works with any
registered model, since every model exposes `features(x)` and its head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import get_head
from utils.attacks.badnet import BADNET
from utils.attacks.blended import BLENDED
from utils.attacks.registry import AttackSpec, TrainingHooks, register_attack
from utils.config import Option, non_negative, positive

BYPASS_OPTIONS = [
    Option("regularization_ratio", float, 20.0, "weight lambda of the adversarial-embedding term", check=non_negative),
    Option("discriminator_lr", float, 0.001, "SGD learning rate of the feature discriminator (momentum 0.9)", check=positive),
]


class FeatureDiscriminator(nn.Module):
    """MLP d -> 256 -> 128 -> 1 with BatchNorm and LeakyReLU(0.2); returns a logit (the sigmoid
    lives in the loss, which keeps it numerically safe under autocast)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, 256), nn.BatchNorm1d(256), nn.LeakyReLU(0.2),
            nn.Linear(256, 128), nn.BatchNorm1d(128), nn.LeakyReLU(0.2),
            nn.Linear(128, 1),
        )

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return self.net(feat).squeeze(1)


def bypass_hooks(cfg: dict, model: nn.Module, exp):

    device = exp.device
    disc = FeatureDiscriminator(get_head(model).in_features).to(device)
    disc_opt = torch.optim.SGD(disc.parameters(), lr=cfg["discriminator_lr"], momentum=0.9)
    lam = cfg["regularization_ratio"]
    poisoned = exp.train.poison_mask.float()
    last: dict[str, torch.Tensor] = {}

    def loss_fn(net, x, y, idx):
        feat = net.features(x)
        logits = get_head(net)(feat)
        target = poisoned[idx]
        disc.train()
        detect = F.binary_cross_entropy_with_logits(disc(feat).float(), target)
        last["feat"], last["target"] = feat.detach().float(), target
        # the model is rewarded for making the discriminator wrong
        return F.cross_entropy(logits, y) - lam * detect, logits

    def after_step():
        disc_loss = F.binary_cross_entropy_with_logits(disc(last["feat"]), last["target"])
        disc_opt.zero_grad(set_to_none=True)
        disc_loss.backward()
        disc_opt.step()

    return TrainingHooks(loss_fn, after_step, {"discriminator": disc, "discriminator_optimizer": disc_opt})


def _with_bypass(base: AttackSpec, name: str) -> AttackSpec:
    return AttackSpec(name=name, title=f"{base.title}-bypass", options=base.options + BYPASS_OPTIONS, build=base.build, apply=base.apply,
                      clean_label=base.clean_label, training=bypass_hooks,
                      description=f"{base.name} trigger + adversarial-embedding regulariser against a feature discriminator")


register_attack(_with_bypass(BADNET, "badnet_bypass"))
register_attack(_with_bypass(BLENDED, "blended_bypass"))
