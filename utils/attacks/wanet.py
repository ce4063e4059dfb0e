"""WaNet: a fixed, smooth random warping field as the trigger, applied inside each training batch,
with "noise mode" samples that get the field plus random jitter and keep their labels, so the
network must learn the exact field rather than any warp.

The field: a k x k grid of random offsets, normalised by their mean magnitude, upsampled
bicubically to the image size and scaled by s / H; the poisoned image is `grid_sample(x, (identity +
field) * grid_rescale)`. The batch is not augmented before poisoning. After poisoning it gets WaNet's
own augmentation, as the original: ONE draw for the whole batch of a random crop (zero padding of
`random_crop` pixels, with probability 0.8), then a random rotation (uniform within
+-`random_rotation` degrees, nearest-neighbour, with probability 0.5), then a horizontal flip (with
probability 0.5, where the dataset allows flips). `post_augment_scope: sample` draws a shift,
rotation (bilinear, always applied) and flip per sample instead; `post_augment: false` replaces
both by the pipeline's crop/flip before poisoning, so the field is seen exactly as at test time. On
Fashion-MNIST with a short schedule this decides whether the backdoor is learnt at all (README,
"Attacks").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from utils import engine
from utils.attacks.poison import backdoor_labels
from utils.attacks.registry import AttackSpec, Params, TrainingHooks, register_attack
from utils.config import Option, parse_bool, non_negative, positive, within
from utils.data.datasets import DatasetInfo
from utils.errors import UserError

WANET_OPTIONS = [
    Option("k", int, 4, "side of the random control grid of the warping field", check=within(2, 1024)),
    Option("s", float, 0.5, "strength of the warping field", check=non_negative),
    Option("cross_ratio", float, 2.0, "noise-mode samples per poisoned sample in each batch", check=non_negative),
    Option("grid_rescale", float, 1.0, "scale of the whole warping grid, identity + field (1: none)", check=positive),
    Option("post_augment", parse_bool, True,
           "WaNet's own crop/rotation/flip after poisoning; false: the pipeline's crop/flip before it"),
    Option("post_augment_scope", str, "batch", "batch: one crop (p 0.8), rotation (p 0.5, nearest) and flip "
           "decision for the whole batch, as the original; sample: a shift, bilinear rotation and flip per sample",
           choices=("batch", "sample")),
    Option("random_crop", int, 5, "post-poisoning augmentation: zero padding of the random crop, in pixels", check=within(0, 64)),
    Option("random_rotation", float, 10.0, "post-poisoning augmentation: largest rotation, in degrees", check=within(0, 180)),
]


def make_field(size: int, k: int, s: float, seed: int, grid_rescale: float = 1.0) -> torch.Tensor:
    """The warping grid for `grid_sample`, shape (1, H, W, 2), values clamped to [-1, 1]."""
    gen = torch.Generator().manual_seed(engine.derive_seed(seed, "wanet-field"))
    offsets = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    offsets = offsets / offsets.abs().mean()
    field = F.interpolate(offsets, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    line = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    identity = torch.stack((cols, rows), dim=2)[None]
    # the original rescales identity and field together, so a rescale also scales the warp
    return ((identity + s * field / size) * grid_rescale).clamp(-1, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Warp a float batch with a (1 or N, H, W, 2) grid."""
    grid = grid.to(device=x.device, dtype=x.dtype).expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def apply_uint8(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The test-time trigger on uint8 images (warped, rounded back to uint8)."""
    if len(images) == 0:
        return images
    return warp(images.float(), grid).round_().clamp_(0, 255).to(torch.uint8)


def shift_rotate(x: torch.Tensor, max_shift: int, max_degrees: float, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random translation (whole pixels) and rotation in one affine resampling, batched."""
    n, _, h, w = x.shape
    dev = x.device
    angle = (torch.rand(n, device=dev, generator=gen) * 2 - 1) * math.radians(max_degrees)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), device=dev, generator=gen).float() * 2 / w
    dy = torch.randint(-max_shift, max_shift + 1, (n,), device=dev, generator=gen).float() * 2 / h
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack((torch.stack((cos, -sin, dx), 1), torch.stack((sin, cos, dy), 1)), 1)
    out = F.grid_sample(x, F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False),
                        mode="bilinear", padding_mode="zeros", align_corners=False)
    if flip:
        mask = torch.rand(n, device=dev, generator=gen) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


def rotation_theta(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 2, 3) `affine_grid` matrices that rotate images counter-clockwise by `degrees` about their
    centre, as torchvision's `rotate` does (the output pixel samples the input at the inverse
    rotation, in pixel units, hence the aspect factors for non-square images)."""
    angle = torch.deg2rad(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    return torch.stack((torch.stack((cos, -sin * height / width, zero), -1),
                        torch.stack((sin * width / height, cos, zero), -1)), -2)


def batch_augment(x: torch.Tensor, pad: int, max_degrees: float, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """WaNet's post-poisoning augmentation with one draw for the whole batch, in the original's
    order: random crop after zero padding of `pad` pixels (probability 0.8), rotation by an angle
    uniform in [-max_degrees, max_degrees] with nearest-neighbour sampling and zero fill
    (probability 0.5), horizontal flip (probability 0.5, only if `flip`). A transform that is not
    drawn is replaced by its identity (zero offset, zero angle, no flip), so there is no host
    synchronisation inside the step."""
    n, _, h, w = x.shape
    dev = x.device
    u = torch.rand(4, device=dev, generator=gen)  # crop?, rotate?, angle, flip?
    offset = torch.randint(0, 2 * pad + 1, (2,), device=dev, generator=gen)
    if pad:
        # rows/cols [i, i + h) of the padded batch, i = pad (no shift) when the crop is not drawn
        offset = torch.where(u[0] < 0.8, offset, torch.full_like(offset, pad))
        rows = (offset[0] + torch.arange(h, device=dev))[:, None]
        cols = (offset[1] + torch.arange(w, device=dev))[None, :]
        x = F.pad(x, (pad, pad, pad, pad))[:, :, rows, cols]
    if max_degrees:
        degrees = torch.where(u[1] < 0.5, (u[2] * 2 - 1) * max_degrees, torch.zeros_like(u[2]))
        theta = rotation_theta(degrees, h, w).to(x.dtype).expand(n, 2, 3)
        grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if flip:
        x = torch.where(u[3] < 0.5, x.flip(3), x)
    return x


def poison_batch(x: torch.Tensor, y: torch.Tensor, grid: torch.Tensor, rate: float, cross: float, target: int,
                 label_trans: str, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """WaNet's in-batch poisoning: the first `int(B * rate)` samples are warped and relabelled, the
    next `int(that * cross)` are warped with jittered grids and keep their labels (noise mode), the
    rest stay clean."""
    size = grid.shape[1]
    n_bd = int(len(y) * rate)
    n_cross = min(int(n_bd * cross), len(y) - n_bd)
    parts, labels = [], []
    if n_bd:
        parts.append(warp(x[:n_bd], grid))
        labels.append(backdoor_labels(y[:n_bd], target, label_trans, classes))
    if n_cross:
        jitter = (torch.rand(n_cross, size, size, 2, device=x.device, generator=gen) * 2 - 1) / size
        parts.append(warp(x[n_bd:n_bd + n_cross], (grid.to(x.device) + jitter).clamp(-1, 1)))
        labels.append(y[n_bd:n_bd + n_cross])
    parts.append(x[n_bd + n_cross:])
    labels.append(y[n_bd + n_cross:])
    return torch.cat(parts), torch.cat(labels)


def check_options(cfg: dict, image_size: int) -> None:
    if not 0 <= cfg.get("random_crop", 0) < image_size:
        raise UserError(f"random_crop must be within [0, {image_size - 1}] pixels, got {cfg['random_crop']}")
    if not 0 <= cfg.get("random_rotation", 0) <= 180:
        raise UserError(f"random_rotation must be within [0, 180] degrees, got {cfg['random_rotation']}")


def wanet_hooks(cfg: dict, model, exp):

    check_options(cfg, exp.info.image_size)
    grid = exp.trigger_params["grid"].to(exp.device)
    gen = engine.make_generator(cfg["random_seed"], exp.device, "wanet-batches")
    post_augment = cfg.get("post_augment", True)
    per_sample = cfg.get("post_augment_scope", "batch") == "sample"
    # the crop's padding is in native pixels; the batch may have been resized to the model's input
    pipe = exp.pipeline
    pad = int(round(cfg.get("random_crop", 5) * pipe.input_size / pipe.native_size))
    degrees = float(cfg.get("random_rotation", 10.0))

    def loss_fn(net, x, y, idx):
        inputs, targets = poison_batch(x, y, grid, cfg["pratio"], cfg["cross_ratio"], cfg["attack_target"],
                                       cfg["attack_label_trans"], exp.info.num_classes, gen)
        if post_augment and per_sample:
            inputs = shift_rotate(inputs, pad, degrees, exp.info.flip, gen)
        elif post_augment:
            inputs = batch_augment(inputs, pad, degrees, exp.info.flip, gen)
        if exp.pipeline.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = net(inputs)
        # train_acc is then counted against the clean labels, which the poisoned samples do not match
        return F.cross_entropy(logits, targets), logits

    return TrainingHooks(loss_fn, None, None, augment=not post_augment)


def _wanet_build(cfg: dict, info: DatasetInfo) -> Params:
    if cfg["k"] < 2 or cfg["k"] > info.image_size:
        raise UserError(f"k must be within [2, {info.image_size}], got {cfg['k']}")
    if cfg["cross_ratio"] < 0:
        raise UserError(f"cross_ratio must be 0 or positive, got {cfg['cross_ratio']}")
    return {"grid": make_field(info.image_size, cfg["k"], cfg["s"], cfg["random_seed"], cfg["grid_rescale"])}


register_attack(AttackSpec(
    name="wanet", title="WaNet", options=WANET_OPTIONS, build=_wanet_build,
    apply=lambda images, params, train: apply_uint8(images, params["grid"]),
    training=wanet_hooks, batch_poisoning=True,
    description="fixed smooth warping field applied inside each batch, with noise-mode samples",
))
