"""The one evaluator: predictions in large batches under inference mode, and C-Acc / ASR / RA."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from utils.engine.pipeline import Pipeline


def eval_batch_size(requested: int, device: torch.device) -> int:
    """0 means automatic: large batches on a GPU; on a CPU, 256 (larger ones fall out of cache and
    measured slower here)."""
    if requested > 0:
        return requested
    return 1024 if device.type == "cuda" else 256


@torch.inference_mode()
def batched(model: nn.Module, images: torch.Tensor, pipeline: Pipeline, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
            batch_size: int = 0, amp: torch.dtype | None = None,
            make_batch: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`fn(model, batch)` over a uint8 image tensor in large batches, in eval mode without gradients,
    concatenated: the one place where evaluation batches are made. The batch is the pipeline's
    normalised one, or `make_batch(uint8 chunk)` (QRA perturbs the images before normalising)."""
    batch_size = eval_batch_size(batch_size, images.device)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        x = make_batch(chunk) if make_batch is not None else pipeline.eval_batch(chunk)
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            out.append(fn(model, x))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=images.device)


def predict(model: nn.Module, images: torch.Tensor, pipeline: Pipeline, batch_size: int = 0,
            amp: torch.dtype | None = None) -> torch.Tensor:
    """Predicted labels for a uint8 image tensor."""
    return batched(model, images, pipeline, lambda net, x: net(x).argmax(1), batch_size, amp)


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
