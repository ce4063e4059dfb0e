"""ANP, adversarial neuron pruning (Wu & Wang, NeurIPS 2021), as BackdoorBench's `defense/anp.py` runs it.

Every BatchNorm2d channel ("neuron") k of a copy of the model gets a mask m_k in [0, 1] (start 1)
and two multiplicative perturbations, d_k on its scale and x_k on its shift. The layer then computes
BN(x) with weight gamma_k * (m_k + d_k) and bias beta_k * (1 + x_k) when perturbed, and gamma_k * m_k,
beta_k when not. Each iteration draws a batch of the clean tuning set (with replacement, augmented),
starts the perturbations uniformly in [-eps, eps], takes `anp_steps` signed gradient-ascent steps of
size eps / steps on the loss (clipped back into [-eps, eps]: the paper's bound; the official code
does not clip, see `anp_clip_noise`), then one SGD step (momentum) on the masks for
alpha * L(natural) + (1 - alpha) * L(perturbed), and clips the masks to [0, 1]. The network is in
train mode throughout (batch statistics, as the official `mask_train`); the running statistics that
this moves live in the copy only and are thrown away.

Pruning writes into the backdoored model itself (plain architecture, so model.pt loads as any
other): channels whose mask is <= the threshold (official comparison), or the `number` / `fraction`
lowest masks, get their BN weight set to 0 (officially the weight only: the masks learnt a scale of
the weight with the shift intact; `anp_prune_bias` also zeroes the shift).

`anp_curve` also reports the model pruned at every threshold of BackdoorBench's sweep (0 to 0.9 by
0.05, as its pruning_by_threshold.txt), evaluated on the test sets. `anp_prune_by oracle` is
BackdoorBench's choice from that sweep: the threshold with the lowest ASR among those whose clean
accuracy fell by less than `anp_acc_ratio` (relative) from the unpruned model's, or no pruning if none
lowers the ASR. It reads the backdoor test set, which a defender does not have.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import Parameter
from tqdm.auto import tqdm

from models import model_label
from utils import engine
from utils.config import Option, non_negative, parse_bool, positive, within
from utils.defenses.purify import Mode, register_mode
from utils.errors import UserError

PRUNE_BY = ("threshold", "number", "fraction", "oracle")
#: the thresholds of BackdoorBench's sweep (pruning_max 0.9, pruning_step 0.05)
SWEEP = tuple(round(0.05 * k, 2) for k in range(19))
#: iterations per row of metrics.csv (the official `print_every`)
BLOCK = 500

ANP_OPTIONS = (
    Option("anp_iterations", int, 2000, "anp: mask-optimisation iterations, one batch each (default 2000, BackdoorBench's nb_iter; "
           "fewer for CPU runs)", check=positive),
    Option("anp_eps", float, 0.4, "anp: bound of the multiplicative neuron perturbation (default 0.4; 0 = no perturbation)",
           check=non_negative),
    Option("anp_steps", int, 1, "anp: signed gradient-ascent steps on the perturbation per iteration, each of size eps/steps (default 1)",
           check=positive),
    Option("anp_alpha", float, 0.2, "anp: weight of the natural loss; 1 - alpha weighs the perturbed loss (default 0.2)",
           check=within(0, 1)),
    Option("anp_clip_noise", parse_bool, True, "anp: keep the perturbation within [-eps, eps] after each ascent step (default true, "
           "the paper's bound; false = the official code, where one step from the random start can reach 2 eps)"),
    Option("anp_prune_by", str, "threshold", "anp: prune channels whose mask is <= anp_prune_value (threshold), the "
           "anp_prune_value lowest (number), that share of all channels (fraction), or at BackdoorBench's choice of threshold "
           "(oracle: of 0, 0.05, ..., 0.9 the one with the lowest ASR on the backdoor test set whose clean accuracy fell by "
           "less than --anp_acc_ratio; it reads the test sets, which a defender does not have) (default threshold)",
           choices=PRUNE_BY),
    Option("anp_prune_value", float, 0.2, "anp: the threshold, count or share of --anp_prune_by (default 0.2, the paper's threshold; "
           "not used by oracle)", check=non_negative),
    Option("anp_acc_ratio", float, 0.1, "anp: with --anp_prune_by oracle, the largest relative fall of clean accuracy a "
           "threshold may cost (default 0.1, BackdoorBench's acc_ratio)", check=within(0, 1)),
    Option("anp_curve", parse_bool, False, "anp: also evaluate the model pruned at each threshold 0, 0.05, ..., 0.9 on the test "
           "sets, printed and written to result.json (default false; always on with oracle)"),
    Option("anp_prune_bias", parse_bool, False, "anp: also zero the BN bias of pruned channels (default false: weight only, as officially)"),
)


class NoisyMaskedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose per-channel scale is multiplied by a mask and, when `perturbed`, both its
    scale and shift by a perturbation (see the module docstring). Built from an existing layer."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device, dtype=bn.weight.dtype)
        self.load_state_dict(bn.state_dict())
        self.train(bn.training)
        like = bn.weight.detach()
        self.neuron_mask = Parameter(torch.ones_like(like))
        self.weight_noise = Parameter(torch.zeros_like(like))
        self.bias_noise = Parameter(torch.zeros_like(like))
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if self.perturbed:
            weight = self.weight * (self.neuron_mask + self.weight_noise)
            bias = self.bias * (1.0 + self.bias_noise)
        else:
            weight, bias = self.weight * self.neuron_mask, self.bias
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as nn.BatchNorm2d
                factor = 1.0 / float(self.num_batches_tracked)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            weight, bias, batch_stats, factor, self.eps)


def maskable_batchnorms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(dotted name, layer) of every BatchNorm2d with a learnt scale, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine]


def noisy_copy(model: nn.Module) -> tuple[nn.Module, dict[str, NoisyMaskedBatchNorm2d]]:
    """A deep copy of `model` with each maskable BatchNorm2d replaced by a NoisyMaskedBatchNorm2d
    (same statistics and affine parameters); returns it and its noisy layers by name."""
    net = copy.deepcopy(model)
    layers: dict[str, NoisyMaskedBatchNorm2d] = {}
    for name, bn in maskable_batchnorms(net):
        parent_name, _, leaf = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        layers[name] = NoisyMaskedBatchNorm2d(bn)
        setattr(parent, leaf, layers[name])
    return net, layers


def check_prune_value(prune_by: str, value: float, channels: int) -> None:
    """--anp_prune_value fits --anp_prune_by on a model with `channels` maskable channels."""
    if prune_by == "number" and (value != int(value) or value > channels):
        raise UserError(f"--anp_prune_value must be a whole number of channels within [0, {channels}] "
                        f"with --anp_prune_by number, got {value:g}")
    if prune_by in ("threshold", "fraction") and value > 1:
        raise UserError(f"--anp_prune_value must be within [0, 1] with --anp_prune_by {prune_by}, got {value:g}")


def choose_pruned(masks: list[tuple[str, int, float]], prune_by: str, value: float) -> list[tuple[str, int, float]]:
    """The (layer, channel, mask) entries to prune, lowest masks first. `threshold`: mask <= value (the
    official comparison); `number`: the `value` lowest; `fraction`: int(value * total) lowest."""
    check_prune_value(prune_by, value, len(masks))
    order = sorted(masks, key=lambda entry: entry[2])  # stable: ties keep module order
    if prune_by == "threshold":
        return [entry for entry in order if entry[2] <= value]
    return order[:int(value if prune_by == "number" else value * len(masks))]


def oracle_choice(curve: list[dict], base: dict, acc_ratio: float) -> dict | None:
    """BackdoorBench's pick from the threshold sweep: walking the thresholds in order, a point replaces
    the best so far when its clean accuracy is within `acc_ratio` (relative, strict) of the unpruned
    model's `base` and its ASR is strictly lower than the best's, which starts at the unpruned ASR.
    None: no threshold qualifies (the unpruned model stays)."""
    best, best_asr = None, base["asr"]
    for point in curve:
        if abs(point["clean_acc"] - base["clean_acc"]) / max(base["clean_acc"], 1e-12) < acc_ratio and point["asr"] < best_asr:
            best, best_asr = point, point["asr"]
    return best


def pruning_curve(model: nn.Module, entries: list[tuple[str, int, float]], evaluate, zero_bias: bool) -> list[dict]:
    """The model pruned at each threshold of SWEEP (cumulatively, on a copy), evaluated by `evaluate`."""
    net, curve = copy.deepcopy(model), []
    order = sorted(entries, key=lambda entry: entry[2])  # as choose_pruned: lowest masks first, ties in module order
    done = 0
    for threshold in SWEEP:
        upto = done
        while upto < len(order) and order[upto][2] <= threshold:
            upto += 1
        prune_channels(net, order[done:upto], zero_bias)
        done = upto
        point = {"threshold": threshold, "pruned": done, **{k: float(v) for k, v in evaluate(net).items()}}
        print(f"[anp] threshold {threshold:.2f}: {done:4d} channels pruned  C-Acc {point['clean_acc']:.4f}  "
              f"ASR {point['asr']:.4f}  RA {point['ra']:.4f}")
        curve.append(point)
    return curve


def prune_channels(model: nn.Module, pruned: list[tuple[str, int, float]], zero_bias: bool) -> None:
    """Zero the BN weight (and optionally the bias) of each pruned channel of the plain model."""
    with torch.no_grad():
        for layer, channel, _ in pruned:
            bn = model.get_submodule(layer)
            bn.weight[channel] = 0.0
            if zero_bias:
                bn.bias[channel] = 0.0


def optimise_masks(model: nn.Module, tuning, iterations: int, rows: list[dict] | None = None) -> dict[str, torch.Tensor]:
    """Run the ANP mask optimisation on a noisy copy of `model`; returns the final masks per layer
    name (clipped to [0, 1]). Appends one row per BLOCK iterations to `rows` (loss, natural accuracy)."""
    s = tuning.settings
    eps, steps, alpha = tuning.option("anp_eps"), tuning.option("anp_steps"), tuning.option("anp_alpha")
    clip_noise = tuning.option("anp_clip_noise")
    net, layers = noisy_copy(model)
    for p in net.parameters():
        p.requires_grad_(False)  # only masks and perturbations are optimised (officially the rest gets unused gradients)
    masks = [layer.neuron_mask for layer in layers.values()]
    noises = [t for layer in layers.values() for t in (layer.weight_noise, layer.bias_noise)]
    for t in masks + noises:
        t.requires_grad_(True)
    mask_opt = torch.optim.SGD(masks, lr=s.lr, momentum=s.momentum)
    noise_lr = eps / steps
    images, labels = tuning.images, tuning.labels
    device = images.device
    gen = engine.make_generator(s.seed, device, "anp-batches")
    noise_gen = engine.make_generator(s.seed, device, "anp-noise")

    def perturb(on: bool) -> None:
        for layer in layers.values():
            layer.perturbed = on

    net.train()  # batch statistics, as the official mask_train
    zero = torch.zeros((), device=device)
    total_loss, correct, seen = zero.clone(), zero.clone(), 0  # kept on the device: no sync per step
    for it in tqdm(range(1, iterations + 1), desc="anp masks", unit="it", leave=False, disable=not s.progress,
                   dynamic_ncols=True):
        idx = torch.randint(0, len(images), (s.batch_size,), device=device, generator=gen)  # with replacement
        x, y = tuning.pipeline.train_batch(images[idx], gen), labels[idx]
        if eps > 0:
            with torch.no_grad():
                for t in noises:
                    t.copy_(torch.rand(t.shape, device=device, generator=noise_gen).mul_(2 * eps).sub_(eps))
            perturb(True)
            for _ in range(steps):
                grads = torch.autograd.grad(F.cross_entropy(net(x), y), noises)
                with torch.no_grad():
                    for t, g in zip(noises, grads):
                        t.add_(noise_lr * g.sign())  # ascent on the loss
                        if clip_noise:
                            t.clamp_(-eps, eps)
            loss_rob = F.cross_entropy(net(x), y)
        perturb(False)
        logits = net(x)
        loss_nat = F.cross_entropy(logits, y)
        loss = alpha * loss_nat + (1 - alpha) * loss_rob if eps > 0 else loss_nat
        mask_opt.zero_grad(set_to_none=True)
        for t, g in zip(masks, torch.autograd.grad(loss, masks)):
            t.grad = g
        mask_opt.step()
        with torch.no_grad():
            for t in masks:
                t.clamp_(0.0, 1.0)
        total_loss += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if rows is not None and (it % BLOCK == 0 or it == iterations):
            rows.append({"epoch": len(rows) + 1, "iterations": it, "lr": s.lr, "train_loss": float(total_loss) / seen,
                         "train_acc": float(correct) / seen})
            total_loss, correct, seen = zero.clone(), zero.clone(), 0
    return {name: layer.neuron_mask.detach().clone() for name, layer in layers.items()}


def anp_algorithm(model: nn.Module, mode: Mode, tuning) -> tuple[nn.Module, list[dict]]:
    """Mode.algorithm of `anp`: optimise the masks, prune the plain model, report the masks."""
    layers = maskable_batchnorms(model)
    if not layers:
        raise UserError(f"anp needs BatchNorm layers; {model_label(model)} has none")
    if tuning.settings.batch_size < 2:
        raise UserError("anp needs --batch_size of at least 2 (BatchNorm runs on batch statistics)")
    prune_by, value = tuning.option("anp_prune_by"), tuning.option("anp_prune_value")
    check_prune_value(prune_by, value, sum(bn.num_features for _, bn in layers))  # before the optimisation
    rows: list[dict] = []
    masks = optimise_masks(model, tuning, tuning.option("anp_iterations"), rows)
    entries = [(name, k, float(v)) for name, values in masks.items() for k, v in enumerate(values.cpu().tolist())]
    report: dict = {}
    if prune_by == "oracle" or tuning.option("anp_curve"):
        base = {k: float(v) for k, v in tuning.evaluate(model).items()}
        print(f"[anp] unpruned: C-Acc {base['clean_acc']:.4f}  ASR {base['asr']:.4f}  RA {base['ra']:.4f}")
        report["curve"] = pruning_curve(model, entries, tuning.evaluate, tuning.option("anp_prune_bias"))
        report["unpruned"] = base
    if prune_by == "oracle":
        chosen = oracle_choice(report["curve"], report["unpruned"], tuning.option("anp_acc_ratio"))
        report["oracle_threshold"] = None if chosen is None else chosen["threshold"]
        print("[anp] oracle: " + ("no threshold lowers the ASR within the accuracy tolerance; nothing pruned" if chosen is None
                                   else f"threshold {chosen['threshold']:.2f} ({chosen['pruned']} channels)"))
        pruned = [] if chosen is None else choose_pruned(entries, "threshold", chosen["threshold"])
    else:
        pruned = choose_pruned(entries, prune_by, value)
    prune_channels(model, pruned, tuning.option("anp_prune_bias"))
    for p in model.parameters():
        p.requires_grad_(True)
    for row in rows[:-1]:
        row.update(dict.fromkeys(("clean_acc", "asr", "ra"), float("nan")))
    rows[-1].update(tuning.evaluate(model))  # the last row is the pruned model's result
    tuning.result["anp"] = {
        "prune_by": prune_by, "prune_value": value, "channels": len(entries), "pruned": len(pruned),
        "pruned_channels": [[layer, k, round(m, 6)] for layer, k, m in pruned],
        "masks": {name: [round(float(v), 6) for v in values.cpu()] for name, values in masks.items()},
        **report,
    }
    return model, rows


register_mode(Mode("anp", "ANP", False, "all", False, "adversarial neuron pruning: BN-channel masks learnt against "
                   "adversarial neuron perturbations, low masks pruned", algorithm=anp_algorithm, options=ANP_OPTIONS,
                   plan=lambda a: (f"{a.anp_iterations} mask iterations (eps {a.anp_eps}), lr {a.lr}, "
                                   + (f"then pruning at the oracle threshold (acc ratio {a.anp_acc_ratio})" if a.anp_prune_by == "oracle"
                                   else f"then pruning by {a.anp_prune_by} {a.anp_prune_value}") + "; --epochs is not used"),
                   ignores=("epochs", "wd", "lr_schedule", "lb_smooth"),
                   defaults=(("split_ratio", 0.05), ("lr", 0.2), ("batch_size", 256), ("momentum", 0.9))))
