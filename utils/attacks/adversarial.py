"""Gradient access to a surrogate model, for attacks that compute their triggers against one (LC's
PGD images, LF's universal pattern).

Images are handled as float tensors in pixel units (0..255), so that every bound and step size an
attack exposes reads as "pixels out of 255". `surrogate_logits` repeats the surrogate pipeline's
evaluation transform (`Pipeline.float_batch`: scale to [0, 1], normalise, resize to its input size,
channels-last where the pipeline uses it) with differentiable operations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils import engine
from utils.errors import UserError


def check_pgd_settings(prefix: str, eps: float, step: float, steps: int) -> None:
    """User errors for a PGD given in pixel units: `<prefix>_eps` in [0, 255], `<prefix>_steps` >= 0,
    `<prefix>_step` > 0 when there are steps."""
    if not 0.0 <= eps <= 255.0:
        raise UserError(f"{prefix}_eps is in pixel units and must be within [0, 255], got {eps}")
    if steps < 0:
        raise UserError(f"{prefix}_steps must be 0 or positive, got {steps}")
    if steps > 0 and step <= 0:
        raise UserError(f"{prefix}_step must be positive, got {step}")


def surrogate_logits(surrogate, x: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
    """Float32 logits of the surrogate for a float batch `x` in pixel units (N, C, H, W)."""
    z = surrogate.pipeline.float_batch(x / 255.0)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        logits = surrogate.model(z)
    return logits.float()


def linf_pgd(forward, x0: torch.Tensor, labels: torch.Tensor, eps: float, step: float, steps: int, high: float,
             start: torch.Tensor | None = None) -> torch.Tensor:
    """Untargeted L-inf PGD: `steps` signed-gradient ascent steps on the cross-entropy of
    `forward(x)` on `labels`, each projected onto the eps-ball around `x0` and onto [0, high]. It
    starts at `start` (a random point of the ball) or at `x0`. Float in, float out, detached."""
    x = (x0 if start is None else start).detach().clone()
    for _ in range(steps):
        x.requires_grad_(True)
        # summed, so that each image's gradient does not depend on the batch it is computed in
        loss = F.cross_entropy(forward(x).float(), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x = x.detach() + step * grad.sign()
            x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp_(0, high)
    return x.detach()


def pgd_untargeted(surrogate, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float, steps: int,
                   amp: torch.dtype | None = None) -> torch.Tensor:
    """L-inf PGD that maximises the surrogate's cross-entropy on the true labels, started at the
    clean image (no random start, so the result is a function of its inputs only). `eps` and `step`
    are in pixel units. Returns uint8 images within `floor(eps)` of the originals: the rounding back
    to integers never leaves the eps-ball."""
    x0 = images.float()
    x = linf_pgd(lambda z: surrogate_logits(surrogate, z, amp), x0, labels.to(images.device), eps, step, steps, 255.0)
    bound = math.floor(eps)
    out = x.round()
    out = torch.minimum(torch.maximum(out, x0 - bound), x0 + bound).clamp_(0, 255)
    return out.to(torch.uint8)


def surrogate_predict(surrogate, images: torch.Tensor, device: torch.device, amp: torch.dtype | None = None,
                      batch_size: int = 0) -> torch.Tensor:
    """The surrogate's predicted labels (on the CPU) for uint8 images held anywhere."""
    if len(images) == 0:
        return torch.empty(0, dtype=torch.long)
    return engine.predict(surrogate.model, images.to(device), surrogate.pipeline, batch_size, amp).cpu()


# --- low-frequency subspace (orthonormal 2-D DCT-II) -----------------------------------------

def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (n x n): coefficients = D @ x, x = D.T @ coefficients. Row
    `k` is a cosine with k half-periods across the side."""
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    d = torch.cos(math.pi * (2 * i[None, :] + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D DCT over the last two dimensions (square images)."""
    d = dct_matrix(x.shape[-1], x.device, x.dtype)
    return d @ x @ d.T


def idct2(c: torch.Tensor) -> torch.Tensor:
    d = dct_matrix(c.shape[-1], c.device, c.dtype)
    return d.T @ c @ d


def lowpass_mask(size: int, cutoff: float, device=None) -> torch.Tensor:
    """Bool (size, size): the DCT frequencies (u, v) with both u and v below `cutoff * size`
    (`cutoff` as a fraction of the highest frequency; 1 keeps everything). (0, 0) is always kept."""
    keep = torch.arange(size, device=device) < max(cutoff * size, 1e-9)
    return keep[:, None] & keep[None, :]


def lowpass(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Project onto the span of the kept DCT frequencies (an orthogonal projection)."""
    return idct2(dct2(x) * mask.to(x.dtype))


def energy_share(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the squared L2 norm of `x` (C, H, W) that lies in the kept DCT frequencies."""
    c2 = dct2(x.double()).pow(2)
    total = float(c2.sum())
    return float((c2 * mask.to(c2.dtype)).sum()) / total if total > 0 else 1.0
