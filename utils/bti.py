"""BTI-DBF backdoor trigger inversion (Xu et al., "Towards Reliable and Efficient Backdoor Trigger
Inversion via Decoupling Benign Features", ICLR 2024), as a library for the `bti` and `pam`
purification modes.

Everything works in the model's *normalised* input space (the float batches of `Pipeline`):

1. `pretrain_generator`: a small UNet G learns to reproduce its input (MSE), so it starts near the
   identity map. G is residual (G(x) = x + UNet(x)): the UNet only has to learn a small output,
   so a few pre-training epochs get it close to the identity (reconstruction MSE ~0.01 after 10
   Adam steps on 100 tiny 16 px images, against ~0.9 for a plain UNet), and the whole MSE budget of step
   3 goes into the trigger instead of into reconstruction error.
2. `learn_feature_mask`: a soft mask m = sigmoid(logits) over the penultimate features f(x) =
   model.features(x) is learnt on clean images with their true labels, minimising

       CE(head(f(x) * m), y)  -  CE(head(f(x) * (1 - m)), y)  +  mask_sparsity * mean(m)

   i.e. the features kept by m suffice for the true label ("benign features"), the rest do not
   ("backdoor features"), and m is kept small so that only what the benign task needs is called
   benign (the official code logs the mask's L1 norm but does not penalise it). f(x) is computed
   once (no augmentation, model frozen) and the mask is fitted on the cached features, so this
   step costs one forward pass over the images.
3. `train_generator`: G is trained (continuing from its current weights) to minimise

       benign_weight * mean_i ||m * (f(G(x_i)) - f(x_i))||_2  -  mean_i ||(1 - m) * (f(G(x_i)) - f(x_i))||_2

   i.e. keep the benign features and move the backdoor features as far as possible (plain L2
   norms, so the objective scales linearly with the feature change; the official code uses squared
   errors with weight 0.01 on the benign part and a bound on it). The image budget is enforced
   by projection, not by a penalty: `UNetGenerator.forward` rescales each
   image's change G(x) - x so that its mean squared error is at most the generator's `mse_bound`
   buffer (set from `BTISettings.mse_bound` here). The bound therefore holds for every single image,
   in training and in `synthesize`, up to float32 rounding (relative error ~1e-6; the tests allow
   1e-4).

The model under test is never changed: it runs in eval mode with every parameter's requires_grad
switched off, and both are restored on exit (`_frozen`). Randomness comes only from explicit
generators (`engine.make_generator(settings.seed, device, purpose)`), so the same seed and inputs
give identical results on the CPU; each call re-derives its streams from `settings.seed`, so a
caller that wants different batch orders per round passes a different seed per round.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from models import get_head
from utils import engine
from utils.errors import UserError


@dataclass
class BTISettings:
    pretrain_epochs: int = 5      # generator pre-training: reproduce its input (MSE), on the clean tuning images
    pretrain_lr: float = 0.01     # Adam learning rate of the pre-training
    mask_epochs: int = 10         # feature-mask learning epochs (on cached features)
    mask_lr: float = 0.1          # Adam learning rate of the mask logits
    # weight of mean(m) in the mask objective: large enough that features the benign task does not
    # need drift to the backdoor side, small next to the two cross-entropy terms (O(1))
    mask_sparsity: float = 0.1
    gen_epochs: int = 5           # backdoor-generator epochs per call
    gen_lr: float = 0.01          # Adam learning rate of the generator
    # weight of the benign-feature change in the generator objective; at 1 a mask that keeps most
    # features made the identity map optimal (G collapsed to G(x) ~ x in toy runs), so it is smaller
    benign_weight: float = 0.1
    mse_bound: float = 0.3        # bound on the per-image mean squared error between G(x) and x, normalised input space
    batch_size: int = 128
    width: int = 16               # base channel width of the UNet
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        for name in ("pretrain_epochs", "mask_epochs", "gen_epochs"):
            if getattr(self, name) < 0:
                raise UserError(f"BTI setting {name} must be >= 0, got {getattr(self, name)}")
        for name in ("pretrain_lr", "mask_lr", "gen_lr", "mse_bound"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"BTI setting {name} must be a positive number, got {value}")
        for name in ("mask_sparsity", "benign_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"BTI setting {name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1 or self.width < 1:
            raise UserError(f"BTI settings batch_size and width must be >= 1, got {self.batch_size}, {self.width}")


# --- generator ----------------------------------------------------------------------------------

def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with GroupNorm and ReLU. GroupNorm (not BatchNorm) makes G(x) of an
    image independent of its batch and of the module's train/eval mode."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU(inplace=True))


class UNetGenerator(nn.Module):
    """A small UNet (two down/up levels with skip connections) mapping an image batch to one of the
    same shape. Down-sampling is ceil-mode max-pooling and up-sampling interpolates to the exact size
    of the skip connection, so any image size works (28, 32, 64, odd sizes, even 1 px).

    The output is residual, out = x + delta * scale with delta = UNet(x): the `mse_bound` buffer
    (inf until `train_generator` sets it; saved in the state dict) caps each image's mean squared
    change through scale = min(1, sqrt(bound / mean(delta^2))). Output dtype is float32.
    Weights are initialised from `seed` with an explicit generator, never the global RNG."""

    def __init__(self, channels: int, width: int = 16, seed: int = 0):
        super().__init__()
        if channels < 1 or width < 1:
            raise UserError(f"UNetGenerator needs channels >= 1 and width >= 1, got {channels}, {width}")
        self.enc1 = _block(channels, width)
        self.enc2 = _block(width, 2 * width)
        self.mid = _block(2 * width, 4 * width)
        self.dec2 = _block(4 * width + 2 * width, 2 * width)
        self.dec1 = _block(2 * width + width, width)
        self.out = nn.Conv2d(width, channels, 1)
        self.register_buffer("mse_bound", torch.tensor(float("inf")))
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """PyTorch's default Conv2d initialisation (uniform in +-1/sqrt(fan_in) for weights and
        biases), drawn from a seeded CPU generator."""
        gen = torch.Generator().manual_seed(engine.derive_seed(seed, "bti-unet-init"))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                for p in (module.weight, module.bias):
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        mid = self.mid(F.max_pool2d(e2, 2, ceil_mode=True))
        d2 = self.dec2(torch.cat([F.interpolate(mid, size=e2.shape[-2:], mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:], mode="nearest"), e1], 1))
        delta = self.out(d1).float()
        mse = delta.pow(2).mean(dim=(1, 2, 3), keepdim=True)
        # = min(1, sqrt(bound / mse)), written so that bound = inf and mse = 0 give finite gradients
        scale = (mse / self.mse_bound.float()).clamp_min(1.0).rsqrt()
        return x.float() + delta * scale


def synthesize(generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G(x) for a normalised float batch: no gradient, float32, one forward pass of the small UNet.
    Runs in eval mode and leaves the generator in the mode it was in."""
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            return generator(x)
    finally:
        generator.train(was_training)


# --- helpers ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode with no parameter requiring a gradient; mode and flags restored on
    exit. Gradients still flow through it to its inputs."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)


def _autocast(device: torch.device, amp: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def _check_images(images_u8: torch.Tensor, what: str) -> None:
    if images_u8.dim() != 4 or images_u8.dtype != torch.uint8:
        raise UserError(f"{what}: expected a uint8 image batch (N, C, H, W), got {images_u8.dtype} "
                        f"of shape {tuple(images_u8.shape)}")
    if len(images_u8) == 0:
        raise UserError(f"{what}: no images to work on")


def _check_generator(generator: nn.Module, images_u8: torch.Tensor, what: str) -> None:
    param = next(generator.parameters(), None)
    if param is not None and param.device != images_u8.device:
        raise UserError(f"{what}: the generator is on {param.device} but the images are on {images_u8.device}")


def _bar(total: int, desc: str, progress: bool):
    return tqdm(total=total, desc=desc, unit="epoch", leave=False, disable=not progress, dynamic_ncols=True)


def _image_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error (N,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


# --- the three steps ----------------------------------------------------------------------------

def pretrain_generator(generator: nn.Module, images_u8: torch.Tensor, pipeline: engine.Pipeline,
                       settings: BTISettings, amp: torch.dtype | None = None) -> list[dict]:
    """Train G to reproduce its (augmented, normalised) input with an MSE loss, so that it starts
    near the identity. Returns one row per epoch: {"epoch", "recon_mse"} (mean over the epoch's
    images, measured during training). Leaves G in eval mode."""
    settings.validate()
    _check_images(images_u8, "pretrain_generator")
    _check_generator(generator, images_u8, "pretrain_generator")
    device = images_u8.device
    gen = engine.make_generator(settings.seed, device, "bti-pretrain")
    opt = torch.optim.Adam(generator.parameters(), lr=settings.pretrain_lr)
    rows = []
    generator.train()
    bar = _bar(settings.pretrain_epochs, "bti pretrain", settings.progress)
    for epoch in range(settings.pretrain_epochs):
        total, seen = torch.zeros((), device=device), 0
        for idx in engine.index_batches(len(images_u8), settings.batch_size, True, gen, device):
            x = pipeline.train_batch(images_u8[idx], gen)
            with _autocast(device, amp):
                out = generator(x)
            loss = _image_mse(out, x).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
            seen += len(idx)
        rows.append({"epoch": epoch + 1, "recon_mse": float(total) / seen})
        bar.update(1)
        bar.set_postfix(recon_mse=f"{rows[-1]['recon_mse']:.4f}")
    bar.close()
    generator.eval()
    return rows


@torch.no_grad()
def _features(model: nn.Module, images_u8: torch.Tensor, pipeline: engine.Pipeline, batch_size: int,
              amp: torch.dtype | None) -> torch.Tensor:
    """Float32 penultimate features of the (unaugmented) images, (N, D)."""
    out = []
    for start in range(0, len(images_u8), batch_size):
        with _autocast(images_u8.device, amp):
            out.append(model.features(pipeline.eval_batch(images_u8[start:start + batch_size])).float())
    return torch.cat(out)


def learn_feature_mask(model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, pipeline: engine.Pipeline,
                       settings: BTISettings, amp: torch.dtype | None = None) -> torch.Tensor:
    """The benign-feature mask m (D,) in [0, 1] over model.features (objective in the module
    docstring), learnt from scratch (logits 0, m = 0.5) against the model as it is now."""
    settings.validate()
    _check_images(images_u8, "learn_feature_mask")
    if labels.shape != (len(images_u8),):
        raise UserError(f"learn_feature_mask: {len(images_u8)} images but labels of shape {tuple(labels.shape)}")
    device = images_u8.device
    labels = labels.to(device=device, dtype=torch.long)
    with _frozen(model):
        feats = _features(model, images_u8, pipeline, settings.batch_size, amp)
        head = get_head(model)
        logits = torch.zeros(feats.shape[1], device=device, requires_grad=True)
        opt = torch.optim.Adam([logits], lr=settings.mask_lr)
        gen = engine.make_generator(settings.seed, device, "bti-mask")
        bar = _bar(settings.mask_epochs, "bti mask", settings.progress)
        for _ in range(settings.mask_epochs):
            for idx in engine.index_batches(len(feats), settings.batch_size, True, gen, device):
                f, y = feats[idx], labels[idx]
                m = torch.sigmoid(logits)
                benign = F.cross_entropy(head(f * m).float(), y)
                backdoor = F.cross_entropy(head(f * (1 - m)).float(), y)
                loss = benign - backdoor + settings.mask_sparsity * m.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bar.update(1)
        bar.close()
    return torch.sigmoid(logits.detach())


def _feature_shifts(model: nn.Module, mask: torch.Tensor, x: torch.Tensor, gx: torch.Tensor,
                    amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L2 norms of the feature change f(G(x)) - f(x) on the benign (m) and backdoor
    (1 - m) parts, (N,) each; the gradient flows through f(G(x)) only."""
    with _autocast(x.device, amp):
        with torch.no_grad():
            f0 = model.features(x).float()
        f1 = model.features(gx).float()
    d = f1 - f0
    return (d * mask).norm(dim=1), (d * (1 - mask)).norm(dim=1)


def train_generator(generator: UNetGenerator, model: nn.Module, mask: torch.Tensor, images_u8: torch.Tensor,
                    pipeline: engine.Pipeline, settings: BTISettings, amp: torch.dtype | None = None) -> dict:
    """Train the backdoor generator (continuing from its current weights) to keep the benign
    features and move the backdoor features, under the per-image MSE bound (sets
    `generator.mse_bound`). Returns statistics measured after training on the unaugmented images:
    {"benign_shift", "backdoor_shift"} (mean per-image L2 feature change on each part),
    {"mse"} (mean per-image MSE of G(x) vs x) and {"max_mse"}. Leaves G in eval mode."""
    settings.validate()
    _check_images(images_u8, "train_generator")
    _check_generator(generator, images_u8, "train_generator")
    device = images_u8.device
    mask = mask.detach().to(device=device, dtype=torch.float32)
    generator.mse_bound.fill_(settings.mse_bound)
    gen = engine.make_generator(settings.seed, device, "bti-generator")
    opt = torch.optim.Adam(generator.parameters(), lr=settings.gen_lr)
    with _frozen(model):
        with torch.no_grad():
            dim = model.features(pipeline.eval_batch(images_u8[:1])).shape[1]
        if mask.shape != (dim,):
            raise UserError(f"train_generator: mask of shape {tuple(mask.shape)} but the model has {dim} features")
        generator.train()
        bar = _bar(settings.gen_epochs, "bti generator", settings.progress)
        for _ in range(settings.gen_epochs):
            for idx in engine.index_batches(len(images_u8), settings.batch_size, True, gen, device):
                x = pipeline.train_batch(images_u8[idx], gen)
                with _autocast(device, amp):
                    gx = generator(x)
                benign, backdoor = _feature_shifts(model, mask, x, gx, amp)
                loss = settings.benign_weight * benign.mean() - backdoor.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bar.update(1)
        bar.close()
        generator.eval()
        sums = torch.zeros(3, device=device, dtype=torch.float64)
        max_mse = torch.zeros((), device=device)
        with torch.no_grad():
            for start in range(0, len(images_u8), settings.batch_size):
                x = pipeline.eval_batch(images_u8[start:start + settings.batch_size])
                gx = generator(x)
                benign, backdoor = _feature_shifts(model, mask, x, gx, amp)
                mse = _image_mse(gx, x)
                sums += torch.stack([benign.sum(), backdoor.sum(), mse.sum()]).double()
                max_mse = torch.maximum(max_mse, mse.max())
    n = len(images_u8)
    return {"benign_shift": float(sums[0]) / n, "backdoor_shift": float(sums[1]) / n, "mse": float(sums[2]) / n,
            "max_mse": float(max_mse)}


@torch.no_grad()
def detect_target(model: nn.Module, generator: nn.Module, images_u8: torch.Tensor, pipeline: engine.Pipeline,
                  batch_size: int = 256, amp: torch.dtype | None = None) -> tuple[int, float]:
    """The model's most frequent prediction on G(x) over the images (ties: the smallest class) and
    the share of images predicted as it, in (0, 1]."""
    _check_images(images_u8, "detect_target")
    _check_generator(generator, images_u8, "detect_target")
    batch_size = engine.eval_batch_size(batch_size, images_u8.device)
    preds = []
    with _frozen(model):
        for start in range(0, len(images_u8), batch_size):
            gx = synthesize(generator, pipeline.eval_batch(images_u8[start:start + batch_size]))
            if pipeline.channels_last:
                gx = gx.contiguous(memory_format=torch.channels_last)
            with _autocast(images_u8.device, amp):
                preds.append(model(gx).argmax(1))
    counts = torch.bincount(torch.cat(preds))
    target = int(counts.argmax())
    return target, float(counts[target]) / len(images_u8)
