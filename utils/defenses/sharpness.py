"""Steps that take the gradient somewhere other than at the current weights, then update the
current weights with it: sharpness-aware minimisation (FT-SAM) and path-aware minimisation (PAM).

Both follow one pattern, built from `WeightShift`:

    loss_fn:      offsets = ...; shift.apply(offsets); loss = L(θ + offsets)   (backward gives ∇L(θ + offsets))
    before_step:  shift.restore()                                               (back to θ, exactly)
    optimiser:    θ <- θ - lr · ∇L(θ + offsets)

- SAM (Foret et al. 2021): offsets = ρ · g / ‖g‖ with g = ∇L(θ); adaptive SAM (ASAM, Kwon et al. 2021)
  scales by the weights' magnitudes: offsets = ρ · T² g / ‖T g‖, T = |θ|.
- PAM (NeurIPS 2024): offsets = ρ · d / ‖d‖ with d = θ_backdoored − θ, the global L2 norm taken over
  every parameter; while θ still equals θ_backdoored (d = 0, the very first step) the offsets are
  zero and the step is a plain one.
"""
from __future__ import annotations

from typing import Sequence

import torch


class WeightShift:
    """Moves a list of parameters by offsets and back again, bit-exactly (the original values are
    copied, not recomputed by subtraction)."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self._saved: list[torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    @torch.no_grad()
    def apply(self, offsets: Sequence[torch.Tensor] | None) -> None:
        if self._saved is not None:
            raise RuntimeError("WeightShift.apply called twice without restore")
        if offsets is None:
            return
        self._saved = [p.detach().clone() for p in self.params]
        for p, o in zip(self.params, offsets):
            p.add_(o.to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is None:
            return
        for p, saved in zip(self.params, self._saved):
            p.copy_(saved)
        self._saved = None


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t.float() ** 2).sum() for t in tensors))


@torch.no_grad()
def sam_offsets(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], rho: float,
                adaptive: bool) -> list[torch.Tensor]:
    """ρ · g/‖g‖ (SAM) or ρ · T²g/‖Tg‖ with T = |θ| (adaptive SAM); parameters without a gradient stay put."""
    grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
    scaled = [p.detach().abs() * g if adaptive else g for p, g in zip(params, grads)]
    norm = _global_norm(scaled).clamp_min(1e-12)
    return [rho * (p.detach().abs() * s if adaptive else s) / norm for p, s in zip(params, scaled)]


@torch.no_grad()
def path_offsets(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """ρ · d/‖d‖, d = anchor − θ (global L2 norm over all parameters); all zeros when d = 0 (no
    host synchronisation to test for it: 0 / clamp(0) is 0)."""
    diffs = [a.to(p.dtype) - p.detach() for p, a in zip(params, anchor)]
    norm = _global_norm(diffs).clamp_min(1e-12)
    return [rho * d / norm for d in diffs]
