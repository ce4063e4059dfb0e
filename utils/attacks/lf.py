"""Low-frequency backdoor (LF, docs/protocol.md §4 "lowFrequency"; after Zeng et al., ICCV 2021), dirty label.

The trigger is one additive, universal pattern, clipped: `x' = clip(x + delta)`, identical at
training and test time. The original attack ships pre-computed patterns; here the toolkit computes
its own: a *targeted universal adversarial perturbation* against a surrogate model (minimise
`CE(surrogate(clip(x + delta)), target)` over the victim's clean non-target training images), kept
inside a low-frequency subspace and an L-inf ball:

- `delta` lives in the span of the DCT frequencies (u, v) with u, v < lf_cutoff * side: each step's
  gradient is projected onto that span, so the pattern is an exact sum of a few smooth cosines;
- after each step, if `max |delta|` exceeds `lf_eps` the whole pattern is scaled down (a scaling
  keeps it inside the span, where clipping the peaks would add high frequencies back).

Defaults: lf_eps 16/255 and lf_cutoff 0.25 (the 7 x 7 lowest DCT frequencies at 28 px, 8 x 8 at
32 px: smooth blobs, at most 3 periods across a 28 px image). Measured effects of these settings
are in the README's attack table.

The pattern is cached as the `lf_pattern` resource, keyed by dataset, image size, seed, target,
the options below, the surrogate's identity and the training subset, and is stored in the record.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils import engine
from utils.attacks import adversarial, triggers
from utils.attacks.registry import AttackSpec, register_attack
from utils.attacks.surrogate import SURROGATE_OPTIONS, get_surrogate
from utils.config import Option, non_negative, positive, within
from utils.data.datasets import DatasetInfo
from utils.errors import UserError
from utils.record.resources import Resource, precision_key, tensor_digest

#: optimisation steps between two saves of the resumable progress
SAVE_EVERY = 50

LF_OPTIONS = [
    Option("lf_eps", float, 16.0, "L-inf bound of the pattern in pixel units out of 255", check=within(0, 255, low_open=True)),
    Option("lf_cutoff", float, 0.25, "kept DCT frequencies: u, v < lf_cutoff * side (fraction of the highest; 1: all)", check=within(0, 1, low_open=True)),
    Option("lf_steps", int, 400, "optimisation steps of the universal pattern", check=positive),
    Option("lf_step", float, 1.0, "step size in pixel units (max change of the pattern per step)", check=positive),
    Option("lf_batch_size", int, 128, "non-target training images per step", check=positive),
] + SURROGATE_OPTIONS


def _check(cfg: dict) -> None:
    if not 0.0 < cfg["lf_eps"] <= 255.0:
        raise UserError(f"lf_eps is in pixel units and must be within (0, 255], got {cfg['lf_eps']}")
    if not 0.0 < cfg["lf_cutoff"] <= 1.0:
        raise UserError(f"lf_cutoff must be within (0, 1], got {cfg['lf_cutoff']}")
    if cfg["lf_steps"] < 1:
        raise UserError(f"lf_steps must be positive, got {cfg['lf_steps']}")
    if cfg["lf_step"] <= 0:
        raise UserError(f"lf_step must be positive, got {cfg['lf_step']}")
    if cfg["lf_batch_size"] < 1:
        raise UserError(f"lf_batch_size must be positive, got {cfg['lf_batch_size']}")


def _build(cfg: dict, info: DatasetInfo) -> dict:
    _check(cfg)
    return {}


def _apply(images: torch.Tensor, params: dict, train: bool) -> torch.Tensor:
    return triggers.apply_additive(images, params["pattern"])


def optimise_pattern(surrogate, images: torch.Tensor, target: int, eps: float, cutoff: float, steps: int,
                     step: float, batch_size: int, gen: torch.Generator, device: torch.device, amp=None,
                     progress=None, show: bool = False) -> torch.Tensor:
    """The low-frequency targeted universal perturbation (float (C, H, W), pixel units) over the
    uint8 `images` (CPU), batches drawn with `gen` (a CPU generator). `progress` is a resource
    `Progress` for resuming (or None)."""
    _, c, h, w = images.shape
    mask = adversarial.lowpass_mask(h, cutoff, device)
    delta = torch.zeros(c, h, w, device=device)
    first = 0
    state = progress.load() if progress is not None else None
    if state is not None and tuple(state["delta"].shape) == (c, h, w):
        delta, first = state["delta"].to(device), state["step"]
        gen.set_state(state["generator"])
    labels = torch.full((min(batch_size, len(images)),), target, dtype=torch.long, device=device)
    bar = tqdm(total=steps, initial=first, desc="lf pattern", unit="step", disable=not show, dynamic_ncols=True)
    for t in range(first, steps):
        idx = torch.randint(0, len(images), (len(labels),), generator=gen)
        x = images[idx].to(device).float()
        delta.requires_grad_(True)
        loss = F.cross_entropy(adversarial.surrogate_logits(surrogate, (x + delta).clamp(0, 255), amp), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            grad = adversarial.lowpass(grad, mask)
            delta = delta.detach() - step * grad / grad.abs().max().clamp_min(1e-12)
            delta = adversarial.lowpass(delta, mask)  # removes float drift out of the subspace
            peak = float(delta.abs().max())
            if peak > eps:
                delta *= eps / peak
        bar.update(1)
        if progress is not None and ((t + 1) % SAVE_EVERY == 0 or t + 1 == steps):
            progress.save({"step": t + 1, "delta": delta.cpu(), "generator": gen.get_state()})
    bar.close()
    return delta.cpu()


def pattern_report(pattern: torch.Tensor, cutoff: float) -> dict:
    """L-inf and L2 norms in pixel units, and the share of the energy below the cutoff."""
    mask = adversarial.lowpass_mask(pattern.shape[-1], cutoff)
    return {"linf_px": round(float(pattern.abs().max()), 3), "l2_px": round(float(pattern.norm()), 3),
            "energy_below_cutoff": round(adversarial.energy_share(pattern, mask), 6)}


def _prepare(ctx) -> dict:
    cfg, info = ctx.cfg, ctx.info
    target = cfg["attack_target"]
    surrogate = get_surrogate(ctx)
    settings = {k: cfg[k] for k in ("lf_eps", "lf_cutoff", "lf_steps", "lf_step", "lf_batch_size")}
    key = {"dataset": info.name, "image_size": info.image_size, "seed": cfg["random_seed"], "target": target,
           **settings, "surrogate": surrogate.identity, "train_subset": tensor_digest(ctx.train_indices),
           **precision_key(ctx.amp)}
    resource = Resource("lf_pattern", key, ctx.resource_root)
    others = ctx.train.images[ctx.train.labels.cpu() != target]
    if len(others) == 0:
        raise UserError(f"the training set holds no image outside target class {target} to compute the LF pattern on")

    def build(progress):
        gen = engine.make_generator(cfg["random_seed"], torch.device("cpu"), "lf-pattern-batches")
        pattern = optimise_pattern(surrogate, others, target, cfg["lf_eps"], cfg["lf_cutoff"], cfg["lf_steps"],
                                   cfg["lf_step"], cfg["lf_batch_size"], gen, ctx.device, ctx.amp, progress,
                                   ctx.progress)
        return {"pattern": pattern}, pattern_report(pattern, cfg["lf_cutoff"])

    pattern = resource.get(build)["pattern"].float()
    # measured here rather than cached: the test subset is not part of the key
    test_others = ctx.test.images[ctx.test.labels.cpu() != target]
    fooled = adversarial.surrogate_predict(surrogate, _apply(test_others, {"pattern": pattern}, False), ctx.device,
                                           ctx.amp)
    base = adversarial.surrogate_predict(surrogate, test_others, ctx.device, ctx.amp)
    nan = float("nan")
    info_out = {
        "surrogate": surrogate.description,
        "fooling_rate": round(float((fooled == target).float().mean()), 4) if len(fooled) else nan,
        "target_rate_clean": round(float((base == target).float().mean()), 4) if len(base) else nan,
        **pattern_report(pattern, cfg["lf_cutoff"]),
        "lf": f"eps {cfg['lf_eps']:g}/255, cutoff {cfg['lf_cutoff']:g}, {cfg['lf_steps']} steps of {cfg['lf_step']:g}",
    }
    return {"pattern": pattern, "info": info_out}


LF = register_attack(AttackSpec(
    name="lf", title="LF", options=LF_OPTIONS, build=_build, apply=_apply, prepare=_prepare,
    description="additive universal low-frequency pattern (targeted UAP against a surrogate, DCT low-pass, "
                "L-inf bound), clipped",
))
