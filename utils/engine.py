"""Device handling, the on-device batch pipeline, one training loop and one evaluator.

The whole uint8 dataset lives on the compute device. Random crop, flip, resizing and normalisation
are batched tensor operations on a batch of indices, so there are no DataLoader workers and no
per-sample Python in the hot path. The same functions serve attacks, purification and the
robustness experiments.
"""
from __future__ import annotations

import os
import random
import time
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.datasets import DatasetInfo
from utils.errors import UserError

_warned_cpu_fallback = False


def resolve_device(name: str) -> torch.device:
    """`cuda`, `cuda:N`, `cpu`, `mps` or `auto`; CUDA asked for but absent falls back to the CPU with
    one warning, so the paper's `--device cuda:0` runs unchanged on a laptop."""
    global _warned_cpu_fallback
    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use cpu or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if not _warned_cpu_fallback:
                warnings.warn(f"--device {name}: CUDA is not available, running on the CPU", stacklevel=2)
                _warned_cpu_fallback = True
            return torch.device("cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 instructions (AVX512-BF16, AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """`auto`: bf16 on CUDA and on CPUs with bf16 instructions, else full precision."""
    if mode == "none":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads() -> None:
    """Use every core for intra-op parallelism unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


@dataclass
class Pipeline:
    """Turns uint8 batches into normalised float batches, with or without training augmentation."""

    mean: torch.Tensor  # (1, C, 1, 1) on the device
    std: torch.Tensor
    input_size: int
    native_size: int
    flip: bool
    pad: int = 4
    channels_last: bool = False

    @classmethod
    def for_dataset(cls, info: DatasetInfo, device: torch.device, input_size: int | None = None,
                    channels_last: bool | None = None) -> "Pipeline":
        mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
        if channels_last is None:
            channels_last = info.channels > 1 or device.type == "cpu"
        return cls(mean, std, input_size or info.image_size, info.image_size, info.flip,
                   channels_last=channels_last)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _finish(self, x_u8: torch.Tensor) -> torch.Tensor:
        # in place on the fresh float copy: no extra allocations on the training hot path
        return self._layout(x_u8.float().div_(255.0).sub_(self.mean).div_(self.std))

    def float_batch(self, x01: torch.Tensor) -> torch.Tensor:
        """The evaluation transform of a float batch in [0, 1], out of place, so that gradients
        flow back to the pixels (attacks that optimise images or perturbations use it)."""
        return self._layout((x01 - self.mean.to(x01.device)) / self.std.to(x01.device))

    def eval_batch(self, x_u8: torch.Tensor) -> torch.Tensor:
        return self._finish(x_u8)

    def train_batch(self, x_u8: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Random crop with zero padding (as torchvision's RandomCrop(padding)) and optional flip."""
        return self._finish(self.augment(x_u8, gen))

    def augment(self, x_u8: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """The random crop and flip of `train_batch` alone, uint8 in and out (for callers that choose
        per sample which images are augmented, draw an augmentation once and keep it, or trigger
        the augmented image themselves)."""
        n, _, h, w = x_u8.shape
        dev = x_u8.device
        if self.pad:
            p = self.pad
            padded = F.pad(x_u8, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=gen)
            dx = torch.randint(0, 2 * p + 1, (n,), device=dev, generator=gen)
            rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (n, h, 1)
            cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]  # (n, 1, w)
            x_u8 = padded[torch.arange(n, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            flip = torch.rand(n, device=dev, generator=gen) < 0.5
            x_u8 = torch.where(flip[:, None, None, None], x_u8.flip(3), x_u8)
        return x_u8


def derive_seed(seed: int, purpose: str) -> int:
    """An independent seed for each use of the run's seed. Drawing the poisoned indices and the
    batch order from identically seeded generators makes the first batches consist of exactly the
    poisoned images, which wrecks training; deriving per-purpose seeds keeps the streams apart while
    one `--random_seed` still fixes everything."""
    return zlib.crc32(f"{purpose}:{seed}".encode()) & 0x7FFFFFFF


def place_model(model: nn.Module, pipeline: Pipeline, device: torch.device) -> nn.Module:
    """Move a model to the device in the memory format the pipeline's batches use."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if pipeline.channels_last else model


def load_states(state: dict, **objects) -> None:
    """Restore resumable training state: each named object (a module, optimiser or scheduler, via
    `load_state_dict`; a `torch.Generator`, via `set_state`) from `state[name]`; None is skipped."""
    for name, obj in objects.items():
        if obj is None:
            continue
        if isinstance(obj, torch.Generator):
            obj.set_state(state[name])
        else:
            obj.load_state_dict(state[name])


def make_generator(seed: int, device: torch.device, purpose: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose))


def index_batches(n: int, batch_size: int, shuffle: bool, gen: torch.Generator | None, device: torch.device,
                  drop_last: bool = False) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, device=device, generator=gen) if shuffle else torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


#: (model, inputs, labels, dataset indices of the batch) -> (loss, logits); the indices let an
#: attack's loss look up per-sample facts such as "is this sample poisoned"
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(model, x, y, idx):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits
    return loss_fn


def train_epoch(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, pipeline: Pipeline,
                optimizer: torch.optim.Optimizer, batch_size: int, gen: torch.Generator,
                loss_fn: LossFn | None = None, after_step: Callable[[], None] | None = None,
                amp: torch.dtype | None = None, desc: str = "train", augment: bool = True,
                progress: bool = True, set_train_mode: Callable[[nn.Module], None] | None = None,
                before_step: Callable[[], None] | None = None, drop_last: bool = False) -> dict[str, float]:
    """One pass over (images, labels) in shuffled batches (`drop_last`: skip the final short batch, as
    the official victim loaders do, unless the whole set is smaller than one batch). Loss and accuracy are accumulated on the
    device and read once at the end, so the step itself never waits for the host.
    `set_train_mode` replaces `model.train()` (purification uses it to keep frozen BatchNorm fixed).
    `before_step` runs between the backward pass and the optimiser step: sharpness-aware steps
    evaluate the gradient at shifted weights inside `loss_fn` and move the weights back there."""
    loss_fn = loss_fn or cross_entropy_loss()
    device = images.device
    (set_train_mode or nn.Module.train)(model)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    n = len(labels)
    batches = index_batches(n, batch_size, True, gen, device, drop_last)
    bar = tqdm(total=n, desc=desc, unit="img", leave=False, disable=not progress, dynamic_ncols=True)
    for idx in batches:
        x = pipeline.train_batch(images[idx], gen) if augment else pipeline.eval_batch(images[idx])
        y = labels[idx]
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, logits = loss_fn(model, x, y, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        bar.update(len(y))
    bar.close()
    seconds = time.perf_counter() - start
    return {"train_loss": float(loss_sum) / max(seen, 1), "train_acc": float(correct) / max(seen, 1),
            "seconds": seconds, "img_per_s": seen / max(seconds, 1e-9)}


def eval_batch_size(requested: int, device: torch.device) -> int:
    """0 means automatic: large batches on a GPU; on a CPU, 256 (larger ones fall out of cache and
    measured slower here)."""
    if requested > 0:
        return requested
    return 1024 if device.type == "cuda" else 256


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, pipeline: Pipeline, batch_size: int = 0,
            amp: torch.dtype | None = None) -> torch.Tensor:
    """Predicted labels for a uint8 image tensor, in eval mode, in large batches."""
    batch_size = eval_batch_size(batch_size, images.device)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = pipeline.eval_batch(images[start:start + batch_size])
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            out.append(model(x).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=images.device)


def backdoor_metrics(model: nn.Module, pipeline: Pipeline, clean_images: torch.Tensor, clean_labels: torch.Tensor,
                     bd_images: torch.Tensor, bd_targets: torch.Tensor, bd_true: torch.Tensor,
                     batch_size: int = 0, amp: torch.dtype | None = None) -> dict[str, float]:
    """C-Acc on the clean test set; ASR (prediction == backdoor label) and RA (prediction == true
    label) on the backdoor test set."""
    clean_pred = predict(model, clean_images, pipeline, batch_size, amp)
    bd_pred = predict(model, bd_images, pipeline, batch_size, amp)
    nan = float("nan")
    return {
        "clean_acc": float((clean_pred == clean_labels).float().mean()) if len(clean_labels) else nan,
        "asr": float((bd_pred == bd_targets).float().mean()) if len(bd_targets) else nan,
        "ra": float((bd_pred == bd_true).float().mean()) if len(bd_true) else nan,
    }


def cosine_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing stepped once per epoch over the run's own epoch count (the official code
    hard-wires a 100-epoch period)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))

