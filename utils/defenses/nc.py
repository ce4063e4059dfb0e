"""NC, Neural Cleanse (Wang et al., S&P 2019), as BackdoorBench runs it (`defense/nc.py`).

For every class c a trigger is reverse-engineered on the clean tuning set: a mask m in [0, 1]^(HxW)
and a pattern p in [0, 1]^(CxHxW), both tanh-parametrised (x / (2 + 1e-7) + 0.5 of tanh, starting
from tanh(1)), minimising CE(f((1 - m) x + m p), c) + cost * |m|_1 with Adam (lr 0.1, betas 0.5/0.9)
on augmented batches of the frozen model in eval mode. The cost follows the original schedule:
it starts at `init_cost`; after `patience` epochs in a row with attack success >= the threshold it
is multiplied by `cost_multiplier`, after `patience` epochs below it divided by multiplier^1.5; the
kept trigger is the one with the smallest mask norm among the successful epochs (the first epoch's
when none succeeds); early stop after 25 epochs without a 1% improvement once the cost has moved
both ways. Then the MAD outlier test on the classes' mask norms: anomaly index
|norm - median| / (1.4826 * median(|norm - median|)); a class is flagged when its index exceeds 2
and its norm is at most the median. When any is flagged, the model is fine-tuned on the tuning set
with its last 20% of images replaced by copies carrying each flagged class's reversed trigger (true
labels); when none is, the model is returned unchanged.

BackdoorBench's CIFAR-10 settings (the same for GTSRB, CIFAR-100, Tiny): 5% split, 80 reversal
epochs, batch 256; unlearning 100 epochs, SGD lr 0.01 momentum 0.9 wd 5e-4, cosine.
"""
from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from models import get_head
from utils import engine
from utils.config import Option, non_negative, positive, within
from utils.defenses.purify import FINETUNE, Mode, purify, register_mode

_EPS = 1e-7
EARLY_STOP_THRESHOLD = 0.99  # an epoch improves on the best norm only by more than 1%
MAD_CONSISTENCY = 1.4826

OPTIONS = (
    Option("nc_epochs", int, 80, "nc: trigger-reversal epochs per class (default 80, BackdoorBench; fewer for CPU runs)", check=positive),
    Option("nc_mask_lr", float, 0.1, "nc: Adam learning rate of the mask and pattern (default 0.1)", check=positive),
    Option("nc_init_cost", float, 1e-3, "nc: initial weight of the mask's L1 norm (default 0.001)", check=non_negative),
    Option("nc_cost_multiplier", float, 2.0, "nc: cost multiplied by this after patience successful epochs, divided by its 1.5th power after patience failed ones (default 2)", check=positive),
    Option("nc_patience", int, 5, "nc: epochs in a row before the cost moves (default 5)", check=positive),
    Option("nc_early_stop_patience", int, 25, "nc: epochs without improvement before a class's reversal stops (default 25; 0: never stop early)", check=non_negative),
    Option("nc_success_threshold", float, 0.98, "nc: attack success of the reversed trigger that counts as success (default 0.98)", check=within(0, 1)),
    Option("nc_anomaly_threshold", float, 2.0, "nc: anomaly index above which a class with a small mask is flagged (default 2)", check=positive),
    Option("nc_unlearn_ratio", float, 0.2, "nc: share of the tuning set given a flagged class's reversed trigger for unlearning (default 0.2)", check=within(0, 1)),
)


def _squash(raw: torch.Tensor) -> torch.Tensor:
    return torch.tanh(raw) / (2 + _EPS) + 0.5


def reverse_trigger(model: nn.Module, images: torch.Tensor, pipeline, target: int, *, epochs: int, batch_size: int,
                    lr: float, init_cost: float, multiplier: float, patience: int, early_stop_patience: int,
                    success: float, seed: int, amp=None, progress: bool = False) -> dict:
    """Reverse-engineer the smallest trigger that sends the tuning images to `target`. Returns the mask
    (H, W) and pattern (C, H, W) in [0, 1] (CPU float), the mask's L1 norm, whether some epoch reached
    `success`, and the epochs run."""
    device = images.device
    _, channels, height, width = images.shape
    mask_raw = torch.ones(1, height, width, device=device, requires_grad=True)
    pattern_raw = torch.ones(channels, height, width, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
    gen = engine.make_generator(seed, device, f"nc-reverse-{target}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    cost = init_cost
    best = {"norm": math.inf, "mask": None, "pattern": None}
    up = down = cost_set = stale = 0
    went_up = went_down = False
    early_best = math.inf
    epochs_run = 0
    for _ in tqdm(range(epochs), desc=f"nc {target}", unit="ep", leave=False, disable=not progress):
        epochs_run += 1
        accs, regs = [], []
        for idx in engine.index_batches(len(images), batch_size, True, gen, device, False):
            x01 = pipeline.augment(images[idx], gen).float() / 255.0
            mask, pattern = _squash(mask_raw), _squash(pattern_raw)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(pipeline.float_batch((1 - mask) * x01 + mask * pattern))
            wanted = torch.full((len(idx),), target, device=device, dtype=torch.long)
            reg = mask.abs().sum()
            loss = F.cross_entropy(logits.float(), wanted) + cost * reg
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            accs.append((logits.detach().argmax(1) == wanted).float().mean())
            regs.append(reg.detach())
        acc, reg = float(torch.stack(accs).mean()), float(torch.stack(regs).mean())
        if acc >= success and reg < best["norm"]:
            best = {"norm": reg, "mask": _squash(mask_raw).detach(), "pattern": _squash(pattern_raw).detach()}
        if early_stop_patience:  # the original's early stop, once the cost has moved both ways
            if best["norm"] < math.inf:
                stale = stale + 1 if best["norm"] >= EARLY_STOP_THRESHOLD * early_best else 0
            early_best = min(early_best, best["norm"])
            if went_up and went_down and stale >= early_stop_patience:
                break
        if cost == 0 and acc >= success:
            cost_set += 1
            if cost_set >= patience:
                cost, up, down, went_up, went_down = init_cost, 0, 0, False, False
        else:
            cost_set = 0
        up, down = (up + 1, 0) if acc >= success else (0, down + 1)
        if up >= patience:
            up, cost, went_up = 0, cost * multiplier, True
        elif down >= patience:
            down, cost, went_down = 0, cost / multiplier ** 1.5, True
        if best["mask"] is None:  # the original keeps the first epoch's trigger until one succeeds
            best = {"norm": math.inf, "mask": _squash(mask_raw).detach(), "pattern": _squash(pattern_raw).detach()}
    mask, pattern = best["mask"][0].cpu(), best["pattern"].cpu()
    return {"mask": mask, "pattern": pattern, "norm": float(mask.abs().sum()), "succeeded": best["norm"] < math.inf,
            "epochs": epochs_run}


def anomaly_indices(norms: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """MAD anomaly index of each norm, with the median and the scaled MAD (torch's median: the lower
    middle value for an even count, as the original)."""
    norms = norms.double()
    median = norms.median()
    mad = MAD_CONSISTENCY * (norms - median).abs().median()
    index = (norms - median).abs() / mad.clamp_min(1e-12)
    return index, float(median), float(mad)


def flagged_classes(norms: torch.Tensor, threshold: float = 2.0) -> list[int]:
    """Classes with an anomaly index above `threshold` and a norm at most the median, smallest norm first."""
    index, median, _ = anomaly_indices(norms)
    found = [c for c in range(len(norms)) if float(norms[c]) <= median and float(index[c]) > threshold]
    return sorted(found, key=lambda c: float(norms[c]))


def stamp(images: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """uint8 images with a reversed trigger: (1 - m) x + m * 255 p, rounded."""
    m, p = mask.to(images.device), pattern.to(images.device)
    return ((1 - m) * images.float() + m * p * 255.0).round().clamp(0, 255).to(torch.uint8)


def png(array: torch.Tensor) -> bytes:
    """A PNG of a [0, 1] image, (H, W) or (C, H, W) with C 1 or 3."""
    pixels = (array.clamp(0, 1) * 255).round().to(torch.uint8)
    if pixels.dim() == 3:
        pixels = pixels[0] if pixels.shape[0] == 1 else pixels.permute(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels.contiguous().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def unlearning_set(images: torch.Tensor, labels: torch.Tensor, triggers: list[dict], ratio: float):
    """The original's unlearning set: the first (1 - ratio) of the tuning images as they are, then the
    remaining ones once per flagged trigger, stamped, with their true labels."""
    keep = int(len(images) * (1 - ratio))
    parts, part_labels = [images[:keep]], [labels[:keep]]
    for trig in triggers:
        parts.append(stamp(images[keep:], trig["mask"], trig["pattern"]))
        part_labels.append(labels[keep:])
    return torch.cat(parts), torch.cat(part_labels)


def neural_cleanse(model: nn.Module, mode: Mode, tuning):
    settings, opt = tuning.settings, tuning.option
    num_classes = get_head(model, settings.linear_name).out_features
    reversed_ = []
    for target in range(num_classes):
        found = reverse_trigger(model, tuning.images, tuning.pipeline, target, epochs=opt("nc_epochs"),
                                batch_size=settings.batch_size, lr=opt("nc_mask_lr"), init_cost=opt("nc_init_cost"),
                                multiplier=opt("nc_cost_multiplier"), patience=opt("nc_patience"),
                                early_stop_patience=opt("nc_early_stop_patience"),
                                success=opt("nc_success_threshold"), seed=settings.seed, amp=tuning.amp,
                                progress=settings.progress)
        reversed_.append(found)
        tuning.artifacts[f"class{target}_mask.png"] = png(found["mask"])
        tuning.artifacts[f"class{target}_pattern.png"] = png(found["pattern"])
        tuning.artifacts[f"class{target}_trigger.png"] = png(found["mask"] * found["pattern"])
        print(f"[nc] class {target}: mask L1 norm {found['norm']:.2f} after {found['epochs']} epochs"
              + ("" if found["succeeded"] else " (never reached the success threshold)"), flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    norms = torch.tensor([r["norm"] for r in reversed_])
    index, median, mad = anomaly_indices(norms)
    flagged = flagged_classes(norms, opt("nc_anomaly_threshold"))
    tuning.result["nc"] = {"norms": norms.tolist(), "anomaly_index": index.tolist(), "median": median, "mad": mad,
                           "flagged": flagged, "reached_success": [r["succeeded"] for r in reversed_],
                           "reversal_epochs": [r["epochs"] for r in reversed_], "unlearned": bool(flagged)}
    if not flagged:
        print("[nc] no class flagged (anomaly index <= threshold): not a backdoored model by NC; "
              "the model is returned unchanged", flush=True)
        nan = float("nan")
        return model, [{"epoch": 0, "lr": 0.0, "train_loss": nan, "train_acc": nan, **tuning.evaluate(model)}]
    print(f"[nc] flagged classes {flagged} (anomaly index {', '.join(f'{float(index[c]):.2f}' for c in flagged)}): "
          f"unlearning", flush=True)
    images, labels = unlearning_set(tuning.images, tuning.labels, [reversed_[c] for c in flagged], opt("nc_unlearn_ratio"))
    return purify(model, FINETUNE, images, labels, tuning.pipeline, settings, tuning.evaluate, tuning.amp)


register_mode(Mode("nc", "NC", False, "all", False,
                   "Neural Cleanse: reverse a trigger per class, flag MAD outliers, unlearn their triggers (NC)",
                   algorithm=neural_cleanse, options=OPTIONS,
                   defaults=(("split_ratio", 0.05), ("epochs", 100), ("lr", 0.01), ("batch_size", 256), ("wd", 5e-4),
                             ("momentum", 0.9)),
                   # BackdoorBench's config/defense/nc/tiny.yaml: 200 unlearning epochs with ReduceLROnPlateau
                   dataset_defaults=(("tiny", (("epochs", 200), ("lr_schedule", "plateau"))),)))
