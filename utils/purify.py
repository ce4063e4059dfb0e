"""Fine-tuning purification: the five modes of FST (REFERENCE §5) as small descriptions run by the
shared training loop.

A mode says whether the head is re-initialised, which parameters train, and whether the FST
feature-shift term `alpha * <W, W_orig>` joins the loss. The head-norm projection (rescale the head
weight to the backdoored head's Frobenius norm after every step) is switchable: the official code
applies it in every mode, the paper describes it for FST.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models import get_head
from utils import engine
from utils.errors import UserError


@dataclass(frozen=True)
class Mode:
    name: str
    reinit_head: bool
    trains: str  # "all", "head" or "backbone"
    feature_shift: bool
    summary: str


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("ft", False, "all", False, "vanilla fine-tuning of every parameter"),
    Mode("lp", False, "head", False, "linear probing: only the head trains"),
    Mode("fe-tuning", True, "backbone", False, "head re-initialised and frozen, backbone trains"),
    Mode("ft-init", True, "all", False, "head re-initialised, everything trains"),
    Mode("fst", True, "all", True, "head re-initialised, everything trains, loss + alpha <W, W_orig>"),
)}
NORM_PROJ = ("all", "fst", "none")

# Published settings per dataset (split_ratio, lr, epochs, alpha); fmnist follows CIFAR-10.
DATASET_DEFAULTS = {
    "cifar10": (0.02, 0.01, 10, 0.2),
    "gtsrb": (0.02, 0.01, 15, 0.1),
    "cifar100": (0.05, 0.001, 15, 0.001),
    "tiny": (0.05, 0.001, 15, 0.001),
    "fmnist": (0.02, 0.01, 10, 0.2),
}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise UserError(f"unknown --ft_mode {name!r}; choose one of: {', '.join(MODES)}, all")
    return MODES[name]


def tuning_indices(labels: torch.Tensor, split_ratio: float, seed: int, balanced: bool = False) -> torch.Tensor:
    """The clean tuning subset: `int(N * split_ratio)` indices drawn uniformly with a generator derived
    from the seed, or (balanced) the first `k // C` images of each class as the 2023 code did."""
    if not 0.0 < split_ratio <= 1.0:
        raise UserError(f"split_ratio must be within (0, 1], got {split_ratio}")
    labels = labels.cpu()
    count = int(len(labels) * split_ratio)
    if count < 1:
        raise UserError(f"split_ratio {split_ratio} of {len(labels)} training images selects no image")
    if balanced:
        classes = int(labels.max()) + 1
        per_class = max(1, count // classes)
        picks = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(classes)]
        return torch.cat(picks).sort().values
    gen = torch.Generator().manual_seed(engine.derive_seed(seed, "tuning-split"))
    return torch.randperm(len(labels), generator=gen)[:count].sort().values


def der(before: dict, after: dict) -> float:
    """Defense effectiveness rating (BackdoorBench), on fractions."""
    return (max(0.0, before["asr"] - after["asr"]) - max(0.0, before["clean_acc"] - after["clean_acc"]) + 1) / 2


def reinit_linear(layer: nn.Linear, seed: int) -> None:
    """Weight and bias uniform in +-1/sqrt(fan_in) (PyTorch's default Linear bounds), seeded."""
    bound = 1.0 / layer.in_features ** 0.5
    gen = torch.Generator().manual_seed(engine.derive_seed(seed, "head-init"))
    with torch.no_grad():
        layer.weight.copy_(torch.empty(layer.weight.shape).uniform_(-bound, bound, generator=gen))
        if layer.bias is not None:
            layer.bias.copy_(torch.empty(layer.bias.shape).uniform_(-bound, bound, generator=gen))


@dataclass
class PurifySettings:
    epochs: int
    lr: float
    alpha: float
    batch_size: int = 128
    momentum: float = 0.9
    label_smoothing: float = 0.0
    norm_proj: str = "all"
    frozen_bn_eval: bool = False
    seed: int = 0
    linear_name: str | None = None
    progress: bool = True


def _set_trainable(model: nn.Module, head: nn.Linear, trains: str) -> list[nn.Parameter]:
    head_ids = {id(p) for p in head.parameters()}
    params = []
    for p in model.parameters():
        in_head = id(p) in head_ids
        p.requires_grad_(trains == "all" or (trains == "head") == in_head)
        if p.requires_grad:
            params.append(p)
    return params


def _freeze_bn(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen into eval mode (running stats fixed)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                module.eval()


def purify(model: nn.Module, mode: Mode, images: torch.Tensor, labels: torch.Tensor, pipeline: engine.Pipeline,
           settings: PurifySettings, evaluate: Callable[[nn.Module], dict], amp=None) -> tuple[nn.Module, list[dict]]:
    """Purify a copy of `model` on the tuning set; returns it and one metrics row per epoch."""
    model = copy.deepcopy(model)
    head = get_head(model, settings.linear_name)
    orig_weight = head.weight.detach().clone()
    orig_norm = orig_weight.norm()
    if mode.reinit_head:
        reinit_linear(head, settings.seed)
    params = _set_trainable(model, head, mode.trains)
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=0.0)
    scheduler = engine.cosine_scheduler(optimizer, settings.epochs)
    project = settings.norm_proj == "all" or (settings.norm_proj == "fst" and mode.feature_shift)

    def loss_fn(net, x, y, idx):
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)
        if mode.feature_shift:
            # Frobenius inner product with the backdoored head; the bias is not penalised
            loss = loss + settings.alpha * (head.weight * orig_weight).sum()
        return loss, logits

    def after_step():
        if project:
            with torch.no_grad():
                head.weight.mul_(orig_norm / head.weight.norm().clamp_min(1e-12))

    def train_mode(net: nn.Module) -> None:
        net.train()
        if settings.frozen_bn_eval:
            _freeze_bn(net)

    gen = engine.make_generator(settings.seed, images.device, f"tune-order-{mode.name}")
    rows = []
    for epoch in tqdm(range(1, settings.epochs + 1), desc=mode.name, unit="ep", leave=False,
                      disable=not settings.progress, dynamic_ncols=True):
        lr = optimizer.param_groups[0]["lr"]
        stats = engine.train_epoch(model, images, labels, pipeline, optimizer, settings.batch_size, gen, loss_fn,
                                   after_step, amp, desc="tune", progress=settings.progress, set_train_mode=train_mode)
        scheduler.step()
        metrics = evaluate(model)
        rows.append({"epoch": epoch, "lr": lr, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                     **metrics, "head_weight_norm": float(head.weight.detach().norm()),
                     "head_cosine_to_orig": float(F.cosine_similarity(head.weight.detach().flatten(),
                                                                      orig_weight.flatten(), dim=0))})
    for p in model.parameters():
        p.requires_grad_(True)
    return model, rows
