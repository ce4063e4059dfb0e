"""SSBA, the sample-specific backdoor attack (docs/protocol.md §4): each poisoned image is replaced by a
StegaStamp-style encoding of itself that hides one fixed bit string, and relabelled to the target.

The official code reads pre-encoded images it does not ship; here the toolkit trains its own
encoder/decoder pair on the victim's clean training images (a cached, resumable resource):

- the encoder is a small U-Net (BatchNorm, two downsamplings). The secret bits (shifted to +-0.5)
  go through a linear layer to a coarse (quarter-resolution) feature map that is upsampled to the
  image size and concatenated with the image, as StegaStamp does (here also at the last level).
  The network outputs a residual, bounded by `MAX_RESIDUAL * tanh`, and the encoded image is
  `clip(x + residual)`;
- the decoder is a strided CNN that reads the bits back from the encoded image;
- both are trained together with Adam on random secrets: loss = BCE(bits) + w(t) * MSE(change),
  where the change is what the encoding does to the clean image (after clipping). w stays 0 until
  the decoder reads the bits (running bit accuracy >= 0.9, or at the latest halfway through), then
  ramps linearly to `ssba_image_weight` over `ssba_ramp` of the steps: the bits are learnt first
  and the residual is squeezed afterwards. An image loss from the start keeps the residual too
  faint for the decoder ever to pick up a signal (measured: bit accuracy stuck at 0.5). Training
  adds one uint8 step of uniform noise to the encoded images as a stand-in for the rounding to
  uint8 that a stored poisoned image undergoes; all measurements round for real.

The attack itself uses ONE secret derived from the seed. The encoder's weights and that secret are
trigger parameters, hence stored in the record, so a record can re-encode any image later without
the cache. The decoder is only needed to measure the encoder (bit accuracy) and stays in the cache.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils import engine
from utils.attacks.registry import AttackSpec, register_attack
from utils.config import Option, non_negative, positive, within
from utils.errors import UserError
from utils.record.resources import RESOURCE_OPTIONS, Resource, tensor_digest

SSBA_OPTIONS = RESOURCE_OPTIONS + [
    Option("ssba_bits", int, 32, "length of the hidden bit string; BackdoorBench's StegaStamp uses 100, but at the "
           "default 600 steps 100 bits reach only 0.76 bit accuracy on Fashion-MNIST, while 32 are learnt to 0.99", check=positive),
    Option("ssba_steps", int, 600, "training steps of the encoder/decoder pair", check=positive),
    Option("ssba_batch_size", int, 64, "batch size of the encoder/decoder training", check=positive),
    Option("ssba_lr", float, 1e-3, "Adam learning rate of the encoder/decoder training", check=positive),
    Option("ssba_image_weight", float, 20.0, "final weight of the image loss MSE(encoded - clean) (images in 0..1) "
           "against the bit loss; larger: less visible, harder to decode", check=non_negative),
    Option("ssba_ramp", float, 0.4, "length of the image-loss weight's ramp from 0, as a fraction of the steps "
           "(it starts once the bits are read)", check=within(0, 1)),
    Option("ssba_width", int, 16, "channels of the encoder's first level (doubled at each of its 2 downsamplings); "
           "at most 32, as the encoder is stored in the record (about 0.5 MB at 16, 2 MB at 32)", check=positive),
]

#: images encoded per forward pass in `apply` and in the measurements (bounds the memory)
CHUNK = 256
#: bound of the residual (0..1 units): 0.1 keeps even the untrained encoder above 20 dB PSNR, so
#: the bits are learnt from a faint residual instead of one that covers the image
MAX_RESIDUAL = 0.1
#: the image-loss ramp starts once the running bit accuracy over this many steps reaches START_ACC
#: (or at the latest halfway through training)
WINDOW = 50
START_ACC = 0.9
#: part of the cache key: bump when the networks or the training procedure change
ARCH_VERSION = 1
#: steps between two saves of the training progress
SAVE_EVERY = 100


# --- networks -------------------------------------------------------------------------------

def _conv(cin: int, cout: int, stride: int = 1, norm: bool = False) -> nn.Sequential:
    if norm:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2))
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2))


class Encoder(nn.Module):
    """(image in [0, 1], bits in {0, 1}) -> residual (same shape as the image, in 0..1 units)."""

    def __init__(self, channels: int, size: int, bits: int, width: int = 16, secret_channels: int = 4,
                 max_residual: float = MAX_RESIDUAL):
        super().__init__()
        self.max_residual = max_residual
        self.coarse = max(1, math.ceil(size / 4))
        self.secret_channels = secret_channels
        self.secret = nn.Linear(bits, secret_channels * self.coarse * self.coarse)
        w = width
        self.enc1 = nn.Sequential(_conv(channels + secret_channels, w, 1, True), _conv(w, w, 1, True))
        self.enc2 = nn.Sequential(_conv(w, 2 * w, 2, True), _conv(2 * w, 2 * w, 1, True))
        self.enc3 = nn.Sequential(_conv(2 * w, 4 * w, 2, True), _conv(4 * w, 4 * w, 1, True))
        self.up2 = _conv(4 * w, 2 * w, 1, True)
        self.dec2 = _conv(4 * w, 2 * w, 1, True)
        self.up1 = _conv(2 * w, w, 1, True)
        self.dec1 = nn.Sequential(_conv(2 * w + channels + secret_channels, w, 1, True), _conv(w, w))
        self.out = nn.Conv2d(w, channels, 1)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        s = F.leaky_relu(self.secret(bits - 0.5), 0.2).view(n, self.secret_channels, self.coarse, self.coarse)
        s = F.interpolate(s, size=(h, w), mode="nearest")
        xc = x - 0.5
        e1 = self.enc1(torch.cat((xc, s), 1))
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.up2(F.interpolate(e3, size=e2.shape[-2:], mode="nearest"))
        d2 = self.dec2(torch.cat((d2, e2), 1))
        d1 = self.up1(F.interpolate(d2, size=e1.shape[-2:], mode="nearest"))
        d1 = self.dec1(torch.cat((d1, e1, xc, s), 1))
        return self.max_residual * torch.tanh(self.out(d1))


class Decoder(nn.Module):
    """Encoded image in [0, 1] -> one logit per bit."""

    def __init__(self, channels: int, bits: int, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(_conv(channels, w, 1, True), _conv(w, w, 2, True), _conv(w, 2 * w, 1, True),
                                  _conv(2 * w, 2 * w, 2, True), _conv(2 * w, 4 * w, 1, True), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * w, 256), nn.LeakyReLU(0.2), nn.Linear(256, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x - 0.5))


def encode(encoder: Encoder, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The encoded image in [0, 1] (float, not rounded)."""
    return (x + encoder(x, bits)).clamp(0.0, 1.0)


def quantisation_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """`x` plus uniform noise of one uint8 step, the differentiable stand-in for rounding to uint8
    used in training (a hard rounding would erase the initially tiny residual, and with it any
    signal for the decoder to start from)."""
    noise = torch.rand(x.shape, generator=gen, device=gen.device).to(x.device) - 0.5
    return x + noise / 255


# --- options and the fixed secret ------------------------------------------------------------

def check_options(cfg: dict, image_size: int) -> None:
    if cfg["ssba_bits"] < 1:
        raise UserError(f"ssba_bits must be positive, got {cfg['ssba_bits']}")
    if cfg["ssba_bits"] > 1024:
        raise UserError(f"ssba_bits must be at most 1024, got {cfg['ssba_bits']}")
    for key in ("ssba_steps", "ssba_batch_size", "ssba_width"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    if cfg["ssba_batch_size"] > 4096:
        # each step draws this many images (with replacement) at once: bounded before it is allocated
        raise UserError(f"ssba_batch_size must be at most 4096, got {cfg['ssba_batch_size']}")
    if not cfg["ssba_lr"] > 0:
        raise UserError(f"ssba_lr must be positive, got {cfg['ssba_lr']}")
    if not cfg["ssba_image_weight"] >= 0:
        raise UserError(f"ssba_image_weight must be 0 or positive, got {cfg['ssba_image_weight']}")
    if not 0.0 <= cfg["ssba_ramp"] <= 1.0:
        raise UserError(f"ssba_ramp must be within [0, 1], got {cfg['ssba_ramp']}")
    if cfg["ssba_width"] > 32:
        raise UserError(f"ssba_width must be at most 32 (the encoder is stored in the record: about 2 MB at 32), "
                        f"got {cfg['ssba_width']}")
    if image_size < 4:
        raise UserError(f"SSBA needs images of at least 4 px, got {image_size}")


def make_secret(bits: int, seed: int) -> torch.Tensor:
    """The attack's fixed bit string (float 0/1, shape (bits,)), derived from the seed."""
    gen = torch.Generator().manual_seed(engine.derive_seed(seed, "ssba-secret"))
    return torch.randint(0, 2, (bits,), generator=gen).float()


# --- training (the resource step) ------------------------------------------------------------

def image_weight(step: int, start: int | None, steps: int, final: float, ramp: float) -> float:
    """Weight of the image loss at `step` (0-based): 0 before `start` (None: not started yet), then
    linear up to `final` over `ramp * steps` steps."""
    if start is None or step < start:
        return 0.0
    span = ramp * steps
    if span <= 0:
        return final
    return final * min(1.0, (step - start) / span)


def train_pair(images: torch.Tensor, bits: int, steps: int, batch_size: int, lr: float, final_weight: float,
               ramp: float, width: int, seed: int, device: torch.device, progress=None, show: bool = False,
               ) -> tuple[Encoder, Decoder, dict[str, float]]:
    """Train an encoder/decoder pair on uint8 `images` (N, C, H, W) with random secrets.
    `progress` (a resources.Progress or None) makes the training resumable."""
    _, channels, h, w = images.shape
    if h != w:
        raise UserError(f"SSBA expects square images, got {h}x{w}")
    encoder, decoder = engine.seeded_init(lambda: (Encoder(channels, h, bits, width), Decoder(channels, bits)),
                                          seed, "ssba-init")
    encoder, decoder = encoder.to(device), decoder.to(device)
    opt = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(engine.derive_seed(seed, "ssba-batches"))
    first, history, ramp_start = 0, [], None
    state = progress.load() if progress is not None else None
    if state is not None:
        engine.load_states(state, encoder=encoder, decoder=decoder, optimizer=opt, generator=gen)
        first, history, ramp_start = state["step"], state["history"], state["ramp_start"]
    data = images if images.device == device else images.to(device)
    n = len(data)
    bar = tqdm(range(first, steps), desc="ssba encoder", unit="step", disable=not show, initial=first, total=steps,
               dynamic_ncols=True)
    encoder.train()
    decoder.train()
    for step in bar:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        secret = torch.randint(0, 2, (batch_size, bits), generator=gen).float().to(device)
        x = data[idx.to(data.device)].float() / 255
        encoded = encode(encoder, x, secret)
        logits = decoder(quantisation_noise(encoded, gen))
        bit_loss = F.binary_cross_entropy_with_logits(logits, secret)
        img_loss = F.mse_loss(encoded, x)
        if ramp_start is None and (step >= steps // 2 or (len(history) >= WINDOW and sum(
                a for a, _ in history[-WINDOW:]) / WINDOW >= START_ACC)):
            ramp_start = step
        weight = image_weight(step, ramp_start, steps, final_weight, ramp)
        loss = bit_loss + weight * img_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            acc = float(((logits > 0).float() == secret).float().mean())
            history = history[-2 * WINDOW:] + [(acc, float(img_loss))]
        if show and (step + 1) % 50 == 0:
            recent = history[-50:]
            bar.set_postfix(bit_acc=f"{sum(a for a, _ in recent) / len(recent):.3f}",
                            psnr=f"{psnr_from_mse(sum(m for _, m in recent) / len(recent)):.1f}", w=f"{weight:.1f}")
        if progress is not None and ((step + 1) % SAVE_EVERY == 0) and step + 1 < steps:
            progress.save({"step": step + 1, "encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                           "optimizer": opt.state_dict(), "generator": gen.get_state(), "history": history,
                           "ramp_start": ramp_start})
    bar.close()
    encoder.eval()
    decoder.eval()
    recent = history[-100:]
    stats = {"train_bit_acc": sum(a for a, _ in recent) / len(recent),
             "train_psnr_db": psnr_from_mse(sum(m for _, m in recent) / len(recent))} if recent else {}
    return encoder, decoder, stats


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of images in 0..1 (inf for identical images)."""
    return float("inf") if mse <= 0 else 10 * math.log10(1.0 / mse)


# --- the trigger -----------------------------------------------------------------------------

def plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies, floating ones as float32 (what the record stores)."""
    return engine.to_cpu(state, float32=True)


def build_encoder(params: dict[str, Any]) -> Encoder:
    enc = Encoder(params["channels"], params["image_size"], params["bits"], params["width"])
    enc.load_state_dict(params["encoder"])
    return enc.eval()


# built encoders per params: id(params["encoder"]) -> (that state dict, device -> module). The
# state dict is kept alive alongside, so its id cannot be reused by another object while cached.
_BUILT: dict[int, tuple[dict, dict[str, Encoder]]] = {}
_MAX_BUILT = 4


def _encoder_for(params: dict[str, Any], device: torch.device) -> Encoder:
    state = params["encoder"]
    entry = _BUILT.get(id(state))
    if entry is None or entry[0] is not state:
        while len(_BUILT) >= _MAX_BUILT:
            _BUILT.pop(next(iter(_BUILT)))
        entry = (state, {})
        _BUILT[id(state)] = entry
    modules = entry[1]
    key = str(device)
    if key not in modules:
        modules[key] = build_encoder(params).to(device)
    return modules[key]


def _exact_float32():
    """cuDNN without autotuning, nondeterministic algorithms or TF32, so that an image's encoding
    does not depend on the batch it is in."""
    return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)


@torch.no_grad()
def apply_uint8(images: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Encode uint8 images (N, C, H, W) with the stored encoder and the fixed secret; uint8 out."""
    if images.dim() != 4 or images.shape[1] != params["channels"] or images.shape[-1] != params["image_size"] \
            or images.shape[-2] != params["image_size"]:
        raise UserError(f"the SSBA encoder was trained for {params['channels']}x{params['image_size']}x"
                        f"{params['image_size']} images, got shape {tuple(images.shape)}")
    if len(images) == 0:
        return images.clone()
    device = images.device
    encoder = _encoder_for(params, device)
    secret = params["secret"].to(device=device, dtype=torch.float32)[None]
    out = torch.empty_like(images)
    with _exact_float32(), torch.autocast(device.type, enabled=False):
        for start in range(0, len(images), CHUNK):
            x = images[start:start + CHUNK].float() / 255
            enc = encode(encoder, x, secret.expand(len(x), -1))
            out[start:start + CHUNK] = (enc * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out


@torch.no_grad()
def measure(encoder: Encoder, decoder: Decoder, images: torch.Tensor, secret: torch.Tensor,
            device: torch.device) -> dict[str, float]:
    """Bit accuracy of the decoder on the uint8-rounded encodings of `images` with `secret` (one
    secret for all, or one per image) and the PSNR (dB) of those encodings against the clean images."""
    encoder, decoder = encoder.to(device).eval(), decoder.to(device).eval()
    correct, total, sq = 0.0, 0, 0.0
    with torch.no_grad(), _exact_float32():
        for start in range(0, len(images), CHUNK):
            x8 = images[start:start + CHUNK].to(device)
            x = x8.float() / 255
            s = secret.to(device).float()
            s = s[start:start + CHUNK] if s.dim() == 2 else s[None].expand(len(x), -1)
            enc8 = (encode(encoder, x, s) * 255).round().clamp(0, 255)
            pred = (decoder(enc8 / 255) > 0).float()
            correct += float((pred == s).float().sum())
            total += s.numel()
            sq += float(((enc8 - x8.float()) / 255).pow(2).sum())
    n_values = images[:1].numel() * len(images)
    return {"bit_acc": correct / max(total, 1), "psnr_db": psnr_from_mse(sq / max(n_values, 1))}


# --- the attack --------------------------------------------------------------------------------

def ssba_build(cfg: dict, info) -> dict[str, Any]:
    check_options(cfg, info.image_size)
    return {"secret": make_secret(cfg["ssba_bits"], cfg["random_seed"]), "bits": int(cfg["ssba_bits"]),
            "channels": int(info.channels), "image_size": int(info.image_size), "width": int(cfg["ssba_width"])}


def encoder_key(ctx) -> dict[str, Any]:
    cfg, info = ctx.cfg, ctx.info
    return {"version": ARCH_VERSION, "dataset": info.name, "image_size": info.image_size, "channels": info.channels,
            "seed": cfg["random_seed"],
            "bits": cfg["ssba_bits"], "steps": cfg["ssba_steps"], "batch_size": cfg["ssba_batch_size"],
            "lr": cfg["ssba_lr"], "image_weight": cfg["ssba_image_weight"], "ramp": cfg["ssba_ramp"],
            "width": cfg["ssba_width"], "train_subset": tensor_digest(ctx.train_indices)}


def ssba_prepare(ctx) -> dict[str, Any]:
    """Train (or load from the cache) the encoder/decoder pair; measure it with the fixed secret."""
    cfg, params = ctx.cfg, ctx.params
    resource = Resource("ssba_encoder", encoder_key(ctx), ctx.resource_root)

    def build(progress):
        start = time.perf_counter()
        encoder, decoder, stats = train_pair(
            ctx.train.images, cfg["ssba_bits"], cfg["ssba_steps"], cfg["ssba_batch_size"], cfg["ssba_lr"],
            cfg["ssba_image_weight"], cfg["ssba_ramp"], cfg["ssba_width"], cfg["random_seed"], ctx.device,
            progress, ctx.progress)
        info = {k: round(v, 4) for k, v in stats.items()}
        info["train_seconds"] = round(time.perf_counter() - start, 1)
        return {"encoder": plain_state(encoder.state_dict()), "decoder": plain_state(decoder.state_dict())}, info

    payload = resource.get(build)
    encoder = Encoder(params["channels"], params["image_size"], params["bits"], params["width"])
    encoder.load_state_dict(payload["encoder"])
    decoder = Decoder(params["channels"], params["bits"])
    decoder.load_state_dict(payload["decoder"])
    held_out = ctx.test.images
    quality = measure(encoder, decoder, held_out, params["secret"], ctx.device)
    info = {"bit_acc": round(quality["bit_acc"], 4), "psnr_db": round(quality["psnr_db"], 2)}
    print(f"ssba encoder ({params['bits']} bits): bit accuracy {info['bit_acc']:.4f} and PSNR {info['psnr_db']:.2f} dB "
          f"on {len(held_out)} encoded test images (uint8, fixed secret)", flush=True)
    return {"encoder": plain_state(payload["encoder"]), "info": info}


def ssba_apply(images: torch.Tensor, params: dict[str, Any], train: bool) -> torch.Tensor:
    return apply_uint8(images, params)


register_attack(AttackSpec(
    name="ssba", title="SSBA", options=SSBA_OPTIONS, build=ssba_build, apply=ssba_apply, prepare=ssba_prepare,
    description="dirty-label: each poisoned image replaced by its StegaStamp-style encoding of one fixed bit string",
))
