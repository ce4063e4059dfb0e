"""CLP: data-free backdoor removal by channel Lipschitzness pruning (Zheng et al., ECCV 2022), as
BackdoorBench's defense/clp.py runs it.

For every convolution followed by a BatchNorm (found in module order: each BatchNorm2d pairs with the
last Conv2d before it, provided the channel counts agree), channel k's upper bound of the channel
Lipschitz constant (UCLC) is the spectral norm of its kernel, reshaped to (in_channels, kh*kw) and
scaled by |gamma_k / sqrt(running_var_k)|. Channels whose UCLC exceeds mean + u * std of their layer
are pruned by zeroing gamma and beta of that channel. No data is read and nothing is trained; the
pruned model is evaluated once, which makes the mode's single row.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from utils.config import Option, non_negative
from utils.defenses.purify import Mode, register_mode
from utils.errors import UserError


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    """(conv name, conv, BN name, BN) for every BatchNorm2d whose nearest preceding Conv2d in module
    order has as many output channels as the BN has features (BackdoorBench pairs them the same way,
    without the channel check)."""
    pairs = []
    conv: tuple[str, nn.Conv2d] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            conv = (name, module)
        elif isinstance(module, nn.BatchNorm2d) and conv is not None and conv[1].out_channels == module.num_features:
            pairs.append((conv[0], conv[1], name, module))
    return pairs


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC of every output channel: the largest singular value of that channel's kernel as an
    (in_channels / groups, kh * kw) matrix, times |gamma / sqrt(running_var)| (no eps, as the official
    code)."""
    with torch.no_grad():
        scale = (bn.weight / bn.running_var.sqrt()).abs().float()
        kernels = conv.weight.float().reshape(conv.out_channels, conv.weight.shape[1], -1) * scale[:, None, None]
        return torch.linalg.matrix_norm(kernels, ord=2)


def clp_prune(model: nn.Module, u: float) -> dict[str, list[int]]:
    """Zero gamma and beta of every channel with UCLC > mean + u * std (unbiased std, per layer).
    Returns the pruned channel indices per BatchNorm layer name. A model without conv->BN pairs, or
    with BatchNorm layers that lack affine parameters or running statistics, cannot be pruned."""
    pairs = conv_bn_pairs(model)
    if not pairs:
        raise UserError(f"--ft_mode clp needs convolutions followed by BatchNorm2d layers; {type(model).__name__} has none")
    pruned: dict[str, list[int]] = {}
    for _, conv, bn_name, bn in pairs:
        if bn.weight is None or bn.bias is None or bn.running_var is None:
            raise UserError(f"--ft_mode clp: BatchNorm layer {bn_name} of {type(model).__name__} has no affine "
                            "parameters or no running statistics, so CLP cannot prune it")
        lips = channel_lipschitz(conv, bn)
        if len(lips) < 2:
            continue  # one channel has no spread to measure against
        index = torch.nonzero(lips > lips.mean() + u * lips.std()).flatten()
        with torch.no_grad():
            bn.weight[index] = 0
            bn.bias[index] = 0
        pruned[bn_name] = index.tolist()
    return pruned


def _clp(model: nn.Module, mode: Mode, tuning):
    """The mode's algorithm: prune, then evaluate once. The tuning images are never read."""
    u = tuning.option("clp_u")
    pruned = clp_prune(model, u)
    metrics = tuning.evaluate(model)
    channels = sum(bn.num_features for _, _, _, bn in conv_bn_pairs(model))
    count = sum(len(v) for v in pruned.values())
    print(f"[clp] u {u:g}: pruned {count} of {channels} channels in {sum(1 for v in pruned.values() if v)} "
          f"of {len(pruned)} conv-BN layers")
    tuning.result["clp"] = {"u": u, "pruned_channels": count, "channels": channels, "pruned": pruned}
    nan = math.nan
    return model, [{"epoch": 1, "lr": 0.0, "train_loss": nan, "train_acc": nan, **metrics}]


CLP_OPTIONS = (
    Option("clp_u", float, None, "clp: prune channels whose channel Lipschitz bound exceeds mean + u * std of their layer "
           "(default per dataset as BackdoorBench: 3 on CIFAR-10/GTSRB/CIFAR-100 and the others, 5 on Tiny-ImageNet)",
           check=non_negative),
)

register_mode(Mode("clp", "CLP", False, "all", False,
                   "channel Lipschitzness pruning (Zheng et al. 2022): data-free, zeroes the BatchNorm scale and shift of "
                   "channels whose Lipschitz upper bound is an outlier of their layer (UCLC > mean + u std); no fine-tuning",
                   algorithm=_clp, options=CLP_OPTIONS, defaults=(("clp_u", 3.0),),
                   ignores=("split_ratio", "epochs", "lr", "momentum", "batch_size", "wd", "lr_schedule", "lb_smooth"),
                   dataset_defaults=(("tiny", (("clp_u", 5.0),)),),
                   plan=lambda a: f"data-free pruning at u = {a.clp_u}: the tuning set is not used, nor --epochs"))
