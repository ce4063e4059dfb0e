"""The one training loop (attacks, purification and the robustness attacks all use it)."""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utils.engine.pipeline import Pipeline, index_batches


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


def cosine_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing stepped once per epoch over the run's own epoch count (the official code
    hard-wires a 100-epoch period)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
