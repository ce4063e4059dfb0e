"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020): a generator network G draws an
input-specific trigger pattern and a mask network M decides where it goes,

    x' = x + M(x) * (G(x) - x)          (pixel space, x in [0, 1]; M has one channel)

so every image carries its own trigger. G and M are the original's encoder-decoders: 3 levels of
32, 64, 128 channels with BatchNorm (`net_depth`, `net_width`, `net_norm`; the original uses 2
levels from 16 channels for MNIST only). Training has two phases.

Phase 1 (the `prepare` resource step, cached and resumable per epoch): M alone is trained for
`mask_epochs` on pairs of training images (x1, x2) drawn from two independent shuffles with

    lambda_norm * mean(relu(M(x1) - mask_density))  +  lambda_div * mean(|x1 - x2| / |M(x1) - M(x2)|)

(|.| the per-sample root-mean-square distance): the first term keeps the masks sparse, the second
makes different inputs get different masks. As in the original, the density term is applied per
pixel (a pixel's mask value above the density is penalised), which drives the mean mask down to
about `mask_density`. Adam (lr `mask_lr`, betas 0.5/0.9), lr x0.1 after 40 % and 80 % of the epochs
(the original's milestones 10 and 20 of 25).

Phase 2 (inside the victim's training, batch poisoning like WaNet): in each batch the first
`int(pratio * B)` samples get their own trigger and the backdoor label, the next
`int(cross_ratio * pratio * B)` get the trigger made by G and M from ANOTHER sample of the batch and
keep their labels (cross-trigger samples: they teach the classifier that a trigger only works on
the image it was made for), the rest stay clean. G (in train mode) is trained jointly with the
classifier on cross-entropy plus lambda_div * mean(|x_a - x_b| / |G(x_a) - G(x_b)|) over the pairs
(backdoor image, cross source), with its own Adam (lr `generator_lr`, betas 0.5/0.9) stepped after
the classifier's SGD step; M stays fixed. The original never clears G's gradient in this phase, so
each of its steps follows the sum of all gradients so far; `generator_zero_grad: true` clears it
after each step instead. The classifier trains with SGD at lr 0.01, constant (the attack YAML).

How the trigger meets the toolkit's pipeline: the hooks fetch the batch's raw uint8 images by their
dataset indices and build the inputs themselves (`augment=False`, the pipeline's normalised batch is
not used). As in the original, the images first get the pipeline's random crop and flip, then the
trigger, and nothing after (`augment_order: post` instead triggers the raw image and then shifts it
by `random_crop` pixels, rotates it by up to `random_rotation` degrees and flips it, per sample).
The trigger is computed as `apply` computes it at test time, on the native-size image in [0, 1], in
float32, rounded to the uint8 grid with a straight-through gradient; then the batch is normalised
and resized like `engine.Pipeline` does. With BatchNorm (the default) a training trigger uses the
statistics of its batch, a test trigger the running ones, as in the original; `net_norm: group`
makes every trigger independent of its batch and of train/eval mode.

What is stored: M's weights (after phase 1) and G's weights (after the last epoch) are trigger
parameters, hence in the record, so `apply` can re-create every poisoned sample and the backdoor test
set from a record alone.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from utils import engine
from utils.attacks.registry import AttackSpec, TrainingHooks, register_attack
from utils.attacks.poison import backdoor_labels
from utils.attacks.wanet import shift_rotate
from utils.config import Option, parse_bool, non_negative, positive, within
from utils.errors import UserError
from utils.record.resources import RESOURCE_OPTIONS, Resource, tensor_digest

INPUTAWARE_OPTIONS = RESOURCE_OPTIONS + [
    Option("mask_epochs", int, 25, "epochs of the mask network's pre-training (phase 1)", check=positive),
    Option("mask_density", float, 0.032, "target density of the masks: mask values above it are penalised", check=within(0, 1, low_open=True, high_open=True)),
    Option("lambda_norm", float, 100.0, "weight of the mask density loss", check=non_negative),
    Option("lambda_div", float, 1.0, "weight of the diversity losses (mask in phase 1, pattern in phase 2)", check=non_negative),
    Option("mask_lr", float, 0.01, "Adam learning rate of the mask network", check=positive),
    Option("mask_batch_size", int, 128, "batch size of the mask pre-training", check=within(2, 2**20)),
    Option("generator_lr", float, 0.01, "Adam learning rate of the pattern generator (phase 2)", check=positive),
    Option("generator_zero_grad", parse_bool, False,
           "clear G's gradient after each step; false: it accumulates over the whole run, as in the original"),
    Option("cross_ratio", float, 1.0, "cross-trigger samples per backdoor sample in each batch", check=non_negative),
    Option("net_width", int, 32, "channels of the first level of G and M, doubled at each further level "
           "(the original: 32, and 16 for MNIST)", check=within(1, 128)),
    Option("net_depth", int, 3, "levels (downsamplings) of G and M (the original: 3, and 2 for MNIST)", check=within(1, 5)),
    Option("net_norm", str, "batch", "normalisation in G and M: batch (the original's BatchNorm; a training "
           "batch's triggers use its statistics) or group (per-sample GroupNorm, a trigger independent of the "
           "batch and of train/eval mode)", choices=("batch", "group")),
    Option("augment_order", str, "pre", "pre: the pipeline's crop/flip before the trigger, nothing after, as the "
           "original; post: trigger on the raw image, then a per-sample shift/rotation/flip", choices=("pre", "post")),
    Option("random_crop", int, 5, "augment_order post only: random shift in pixels (0: none)", check=within(0, 64)),
    Option("random_rotation", float, 10.0, "augment_order post only: random rotation in degrees (0: none)", check=within(0, 180)),
]

#: images per forward pass in `apply` and in the measurements (bounds the memory)
CHUNK = 256
#: added to the pattern/mask distance in the diversity losses and to the tanh squashing's divisor
#: (the original's epsilon)
EPS = 1e-7


# --- networks -------------------------------------------------------------------------------

#: architecture tag, part of the mask cache's key (a cache of another architecture cannot load)
ARCH = "encdec-v2"


def _conv(cin: int, cout: int, norm: str, relu: bool = True) -> nn.Sequential:
    # BatchNorm as the original's blocks (momentum 0.05)
    layers = [nn.Conv2d(cin, cout, 3, 1, 1),
              nn.BatchNorm2d(cout, eps=1e-5, momentum=0.05) if norm == "batch" else nn.GroupNorm(min(4, cout), cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _squash(h: torch.Tensor) -> torch.Tensor:
    """The original's map to (0, 1): tanh(h) / (2 + eps) + 1/2."""
    return torch.tanh(h) / (2 + EPS) + 0.5


class EncoderDecoder(nn.Module):
    """The original's convolutional encoder-decoder (no skips): image in [0, 1] -> raw map of
    `out_channels` at the input's size. Level l has width * 2**l channels: two convolutions then a
    2x2 max-pool on the way down, one convolution in the middle, and on the way up a bilinear
    upsampling, a convolution and a convolution that halves the channels (the very last one maps to
    `out_channels` and has no ReLU). Every convolution is followed by a normalisation: without it
    the freshly initialised networks map every input to nearly the same output and G never recovers.
    The upsampling goes back to the size of the level above, so sizes that are not multiples of
    2**depth (28 px at depth 3) work too; for other sizes it is the original's factor 2."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 32, depth: int = 3, norm: str = "batch"):
        super().__init__()
        widths = [width * 2 ** level for level in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(nn.Sequential(_conv(cin, w, norm), _conv(w, w, norm)))
            cin = w
        self.middle = _conv(cin, cin, norm)
        self.up = nn.ModuleList()
        for level in reversed(range(depth)):
            w = widths[level]
            last = level == 0
            cout = out_channels if last else widths[level - 1]
            self.up.append(nn.Sequential(_conv(w, w, norm), _conv(w, cout, norm, relu=not last)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x - 0.5
        sizes = []
        for block in self.down:
            h = block(h)
            sizes.append(h.shape[-2:])
            h = F.max_pool2d(h, 2)
        h = self.middle(h)
        for block, size in zip(self.up, reversed(sizes)):
            h = block(F.interpolate(h, size=size, mode="bilinear", align_corners=False))
        return h


class PatternGenerator(EncoderDecoder):
    """G: image -> trigger pattern of the same shape, in (0, 1)."""

    def __init__(self, channels: int, width: int = 32, depth: int = 3, norm: str = "batch"):
        super().__init__(channels, channels, width, depth, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _squash(super().forward(x))


class MaskGenerator(EncoderDecoder):
    """M: image -> one-channel mask in (0, 1). As in the original, the squashing to (0, 1) is
    followed by a steep threshold around 0.5, so the masks end up nearly binary."""

    def __init__(self, channels: int, width: int = 32, depth: int = 3, norm: str = "batch"):
        super().__init__(channels, 1, width, depth, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _squash(20 * _squash(super().forward(x)) - 10)


def blend(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x + mask * (pattern - x): a per-pixel convex combination, so it stays within [0, 1]."""
    return x + mask * (pattern - x)


def to_uint8_grid(x: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels of a uint8 image; the gradient passes straight through."""
    return x + ((x * 255).round() / 255 - x).detach()


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square distance. A tiny floor under the root keeps its gradient finite
    when two outputs are identical (saturated masks), where a plain sqrt would give NaN."""
    return ((a - b).pow(2).flatten(1).mean(1) + 1e-12).sqrt()


def diversity_loss(inputs_a: torch.Tensor, inputs_b: torch.Tensor, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
    """mean(|x_a - x_b| / (|f(x_a) - f(x_b)| + eps)): small when different inputs get different outputs."""
    if len(inputs_a) == 0:
        return out_a.sum() * 0
    return (rms_distance(inputs_a, inputs_b) / (rms_distance(out_a, out_b) + EPS)).mean()


def density_loss(mask: torch.Tensor, density: float) -> torch.Tensor:
    """mean(relu(mask - density)): penalises every mask value above the target density."""
    return F.relu(mask - density).mean()


def init_generator(channels: int, width: int, seed: int, depth: int = 3, norm: str = "batch") -> PatternGenerator:
    return engine.seeded_init(lambda: PatternGenerator(channels, width, depth, norm), seed, "inputaware-generator-init")


def init_mask(channels: int, width: int, seed: int, depth: int = 3, norm: str = "batch") -> MaskGenerator:
    return engine.seeded_init(lambda: MaskGenerator(channels, width, depth, norm), seed, "inputaware-mask-init")


def net_arch(params: dict[str, Any]) -> dict[str, Any]:
    """G's and M's architecture from trigger parameters (width, depth, norm)."""
    if "depth" not in params:
        raise UserError("this Input-aware record was made with the earlier 2-level GroupNorm networks, which this "
                        "version no longer builds; re-run the attack")
    return {"width": params["width"], "depth": params["depth"], "norm": params["norm"]}


def plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies, floating ones as float32 (what the record stores)."""
    return engine.to_cpu(state, float32=True)


def _fp32():
    """No autocast and, on CUDA, no TF32 or autotuning, so a trigger is the same in every run."""
    return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False)


# --- options --------------------------------------------------------------------------------

def check_options(cfg: dict, image_size: int) -> None:
    for key in ("mask_epochs", "mask_batch_size", "net_width", "net_depth"):
        if cfg[key] < 1:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    if cfg["mask_batch_size"] < 2:
        raise UserError(f"mask_batch_size must be at least 2, got {cfg['mask_batch_size']}")
    if cfg["net_width"] > 128:
        raise UserError(f"net_width must be at most 128 (G and M are stored in the record), got {cfg['net_width']}")
    if not 0.0 < cfg["mask_density"] < 1.0:
        raise UserError(f"mask_density must be within (0, 1), got {cfg['mask_density']}")
    for key in ("lambda_norm", "lambda_div", "cross_ratio", "random_rotation"):
        if not cfg[key] >= 0:
            raise UserError(f"{key} must be 0 or positive, got {cfg[key]}")
    for key in ("mask_lr", "generator_lr"):
        if not cfg[key] > 0:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    if cfg["random_rotation"] > 180:
        raise UserError(f"random_rotation must be at most 180 degrees, got {cfg['random_rotation']}")
    if not 0 <= cfg["random_crop"] < image_size:
        raise UserError(f"random_crop must be within [0, {image_size - 1}] pixels, got {cfg['random_crop']}")
    if cfg["net_depth"] > 5:
        raise UserError(f"net_depth must be at most 5, got {cfg['net_depth']}")
    if image_size < 2 ** cfg["net_depth"]:
        raise UserError(f"net_depth {cfg['net_depth']} halves the image {cfg['net_depth']} times: it needs images of at "
                        f"least {2 ** cfg['net_depth']} px, got {image_size}")
    if 0 < cfg["pratio"] and int(cfg["batch_size"] * cfg["pratio"]) < 1:
        raise UserError(f"pratio {cfg['pratio']} x batch_size {cfg['batch_size']} is below one sample: no image of a "
                        "batch would be poisoned; raise --batch_size or --pratio")


# --- phase 1: the mask network (resource step) -----------------------------------------------

def mask_milestones(epochs: int) -> list[int]:
    """Epochs after which the mask lr drops x0.1: 40 % and 80 % of the run (10 and 20 of 25)."""
    return sorted({max(1, round(0.4 * epochs)), max(1, round(0.8 * epochs))})


def train_mask_net(images: torch.Tensor, epochs: int, batch_size: int, lr: float, density: float, lambda_norm: float,
                   lambda_div: float, width: int, seed: int, device: torch.device, progress=None,
                   show: bool = False, depth: int = 3, norm: str = "batch") -> tuple[MaskGenerator, dict[str, float]]:
    """Pre-train M on uint8 `images` (N, C, H, W). `progress` (a resources.Progress or None) saves
    the state after every epoch, so a killed run resumes at the last finished epoch."""
    channels = images.shape[1]
    net = init_mask(channels, width, seed, depth, norm).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, mask_milestones(epochs), 0.1)
    gen = torch.Generator().manual_seed(engine.derive_seed(seed, "inputaware-mask-batches"))
    first, history = 0, []
    state = progress.load() if progress is not None else None
    if state is not None:
        engine.load_states(state, net=net, optimizer=opt, scheduler=sched, generator=gen)
        first, history = state["epoch"], state["history"]
    data = images.to(device)
    n = len(data)
    steps = (n + batch_size - 1) // batch_size
    bar = tqdm(total=epochs * steps, initial=first * steps, desc="inputaware mask", unit="step", disable=not show,
               dynamic_ncols=True)
    net.train()
    for epoch in range(first, epochs):
        order_a = torch.randperm(n, generator=gen).to(device)
        order_b = torch.randperm(n, generator=gen).to(device)
        sums = torch.zeros(3, device=device)
        for start in range(0, n, batch_size):
            xa = data[order_a[start:start + batch_size]].float() / 255
            xb = data[order_b[start:start + batch_size]].float() / 255
            ma, mb = net(xa), net(xb)
            norm = density_loss(ma, density)
            div = diversity_loss(xa, xb, ma, mb)
            loss = lambda_norm * norm + lambda_div * div
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.stack((norm.detach(), div.detach(), ma.detach().mean())) * len(xa)
            bar.update(1)
        sched.step()
        norm_m, div_m, dens_m = (sums / n).tolist()
        history.append({"epoch": epoch + 1, "loss_norm": norm_m, "loss_div": div_m, "density": dens_m})
        bar.set_postfix(norm=f"{norm_m:.4f}", div=f"{div_m:.3f}", density=f"{dens_m:.4f}")
        if progress is not None and epoch + 1 < epochs:
            progress.save({"epoch": epoch + 1, "net": net.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "generator": gen.get_state(), "history": history})
    bar.close()
    net.eval()
    last = history[-1] if history else {}
    return net, {f"train_{k}": v for k, v in last.items() if k != "epoch"}


@torch.no_grad()
def mask_stats(net: MaskGenerator, images: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Mean mask value and mean distance ratio between masks of consecutive images (0 for identical
    masks) on uint8 `images`."""
    net = net.to(device).eval()
    total, count, spread = 0.0, 0, []
    with _fp32(), torch.autocast(device.type, enabled=False):
        for start in range(0, len(images), CHUNK):
            x = images[start:start + CHUNK].to(device).float() / 255
            m = net(x)
            total += float(m.sum())
            count += m.numel()
            if len(m) > 1:
                spread.append(rms_distance(m[:-1], m[1:]))
    return {"mask_density": total / max(count, 1),
            "mask_distance": float(torch.cat(spread).mean()) if spread else 0.0}


def mask_key(ctx) -> dict[str, Any]:
    cfg, info = ctx.cfg, ctx.info
    return {"dataset": info.name, "image_size": info.image_size, "channels": info.channels, "seed": cfg["random_seed"],
            "epochs": cfg["mask_epochs"], "density": cfg["mask_density"], "lambda_norm": cfg["lambda_norm"],
            "lambda_div": cfg["lambda_div"], "lr": cfg["mask_lr"], "batch_size": cfg["mask_batch_size"],
            "width": cfg["net_width"], "depth": cfg["net_depth"], "norm": cfg["net_norm"], "arch": ARCH,
            "train_subset": tensor_digest(ctx.train_indices)}


def inputaware_prepare(ctx) -> dict[str, Any]:
    """Phase 1: train (or load from the cache) the mask network; measure it on the test images."""
    cfg, params = ctx.cfg, ctx.params
    resource = Resource("inputaware_mask", mask_key(ctx), ctx.resource_root)

    def build(progress):
        start = time.perf_counter()
        net, stats = train_mask_net(ctx.train.images, cfg["mask_epochs"], cfg["mask_batch_size"], cfg["mask_lr"],
                                    cfg["mask_density"], cfg["lambda_norm"], cfg["lambda_div"], cfg["net_width"],
                                    cfg["random_seed"], ctx.device, progress, ctx.progress, cfg["net_depth"],
                                    cfg["net_norm"])
        info = {k: round(v, 5) for k, v in stats.items()}
        info["train_seconds"] = round(time.perf_counter() - start, 1)
        return {"mask": plain_state(net.state_dict())}, info

    payload = resource.get(build)
    net = MaskGenerator(params["channels"], **net_arch(params))
    net.load_state_dict(payload["mask"])
    stats = mask_stats(net, ctx.test.images, ctx.device)
    info = {"mask_epochs": int(cfg["mask_epochs"]), "mask_density_test": round(stats["mask_density"], 5),
            "mask_distance_test": round(stats["mask_distance"], 5)}
    print(f"inputaware mask ({cfg['mask_epochs']} epochs): mean mask {info['mask_density_test']:.4f} (target "
          f"{cfg['mask_density']}), mean RMS distance between masks of two test images {info['mask_distance_test']:.4f}",
          flush=True)
    return {"mask": plain_state(payload["mask"]), "info": info}


# --- the trigger ------------------------------------------------------------------------------

def inputaware_build(cfg: dict, info) -> dict[str, Any]:
    """Architecture facts and G's seeded initial weights (the backdoor test set before any training
    uses them); M's weights come from `inputaware_prepare`."""
    check_options(cfg, info.image_size)
    arch = {"width": int(cfg["net_width"]), "depth": int(cfg["net_depth"]), "norm": cfg["net_norm"]}
    gnet = init_generator(info.channels, seed=cfg["random_seed"], **arch)
    return {"channels": int(info.channels), "image_size": int(info.image_size), **arch,
            "generator": plain_state(gnet.state_dict())}


# built networks per params: (id(G state), id(M state)) -> (those states, device -> (G, M)). The
# states are kept alive alongside, so their ids cannot be reused by other objects while cached.
_BUILT: dict[tuple[int, int], tuple[tuple[dict, dict], dict[str, tuple[nn.Module, nn.Module]]]] = {}
_MAX_BUILT = 4


def networks_for(params: dict[str, Any], device: torch.device) -> tuple[PatternGenerator, MaskGenerator]:
    g_state, m_state = params["generator"], params["mask"]
    key = (id(g_state), id(m_state))
    entry = _BUILT.get(key)
    if entry is None or entry[0][0] is not g_state or entry[0][1] is not m_state:
        while len(_BUILT) >= _MAX_BUILT:
            _BUILT.pop(next(iter(_BUILT)))
        entry = ((g_state, m_state), {})
        _BUILT[key] = entry
    nets = entry[1]
    if str(device) not in nets:
        g = PatternGenerator(params["channels"], **net_arch(params))
        g.load_state_dict(g_state)
        m = MaskGenerator(params["channels"], **net_arch(params))
        m.load_state_dict(m_state)
        nets[str(device)] = (g.to(device).eval(), m.to(device).eval())
    return nets[str(device)]


@torch.no_grad()
def apply_uint8(images: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Each uint8 image (N, C, H, W) gets its own trigger from the stored G and M; uint8 out."""
    c, s = params["channels"], params["image_size"]
    if images.dim() != 4 or images.shape[1] != c or images.shape[-2] != s or images.shape[-1] != s:
        raise UserError(f"the Input-aware networks were trained for {c}x{s}x{s} images, got shape {tuple(images.shape)}")
    if len(images) == 0:
        return images.clone()
    device = images.device
    gnet, mnet = networks_for(params, device)
    out = torch.empty_like(images)
    with _fp32(), torch.autocast(device.type, enabled=False):
        for start in range(0, len(images), CHUNK):
            x = images[start:start + CHUNK].float() / 255
            poisoned = blend(x, gnet(x), mnet(x))
            out[start:start + CHUNK] = (poisoned * 255).round_().clamp_(0, 255).to(torch.uint8)
    return out


def inputaware_apply(images: torch.Tensor, params: dict[str, Any], train: bool) -> torch.Tensor:
    return apply_uint8(images, params)


# --- phase 2: joint training of the classifier and G -----------------------------------------

def batch_counts(batch: int, pratio: float, cross_ratio: float) -> tuple[int, int]:
    """(backdoor samples, cross-trigger samples) in a batch of `batch`."""
    n_bd = int(batch * pratio)
    return n_bd, min(int(n_bd * cross_ratio), batch - n_bd)


def partners(batch: int, first: int, count: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """For the batch positions first..first+count-1: a random OTHER position of the batch each."""
    if count == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    shift = torch.randint(1, batch, (count,), generator=gen, device=device)
    return (torch.arange(first, first + count, device=device) + shift) % batch


def poison_batch(x: torch.Tensor, y: torch.Tensor, gnet: nn.Module, mnet: nn.Module, n_bd: int, n_cross: int,
                 sources: torch.Tensor, target: int, label_trans: str, classes: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In-batch poisoning on pixel-space images x in [0, 1]: the first `n_bd` get their own trigger
    and the backdoor label; the next `n_cross` get the trigger of `x[sources]` and keep their labels;
    the rest are returned unchanged. Triggered images are rounded to the uint8 grid (straight-through).
    As in the original, G runs once on the backdoor images and once on the sources (with BatchNorm in
    train mode, each group is normalised by its own statistics), and the diversity loss pairs the
    i-th backdoor image with the i-th source. Returns (images, labels, pattern diversity loss); the
    gradient reaches G, never M."""
    if n_bd + n_cross == 0:
        return x, y, x.new_zeros(())
    own, src = x[:n_bd], x[sources]
    own_patterns = gnet(own) if n_bd else own
    src_patterns = gnet(src) if n_cross else src
    with torch.no_grad():
        own_masks = mnet(own) if n_bd else own[:, :1]
        src_masks = mnet(src) if n_cross else src[:, :1]
    triggered = torch.cat((blend(own, own_patterns, own_masks), blend(x[n_bd:n_bd + n_cross], src_patterns, src_masks)))
    images = torch.cat((to_uint8_grid(triggered), x[n_bd + n_cross:]))
    labels = torch.cat((backdoor_labels(y[:n_bd], target, label_trans, classes), y[n_bd:]))
    pairs = min(n_bd, n_cross)
    div = diversity_loss(own[:pairs], src[:pairs], own_patterns[:pairs], src_patterns[:pairs])
    return images, labels, div


class _GradState:
    """G's accumulated gradient seen as an object with state_dict()/load_state_dict(), so a resumed
    run carries on the original's never-cleared sum."""

    def __init__(self, net: nn.Module):
        self.net = net

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.grad.detach().clone() for name, p in self.net.named_parameters() if p.grad is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, p in self.net.named_parameters():
            p.grad = state[name].to(p.device).clone() if name in state else None


class _RngState:
    """A torch.Generator seen as an object with state_dict()/load_state_dict() (for resuming)."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.gen.set_state(state["state"])


def inputaware_hooks(cfg: dict, model, exp) -> TrainingHooks:
    device = exp.device
    params = exp.trigger_params
    gnet = PatternGenerator(params["channels"], **net_arch(params))
    gnet.load_state_dict(params["generator"])
    gnet = gnet.to(device).train()  # as the original: BatchNorm on each batch's statistics while training
    mnet = MaskGenerator(params["channels"], **net_arch(params))
    mnet.load_state_dict(params["mask"])
    mnet = mnet.to(device).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(gnet.parameters(), lr=cfg["generator_lr"], betas=(0.5, 0.9))
    gen = engine.make_generator(cfg["random_seed"], device, "inputaware-batches")
    images = exp.train.images  # clean uint8, on the device (the static poison list is empty)
    pipe = exp.pipeline
    post = cfg.get("augment_order", "pre") == "post"
    shift = int(round(cfg["random_crop"] * pipe.input_size / pipe.native_size))
    classes = exp.info.num_classes

    def loss_fn(net, x, y, idx):
        # "pre": the pipeline's own crop/flip on the raw images, then the trigger (the original's
        # loader transform); "post": the trigger on the raw image, then shift/rotation/flip
        raw = (images[idx] if post else pipe.augment(images[idx], gen)).float() / 255
        n_bd, n_cross = batch_counts(len(y), cfg["pratio"], cfg["cross_ratio"])
        sources = partners(len(y), n_bd, n_cross, gen, device)
        with _fp32(), torch.autocast(device.type, enabled=False):
            poisoned, labels, div = poison_batch(raw, y, gnet, mnet, n_bd, n_cross, sources, cfg["attack_target"],
                                                 cfg["attack_label_trans"], classes)
            inputs = (poisoned - pipe.mean) / pipe.std
            if pipe.input_size != inputs.shape[-1]:
                inputs = F.interpolate(inputs, size=(pipe.input_size, pipe.input_size), mode="bilinear",
                                       align_corners=False)
            if post and (shift or cfg["random_rotation"] or exp.info.flip):
                inputs = shift_rotate(inputs, shift, cfg["random_rotation"], exp.info.flip, gen)
        if pipe.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = net(inputs)
        # train_acc is counted against the clean labels, which the backdoor samples do not match
        return F.cross_entropy(logits, labels) + cfg["lambda_div"] * div, logits

    def after_step():
        opt_g.step()
        # the original never clears G's gradient in this phase: every step adds to the sum so far
        if cfg.get("generator_zero_grad", False):
            opt_g.zero_grad(set_to_none=True)

    def trigger_params():
        return {"generator": plain_state(gnet.state_dict())}

    state = {"generator": gnet, "generator_optimizer": opt_g, "rng": _RngState(gen)}
    if not cfg.get("generator_zero_grad", False):
        state["generator_grad"] = _GradState(gnet)
    return TrainingHooks(loss_fn, after_step, state, augment=False, trigger_params=trigger_params)


register_attack(AttackSpec(
    name="inputaware", title="Input-aware", options=INPUTAWARE_OPTIONS, build=inputaware_build, apply=inputaware_apply,
    prepare=inputaware_prepare, training=inputaware_hooks, batch_poisoning=True,
    description="input-specific trigger pattern (generator) placed by a pre-trained mask network, learnt jointly "
                "with the classifier, with cross-trigger samples",
))
