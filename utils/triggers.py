"""Triggers as pure, batched functions on uint8 images of shape (N, C, H, W).

Each `make_*` builds the trigger's parameters (tensors) once; each `apply_*` maps a uint8 batch to a
uint8 batch of the same shape and never touches anything but the images it is given.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError

BADNET_PATTERNS = ("square", "grid")
#: value of the grid's dark cells: the smallest non-zero value, so that they are pasted too
GRID_DARK = 1


def badnet_trigger(kind: str, channels: int, size: int, patch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A `patch`x`patch` (at 32 px) trigger in the bottom-right corner, scaled to `size` without
    blurring. Returns (pattern uint8 (C,H,W), mask bool (H,W)): the trigger is pasted where the
    pattern image is non-zero. The grid's dark cells hold the value 1, as in BackdoorBench's grid
    image (where 0 means "not trigger"), so all of its cells are pasted, dark ones as 1/255."""
    if kind not in BADNET_PATTERNS:
        raise UserError(f"unknown badnet pattern {kind!r}; choose one of: {', '.join(BADNET_PATTERNS)}")
    if patch < 1:
        raise UserError(f"patch_size must be at least 1, got {patch}")
    cells = torch.full((patch, patch), 255, dtype=torch.uint8)
    if kind == "grid":
        ii, jj = torch.meshgrid(torch.arange(patch), torch.arange(patch), indexing="ij")
        cells = torch.where((ii + jj) % 2 == 0, 255, GRID_DARK).to(torch.uint8)
    side = max(patch, round(patch * size / 32))
    if side > size:
        raise UserError(f"trigger side {side} px does not fit {size} px images")
    # nearest-neighbour upscaling keeps hard edges
    rep = torch.arange(side) * patch // side
    block = cells[rep][:, rep]
    pattern = torch.zeros(channels, size, size, dtype=torch.uint8)
    pattern[:, size - side:, size - side:] = block
    return pattern, pattern.amax(dim=0) > 0


def apply_badnet(images: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste the pattern where `mask` is set."""
    return torch.where(mask.to(images.device), pattern.to(images.device), images)


def blend_key(channels: int, size: int, path: str | None = None, seed: int = 20231) -> torch.Tensor:
    """The blend image K as uint8 (C,H,W): an image file (any format PIL reads, resized to the data),
    or by default a fixed-seed uniform noise image, which needs no licence and no download."""
    if path:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(Path(path)) as img:
                img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"blend trigger image {path!r} cannot be read: {err}") from None
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy())
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), generator=gen, dtype=torch.uint8)


def apply_blend(images: torch.Tensor, key: torch.Tensor, alpha: float) -> torch.Tensor:
    """x' = (1 - alpha) x + alpha K, rounded back to uint8."""
    mixed = (1.0 - alpha) * images.float() + alpha * key.to(images.device).float()
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


def sig_pattern(channels: int, size: int, delta: float, freq: float) -> torch.Tensor:
    """SIG's signal as float (C,H,W): delta * sin(2 pi j f / W), varying along columns only, the
    same for every row and channel."""
    cols = torch.arange(size, dtype=torch.float32)
    wave = delta * torch.sin(2 * math.pi * cols * freq / size)
    return wave.expand(channels, size, size).clone()


def apply_additive(images: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x + pattern, rounded and clipped back to uint8."""
    out = images.float() + pattern.to(images.device)
    return out.round_().clamp_(0, 255).to(torch.uint8)
