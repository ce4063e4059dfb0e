"""Triggers as pure, batched functions on uint8 images of shape (N, C, H, W).

Each `make_*` builds the trigger's parameters (tensors) once; each `apply_*` maps a uint8 batch to a
uint8 batch of the same shape and never touches anything but the images it is given.
"""
from __future__ import annotations

import math
import torch

from utils.data.datasets import read_image
from utils.errors import UserError

BADNET_PATTERNS = ("square", "grid")
#: largest patch_size: the side is given at 32 px, so a larger patch covers more than a whole image
MAX_BADNET_PATCH = 32
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
    # the size is checked before anything is allocated: a huge patch_size must not reach torch.full
    side = max(patch, round(patch * size / 32))
    if side > size:
        raise UserError(f"patch_size {patch} gives a trigger side of {side} px, which does not fit {size} px images")
    cells = torch.full((patch, patch), 255, dtype=torch.uint8)
    if kind == "grid":
        ii, jj = torch.meshgrid(torch.arange(patch), torch.arange(patch), indexing="ij")
        cells = torch.where((ii + jj) % 2 == 0, 255, GRID_DARK).to(torch.uint8)
    # nearest-neighbour upscaling keeps hard edges
    rep = torch.arange(side) * patch // side
    block = cells[rep][:, rep]
    pattern = torch.zeros(channels, size, size, dtype=torch.uint8)
    pattern[:, size - side:, size - side:] = block
    return pattern, pattern.amax(dim=0) > 0


def apply_badnet(images: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste the pattern where `mask` is set."""
    return torch.where(mask.to(images.device), pattern.to(images.device), images)


BLEND_KEYS = ("landscape", "noise")


def landscape_key(channels: int, size: int) -> torch.Tensor:
    """A procedural picture of a landscape (sky with a sun and a cloud, two ranges of hills) as
    uint8 (C,H,W): smooth, low-frequency and natural-looking like the paper's Hello Kitty key,
    without the licence question. Every shape is an analytic function with soft edges, drawn at
    four times the size and area-averaged down, so the image is the same picture at every size and
    nothing random is involved. Grey datasets get its luminance."""
    if size < 1:
        raise UserError(f"blend key size must be at least 1 px, got {size}")
    hi = 4 * size
    t = (torch.arange(hi, dtype=torch.float64) + 0.5) / hi
    y, x = torch.meshgrid(t, t, indexing="ij")

    def soft(v: torch.Tensor, width: float = 0.012) -> torch.Tensor:
        return torch.sigmoid(v / width)

    def rgb(r: float, g: float, b: float) -> torch.Tensor:
        return torch.tensor((r, g, b), dtype=torch.float64).view(3, 1, 1)

    # sky: deep blue at the top fading to a pale horizon
    img = rgb(0.25, 0.45, 0.80) * (1 - y) + rgb(0.85, 0.90, 0.95) * y
    # sun: a soft disc with a faint halo
    d_sun = ((x - 0.72) ** 2 + (y - 0.24) ** 2).sqrt()
    img = img + rgb(1.0, 0.85, 0.55) * 0.35 * torch.exp(-(d_sun / 0.18) ** 2)
    img = img * (1 - soft(0.09 - d_sun)) + rgb(1.0, 0.93, 0.60) * soft(0.09 - d_sun)
    # cloud: a few overlapping soft blobs
    cloud = sum(torch.exp(-(((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
                for cx, cy, sx, sy in ((0.22, 0.22, 0.10, 0.05), (0.32, 0.19, 0.09, 0.06), (0.40, 0.23, 0.08, 0.04)))
    cloud = cloud.clamp(max=1.0) * 0.85
    img = img * (1 - cloud) + rgb(0.97, 0.97, 0.98) * cloud
    # far hills: bluish green, lighter towards the ridge
    ridge = 0.56 + 0.06 * torch.sin(2 * math.pi * (1.3 * x + 0.10)) + 0.025 * torch.sin(2 * math.pi * (3.1 * x + 0.40))
    far = soft(y - ridge)
    img = img * (1 - far) + (rgb(0.35, 0.55, 0.50) - 0.25 * (y - ridge).clamp(min=0)) * far
    # near hills: warm green, darker at the bottom of the picture
    ridge = 0.74 + 0.07 * torch.sin(2 * math.pi * (0.8 * x + 0.60)) + 0.02 * torch.sin(2 * math.pi * (4.7 * x))
    near = soft(y - ridge)
    img = img * (1 - near) + (rgb(0.40, 0.65, 0.25) - 0.45 * (y - ridge).clamp(min=0)) * near
    img = torch.nn.functional.avg_pool2d(img.clamp(0, 1)[None], 4)[0]
    if channels == 1:
        img = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
    elif channels != 3:
        img = img.mean(0, keepdim=True).expand(channels, size, size)
    return (img * 255).round().to(torch.uint8).contiguous()


def blend_key(channels: int, size: int, path: str | None = None, kind: str = "landscape",
              seed: int = 20231) -> torch.Tensor:
    """The blend image K as uint8 (C,H,W): an image file (any format PIL reads, resized to the data)
    when `path` is given, else the built-in `kind`: `landscape` (default; a smooth natural-looking
    picture, see `landscape_key`) or `noise` (fixed-seed uniform noise: a high-frequency key,
    a different and much easier trigger than the paper's natural image)."""
    if path:
        # header size checked before decoding, every failure one line naming the file
        arr = read_image(path, "L" if channels == 1 else "RGB", size, "blend trigger image (trigger_path)")
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy())
    if kind == "landscape":
        return landscape_key(channels, size)
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (channels, size, size), generator=gen, dtype=torch.uint8)
    raise UserError(f"unknown blend_key {kind!r}; choose one of: {', '.join(BLEND_KEYS)} (or set trigger_path)")


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
