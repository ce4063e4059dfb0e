"""The attack registry. An attack is an `AttackSpec`: its options, how it builds its trigger
parameters once, how it applies them to uint8 batches, and optional training hooks and resource
steps. Attack modules import this module and register themselves; `utils.attacks` imports them all."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from utils.config import Option, short
from utils.data.datasets import DatasetInfo
from utils.errors import UserError

Params = dict[str, Any]


@dataclass(frozen=True)
class AttackSpec:
    name: str
    options: list[Option]
    #: (resolved config, dataset info) -> trigger parameters saved in the record
    build: Callable[[dict, DatasetInfo], Params]
    #: (uint8 images, params, train?) -> uint8 images; `train` selects train- vs test-time trigger
    apply: Callable[[torch.Tensor, Params, bool], torch.Tensor]
    clean_label: bool = False
    title: str = ""  # the name tables and figures print (default: the registry name)
    description: str = ""
    #: for attacks that act inside the training step (Bypass, ...): (config, model, experiment) ->
    #: TrainingHooks; None trains with plain cross-entropy on the poisoned set
    training: Callable[[dict, Any, Any], "TrainingHooks"] | None = None
    #: True when `training` applies the trigger inside each batch (WaNet): the stored training set
    #: stays clean and the record's poisoned-index list is empty
    batch_poisoning: bool = False
    #: resource step for attacks that need more than a fixed pattern (LC's PGD images, SSBA's
    #: encoder, ...): PrepareContext -> extra trigger parameters, merged into `build`'s and stored
    #: in the record. Runs only for a fresh experiment; a rebuilt record reuses its stored ones.
    prepare: Callable[["PrepareContext"], Params] | None = None
    #: index-aware training trigger (uint8 images, their training-set indices, params) -> uint8
    #: images, for triggers that differ per sample (LC's precomputed PGD images); `apply(train=True)`
    #: is used when absent
    train_apply: Callable[[torch.Tensor, torch.Tensor, Params], torch.Tensor] | None = None


@dataclass
class PrepareContext:
    """What an attack's `prepare` step may use. `train`/`test` are the clean (subset) images on the
    CPU; `poison_indices` index `train` (empty for batch-poisoning attacks)."""

    cfg: dict
    info: DatasetInfo
    train: Any  # datasets.ImageSet
    test: Any
    train_indices: torch.Tensor | None  # the subset of the full training split, None for all
    poison_indices: torch.Tensor
    params: Params  # what `build` returned
    device: torch.device
    amp: torch.dtype | None
    progress: bool
    resource_root: str


@dataclass
class TrainingHooks:
    """What an attack adds to the victim's training loop."""

    loss_fn: Callable  # engine.LossFn
    after_step: Callable[[], None] | None = None
    #: objects with state_dict()/load_state_dict() that a resumed run must restore
    state: dict[str, Any] | None = None
    #: False when the hook does its own augmentation (the pipeline then only normalises)
    augment: bool = True
    #: for triggers learnt during training (Input-aware): returns the current trigger parameters;
    #: called after each epoch, the backdoor test set is rebuilt from them before evaluation and
    #: the final ones are what the record stores
    trigger_params: Callable[[], Params] | None = None


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
    if spec.name in ATTACKS:
        raise ValueError(f"attack {spec.name!r} registered twice")
    ATTACKS[spec.name] = spec
    return spec


def get_attack(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise UserError(f"unknown attack {short(name)}; choose one of: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def make_trigger(spec: AttackSpec, params: Params, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: spec.apply(images, params, train)
