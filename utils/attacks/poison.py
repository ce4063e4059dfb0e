"""Poisoned training sets and backdoor test sets, as docs/protocol.md §1 and §4 define them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from utils.errors import UserError

LABEL_TRANS = ("all2one", "all2all")

TriggerFn = Callable[[torch.Tensor], torch.Tensor]


def check_pratio(pratio: float) -> None:
    if not (0.0 <= pratio <= 1.0):
        raise UserError(f"pratio must be within [0, 1], got {pratio}")


def poison_count(pratio: float, n_train: int) -> int:
    check_pratio(pratio)
    return int(round(pratio * n_train))


def choose_poison_indices(labels: torch.Tensor, pratio: float, seed: int, target: int,
                          clean_label: bool = False) -> torch.Tensor:
    """`round(pratio * N)` indices drawn without replacement with a generator seeded by `seed`, from
    all classes (dirty label) or from the target class only (clean label). Sorted int64."""
    labels = labels.cpu()
    count = poison_count(pratio, len(labels))
    pool = torch.arange(len(labels))
    if clean_label:
        pool = pool[labels == target]
        if count > len(pool):
            raise UserError(f"clean-label pratio {pratio} needs {count} images of target class {target}, "
                            f"but the training set has only {len(pool)}; lower --pratio to at most "
                            f"{len(pool) / len(labels):.4f}")
    gen = torch.Generator().manual_seed(seed)
    chosen = pool[torch.randperm(len(pool), generator=gen)[:count]]
    return chosen.sort().values


def backdoor_labels(labels: torch.Tensor, target: int, label_trans: str, num_classes: int) -> torch.Tensor:
    """all2one: every label becomes `target`; all2all: y -> (y + 1) mod C."""
    if label_trans == "all2one":
        return torch.full_like(labels, target)
    if label_trans == "all2all":
        return (labels + 1) % num_classes
    raise UserError(f"unknown attack_label_trans {label_trans!r}; choose one of: {', '.join(LABEL_TRANS)}")


@dataclass
class PoisonedTrainSet:
    images: torch.Tensor       # uint8 (N, C, H, W), trigger applied at `poison_indices`
    labels: torch.Tensor       # training labels after relabelling
    true_labels: torch.Tensor  # original labels
    poison_mask: torch.Tensor  # bool (N,)


@dataclass
class BackdoorTestSet:
    images: torch.Tensor       # triggered test images
    targets: torch.Tensor      # backdoor label of each (ASR counts predictions equal to it)
    true_labels: torch.Tensor  # original label (RA counts predictions equal to it)
    source_indices: torch.Tensor  # which clean test images they came from


def poison_train_set(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, trigger: TriggerFn,
                     target: int, label_trans: str, num_classes: int, clean_label: bool = False) -> PoisonedTrainSet:
    """Apply `trigger` to the chosen training images and relabel them (unless clean-label)."""
    images = images.clone()
    new_labels = labels.clone()
    idx = indices.to(images.device)
    if len(idx):
        images[idx] = trigger(images[idx])
        if not clean_label:
            new_labels[idx] = backdoor_labels(labels[idx], target, label_trans, num_classes)
    mask = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    mask[idx.to(labels.device)] = True
    return PoisonedTrainSet(images, new_labels, labels.clone(), mask)


def backdoor_test_set(images: torch.Tensor, labels: torch.Tensor, trigger: TriggerFn, target: int,
                      label_trans: str, num_classes: int, batch: int = 4096) -> BackdoorTestSet:
    """All-to-one: every test image whose label is not the target; all-to-all: every test image;
    each with the test-time trigger applied."""
    keep = torch.arange(len(labels), device=labels.device)
    if label_trans == "all2one":
        keep = keep[labels != target]
    src = images[keep]
    triggered = torch.cat([trigger(src[i:i + batch]) for i in range(0, len(src), batch)]) if len(src) else src
    true = labels[keep]
    return BackdoorTestSet(triggered, backdoor_labels(true, target, label_trans, num_classes), true, keep)
