"""BTI-DBF backdoor trigger inversion (Xu et al., "Towards Reliable and Efficient Backdoor Trigger
Inversion via Decoupling Benign Features", ICLR 2024) as the official PAM code runs it, for the
`bti` and `pam` purification modes.

Everything works in the model's normalised input space (the float batches of `Pipeline`) and on
the model's last-stage feature maps f(x) = `model.feature_maps(x)`, (N, C, h, w):

1. `pretrain_generator`: a UNet G (the official design: `unet_blocks` encoder levels of two
   3x3 conv + InstanceNorm + LeakyReLU, widths `unet_width * 2**i`, a bottleneck of twice the last
   width, transposed-convolution decoders with skip connections, a 1x1 output convolution; its raw
   output is the image, no residual and no clamp) learns to reproduce clean images while keeping
   the model's view of them: per batch, with the model in eval mode,

       soft_ce(softmax(model(x)) as logits, softmax(model(G(x))) as targets) + mse(f(x), f(G(x)))
         + (100 if mse(x, G(x)) > 0.1 else 0.01) * mse(x, G(x))

   (the official loss: a cross-entropy whose "logits" are already probabilities, and a switch
   that buys reconstruction hard until it is good enough).
2. `learn_feature_mask`, every round: a mask m = tanh(p) / (2 + 1e-7) + 0.5 over the whole
   feature map (shape (1, C, h, w), p drawn from a standard normal) is learnt with Adam on
   augmented clean batches so that the masked features keep the true label and the rest lose it:

       CE(head(pool(m * f(x))), y) - CE(head(pool((1 - m) * f(x))), y)

   The model is a copy in *train* mode, as officially: batch statistics in the forward pass, and
   the copy's BatchNorm running statistics follow the clean batches (the generator step then uses
   the copy in eval mode with those statistics). No sparsity term (the official code has none).
3. `train_generator`: G is trained further (its Adam optimiser persists across rounds) to move
   the backdoor features and keep the benign ones, per batch (batch means of squared errors):

       if mse(x, G(x)) > norm_bound or mse(m f(x), m f(G(x))) > feat_bound:  loss = mse(x, G(x))
       else:  loss = -mse((1-m) f(x), (1-m) f(G(x))) + benign_weight * mse(m f(x), m f(G(x)))

   plus, from the second round on, CE(model(G(x)), detected target). The bounds are enforced by
   switching the objective, so single batches may exceed them.
4. `detect_target`: the most frequent prediction of the model on G(x + 0.03 n), n ~ N(0, 1), over
   augmented clean batches.

The model under test is never changed (2. and 3. work on a copy). Randomness comes only from
explicit generators derived from `settings.seed` and a per-call purpose, so the same seed and
inputs give identical results on the CPU.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils import engine
from utils.errors import UserError

GENERATOR_ROUNDS = ("all", "first")


@dataclass
class BTISettings:
    """The official BTI-DBF defaults (its cfg.py and the PAM command of its defense.sh)."""

    pretrain_epochs: int = 50     # generator pre-training epochs (official preround)
    pretrain_lr: float = 1e-3     # Adam, pre-training and backdoor generator (official gen_lr)
    mask_epochs: int = 20         # feature-mask epochs per round (official mround)
    mask_lr: float = 0.01         # Adam learning rate of the mask parameters
    gen_epochs: int = 30          # backdoor-generator epochs per round (official uround)
    gen_lr: float = 1e-3
    norm_bound: float = 0.3       # image MSE above which the generator only shrinks its change
    feat_bound: float = 3.0       # benign-feature MSE above which the same happens
    benign_weight: float = 0.01   # weight of the benign-feature change in the generator loss
    detect_noise: float = 0.03    # std of the Gaussian noise added to the inputs for target detection
    # "all": G is trained again each round against the current model (BTI-DBF's design, and what the
    # official code does for the bti baseline); "first": only in round 1, what the shipped official
    # PAM code ends up doing (it switches G's requires_grad off for unlearning and never back on)
    generator_rounds: str = "all"
    unet_width: int = 32          # base filters of the UNet (official 32)
    unet_blocks: int = 4          # encoder/decoder levels (official 4)
    batch_size: int = 128
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        for name in ("pretrain_epochs", "mask_epochs", "gen_epochs"):
            if getattr(self, name) < 0:
                raise UserError(f"BTI setting {name} must be >= 0, got {getattr(self, name)}")
        for name in ("pretrain_lr", "mask_lr", "gen_lr", "norm_bound", "feat_bound"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"BTI setting {name} must be a positive number, got {value}")
        for name in ("benign_weight", "detect_noise"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"BTI setting {name} must be >= 0, got {value}")
        if self.generator_rounds not in GENERATOR_ROUNDS:
            raise UserError(f"BTI generator_rounds must be one of {', '.join(GENERATOR_ROUNDS)}, "
                            f"got {self.generator_rounds!r}")
        if self.batch_size < 1 or self.unet_width < 1 or not 1 <= self.unet_blocks <= 6:
            raise UserError(f"BTI settings need batch_size >= 1, unet_width >= 1 and unet_blocks in 1..6, got "
                            f"{self.batch_size}, {self.unet_width}, {self.unet_blocks}")


# --- generator ----------------------------------------------------------------------------------

class _ConvBlock(nn.Module):
    """Two 3x3 convolutions, each followed by an affine InstanceNorm and a LeakyReLU (slope 0.01).
    InstanceNorm makes G(x) of an image independent of its batch and of train/eval mode."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm1 = nn.InstanceNorm2d(cout, affine=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = nn.InstanceNorm2d(cout, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.norm1(self.conv1(x)))
        return F.leaky_relu(self.norm2(self.conv2(x)))


class _UpBlock(nn.Module):
    """Transposed convolution doubling the side (LeakyReLU after it), concatenation with the skip
    connection, then a conv block."""

    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, 3, stride=2, padding=1, output_padding=1)
        self.block = _ConvBlock(cin + skip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([F.leaky_relu(self.up(x)), skip], 1))


class UNetGenerator(nn.Module):
    """The official BTI-DBF generator design (see the module docstring), mapping a normalised image
    batch to one of the same shape.

    The official UNet needs sides divisible by 2**blocks with at least a 2x2 bottleneck (InstanceNorm
    cannot normalise a single pixel); other sizes (Fashion-MNIST's 28) are padded by edge replication
    up to the next valid side and the output is cropped back, so any image size works. Weights are
    initialised from `seed` with an explicit generator (PyTorch's default bounds), never the global RNG."""

    def __init__(self, channels: int, width: int = 32, blocks: int = 4, seed: int = 0):
        super().__init__()
        if channels < 1 or width < 1 or not 1 <= blocks <= 6:
            raise UserError(f"UNetGenerator needs channels >= 1, width >= 1 and 1..6 blocks, got "
                            f"{channels}, {width}, {blocks}")
        widths = [min(width * 2 ** i, 512) for i in range(blocks)]
        self.down = nn.ModuleList(_ConvBlock(channels if i == 0 else widths[i - 1], w) for i, w in enumerate(widths))
        self.bottleneck = _ConvBlock(widths[-1], 2 * widths[-1])
        ups, cin = [], 2 * widths[-1]
        for w in reversed(widths):
            ups.append(_UpBlock(cin, w, w))
            cin = w
        self.up = nn.ModuleList(ups)
        self.out = nn.Conv2d(widths[0], channels, 1)
        self.blocks = blocks
        self._init_weights(seed)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """PyTorch's default convolution initialisation (uniform in +-1/sqrt(fan_in)), drawn from a
        seeded CPU generator; InstanceNorm affine parameters start at 1 and 0."""
        gen = torch.Generator().manual_seed(engine.derive_seed(seed, "bti-unet-init"))
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                for p in (module.weight, module.bias):
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen))

    def padded_side(self, side: int) -> int:
        step = 2 ** self.blocks
        return max(2 * step, -(-side // step) * step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = self.padded_side(h) - h, self.padded_side(w) - w
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = block(x, skip)
        x = self.out(x).float()
        return x[..., ph // 2:ph // 2 + h, pw // 2:pw // 2 + w]


def synthesize(generator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G(x) for a normalised float batch: no gradient, float32. Leaves the generator's mode as it was."""
    was_training = generator.training
    generator.eval()
    try:
        with torch.no_grad():
            return generator(x).float()
    finally:
        generator.train(was_training)


# --- helpers ------------------------------------------------------------------------------------

@contextlib.contextmanager
def _no_param_grads(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters of `model` need no gradient inside (gradients still flow through it to its inputs
    or to a mask); flags restored on exit."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


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


def _batches(images_u8: torch.Tensor, pipeline: engine.Pipeline, batch_size: int, gen: torch.Generator,
             labels: torch.Tensor | None = None):
    """Shuffled, augmented (training transform) float batches, as the official clean loader gives."""
    for idx in engine.index_batches(len(images_u8), batch_size, True, gen, images_u8.device):
        x = pipeline.train_batch(images_u8[idx], gen)
        yield (x, labels[idx]) if labels is not None else x


def soft_target_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with probability targets, batch mean: -sum(t * log_softmax(logits))."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _image_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error (N,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


# --- the steps ----------------------------------------------------------------------------------

def pretrain_loss(generator: nn.Module, model: nn.Module, x: torch.Tensor, amp: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pre-training objective on one batch (module docstring, step 1): (loss, prediction term,
    feature term, image MSE); gradients reach G only through G(x)."""
    with _autocast(x.device, amp):
        gx = generator(x)
        with torch.no_grad():
            f0 = model.feature_maps(x)
            p0 = F.softmax(model.logits_from_maps(f0).float(), dim=1)
        f1 = model.feature_maps(gx)
        p1 = F.softmax(model.logits_from_maps(f1).float(), dim=1)
    pred = soft_target_ce(p0, p1)
    feat = F.mse_loss(f1.float(), f0.float())
    norm = F.mse_loss(gx.float(), x.float())
    weight = 100.0 if float(norm.detach()) > 0.1 else 0.01
    return pred + feat + weight * norm, pred, feat, norm


def pretrain_generator(generator: nn.Module, model: nn.Module, images_u8: torch.Tensor, pipeline: engine.Pipeline,
                       settings: BTISettings, amp: torch.dtype | None = None) -> list[dict]:
    """Pre-train G to reproduce clean images as the model sees them (objective in the module
    docstring). Returns one row per epoch with the epoch means of the three terms. The model is
    used in eval mode and left unchanged; G is left in eval mode."""
    settings.validate()
    _check_images(images_u8, "pretrain_generator")
    _check_generator(generator, images_u8, "pretrain_generator")
    device = images_u8.device
    gen = engine.make_generator(settings.seed, device, "bti-pretrain")
    opt = torch.optim.Adam(generator.parameters(), lr=settings.pretrain_lr)
    rows = []
    was_training = model.training
    model.eval()
    generator.train()
    bar = _bar(settings.pretrain_epochs, "bti pretrain", settings.progress)
    with _no_param_grads(model):
        for epoch in range(settings.pretrain_epochs):
            sums, batches = torch.zeros(3, device=device), 0
            for x in _batches(images_u8, pipeline, settings.batch_size, gen):
                loss, pred, feat, norm = pretrain_loss(generator, model, x, amp)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += torch.stack([pred.detach(), feat.detach(), norm.detach()])
                batches += 1
            means = (sums / max(batches, 1)).tolist()
            rows.append({"epoch": epoch + 1, "pred_loss": means[0], "feat_mse": means[1], "recon_mse": means[2]})
            bar.update(1)
            bar.set_postfix(recon_mse=f"{means[2]:.4f}")
    bar.close()
    model.train(was_training)
    generator.eval()
    return rows


def mask_from_params(params: torch.Tensor) -> torch.Tensor:
    """The official bounded mask: tanh(p) / (2 + 1e-7) + 0.5, strictly inside (0, 1)."""
    return torch.tanh(params) / (2 + 1e-7) + 0.5


def learn_feature_mask(inv_model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, pipeline: engine.Pipeline,
                       settings: BTISettings, amp: torch.dtype | None = None, purpose: str = "bti-mask") -> torch.Tensor:
    """The benign-feature mask (1, C, h, w) in (0, 1) over `inv_model.feature_maps` (objective in
    the module docstring), from a fresh N(0, 1) start. `inv_model` is the working copy: it runs in
    train mode, so its BatchNorm running statistics change, as in the official code."""
    settings.validate()
    _check_images(images_u8, "learn_feature_mask")
    if labels.shape != (len(images_u8),):
        raise UserError(f"learn_feature_mask: {len(images_u8)} images but labels of shape {tuple(labels.shape)}")
    device = images_u8.device
    labels = labels.to(device=device, dtype=torch.long)
    gen = engine.make_generator(settings.seed, device, purpose)
    with torch.no_grad():
        was_training = inv_model.training
        inv_model.eval()
        shape = inv_model.feature_maps(pipeline.eval_batch(images_u8[:1])).shape
        inv_model.train(was_training)
    params = torch.randn(shape, device=device, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([params], lr=settings.mask_lr)
    inv_model.train()
    bar = _bar(settings.mask_epochs, "bti mask", settings.progress)
    with _no_param_grads(inv_model):
        for _ in range(settings.mask_epochs):
            for x, y in _batches(images_u8, pipeline, settings.batch_size, gen, labels):
                m = mask_from_params(params)
                with _autocast(device, amp):
                    f = inv_model.feature_maps(x)
                    kept = inv_model.logits_from_maps(f * m).float()
                    rest = inv_model.logits_from_maps(f * (1 - m)).float()
                loss = F.cross_entropy(kept, y) - F.cross_entropy(rest, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bar.update(1)
    bar.close()
    return mask_from_params(params.detach())


def generator_losses(inv_model: nn.Module, mask: torch.Tensor, x: torch.Tensor, gx: torch.Tensor,
                     amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image mse, benign-feature mse, backdoor-feature mse, logits of G(x)) for one batch, batch
    means over every element as torch's MSELoss; gradients flow through G(x) only."""
    with _autocast(x.device, amp):
        with torch.no_grad():
            f0 = inv_model.feature_maps(x).float()
        f1 = inv_model.feature_maps(gx).float()
        logits = inv_model.logits_from_maps(f1).float()
    norm = F.mse_loss(gx.float(), x.float())
    benign = F.mse_loss(mask * f1, mask * f0)
    backdoor = F.mse_loss((1 - mask) * f1, (1 - mask) * f0)
    return norm, benign, backdoor, logits


def generator_objective(norm: torch.Tensor, benign: torch.Tensor, backdoor: torch.Tensor, logits: torch.Tensor,
                        settings: BTISettings, target: int | None = None) -> tuple[torch.Tensor, bool]:
    """The switching generator loss of the module docstring (step 3) and whether a bound was exceeded."""
    over = float(norm.detach()) > settings.norm_bound or float(benign.detach()) > settings.feat_bound
    loss = norm if over else -backdoor + settings.benign_weight * benign
    if target is not None:
        loss = loss + F.cross_entropy(logits, torch.full((len(logits),), target, device=logits.device, dtype=torch.long))
    return loss, over


def train_generator(generator: UNetGenerator, optimizer: torch.optim.Optimizer, inv_model: nn.Module,
                    mask: torch.Tensor, images_u8: torch.Tensor, pipeline: engine.Pipeline, settings: BTISettings,
                    amp: torch.dtype | None = None, target: int | None = None,
                    purpose: str = "bti-generator") -> dict:
    """Train the backdoor generator (continuing from its weights and its optimiser's state) with the
    switching objective of the module docstring, plus CE towards `target` when given. The model copy
    runs in eval mode. Returns the epoch means of the last epoch and the share of batches over the
    bounds: {"image_mse", "benign_mse", "backdoor_mse", "over_bound"}."""
    settings.validate()
    _check_images(images_u8, "train_generator")
    _check_generator(generator, images_u8, "train_generator")
    device = images_u8.device
    mask = mask.detach().to(device=device, dtype=torch.float32)
    gen = engine.make_generator(settings.seed, device, purpose)
    inv_model.eval()
    generator.train()
    stats = {"image_mse": float("nan"), "benign_mse": float("nan"), "backdoor_mse": float("nan"), "over_bound": 0.0}
    bar = _bar(settings.gen_epochs, "bti generator", settings.progress)
    with _no_param_grads(inv_model):
        for _ in range(settings.gen_epochs):
            sums, batches = torch.zeros(4, device=device), 0
            for x in _batches(images_u8, pipeline, settings.batch_size, gen):
                with _autocast(device, amp):
                    gx = generator(x)
                norm, benign, backdoor, logits = generator_losses(inv_model, mask, x, gx, amp)
                loss, over = generator_objective(norm, benign, backdoor, logits, settings, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums += torch.stack([norm.detach(), benign.detach(), backdoor.detach(),
                                     torch.tensor(float(over), device=device)])
                batches += 1
            means = (sums / max(batches, 1)).tolist()
            stats = {"image_mse": means[0], "benign_mse": means[1], "backdoor_mse": means[2], "over_bound": means[3]}
            bar.update(1)
    bar.close()
    generator.eval()
    return stats


@torch.no_grad()
def detect_target(model: nn.Module, generator: nn.Module, images_u8: torch.Tensor, pipeline: engine.Pipeline,
                  settings: BTISettings, amp: torch.dtype | None = None,
                  purpose: str = "bti-detect") -> tuple[int, float]:
    """The model's most frequent prediction on G(x + noise) over augmented clean batches (ties:
    the smallest class) and the share of images predicted as it, in (0, 1]. Eval mode; the model's
    mode is restored."""
    _check_images(images_u8, "detect_target")
    _check_generator(generator, images_u8, "detect_target")
    gen = engine.make_generator(settings.seed, images_u8.device, purpose)
    was_training = model.training
    model.eval()
    preds = []
    for x in _batches(images_u8, pipeline, settings.batch_size, gen):
        noise = torch.randn(x.shape, device=x.device, generator=gen) * settings.detect_noise
        gx = synthesize(generator, x + noise)
        if pipeline.channels_last:
            gx = gx.contiguous(memory_format=torch.channels_last)
        with _autocast(images_u8.device, amp):
            preds.append(model(gx).argmax(1))
    model.train(was_training)
    counts = torch.bincount(torch.cat(preds))
    target = int(counts.argmax())
    return target, float(counts[target]) / len(images_u8)


class Inverter:
    """BTI-DBF across the rounds of an unlearning defense: the generator is pre-trained once; each
    round learns a fresh mask on a copy of the current model and (every round, or only the first
    with `generator_rounds: first`) trains the generator further against that copy; the target
    label is detected after round 1 and pulls the generator from round 2 on."""

    def __init__(self, model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, pipeline: engine.Pipeline,
                 settings: BTISettings, amp: torch.dtype | None = None, generator: UNetGenerator | None = None,
                 pretrain_rows: list[dict] | None = None):
        settings.validate()
        self.images, self.labels, self.pipeline, self.settings, self.amp = images_u8, labels, pipeline, settings, amp
        if generator is None:
            generator = UNetGenerator(images_u8.shape[1], settings.unet_width, settings.unet_blocks,
                                      settings.seed).to(images_u8.device)
            pretrain_rows = pretrain_generator(generator, model, images_u8, pipeline, settings, amp)
        self.generator = generator
        self.pretrain_rows = pretrain_rows or []
        self.optimizer = torch.optim.Adam(generator.parameters(), lr=settings.gen_lr)
        self.target: int | None = None

    def invert(self, model: nn.Module, round_no: int) -> dict:
        inv_model = copy.deepcopy(model)
        mask = learn_feature_mask(inv_model, self.images, self.labels, self.pipeline, self.settings, self.amp,
                                  purpose=f"bti-mask-{round_no}")
        trains = round_no == 1 or self.settings.generator_rounds == "all"
        stats = {}
        if trains:
            stats = train_generator(self.generator, self.optimizer, inv_model, mask, self.images, self.pipeline,
                                    self.settings, self.amp, target=self.target if round_no > 1 else None,
                                    purpose=f"bti-generator-{round_no}")
        found, share = detect_target(model, self.generator, self.images, self.pipeline, self.settings, self.amp,
                                     purpose=f"bti-detect-{round_no}")
        if self.target is None:
            self.target = found
        return {"round": round_no, "generator_trained": trains, "detected_target": found, "target_share": share,
                "mask_mean": float(mask.mean()), **stats}
