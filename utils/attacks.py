"""Attack registry: each attack declares its YAML/flag options, builds its trigger parameters once
(tensors and plain values, stored in the record) and applies them to uint8 batches.

Adding an attack = one `AttackSpec` here (or in a module that registers itself) + an entry script.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from utils import bypass, triggers, wanet
from utils.config import Option
from utils.datasets import DatasetInfo
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
        raise UserError(f"unknown attack {name!r}; choose one of: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def make_trigger(spec: AttackSpec, params: Params, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: spec.apply(images, params, train)


# --- BadNet ---------------------------------------------------------------------------------

def _badnet_build(cfg: dict, info: DatasetInfo) -> Params:
    pattern, mask = triggers.badnet_trigger(cfg["patch"], info.channels, info.image_size, cfg["patch_size"])
    return {"pattern": pattern, "mask": mask}


def _badnet_apply(images: torch.Tensor, params: Params, train: bool) -> torch.Tensor:
    return triggers.apply_badnet(images, params["pattern"], params["mask"])


register_attack(AttackSpec(
    name="badnet",
    options=[
        Option("patch", str, "square", "BadNet trigger shape", choices=triggers.BADNET_PATTERNS),
        Option("patch_size", int, 3, "trigger side in pixels at 32 px (scaled with the image)"),
    ],
    build=_badnet_build, apply=_badnet_apply,
    description="3x3 white square (or checkerboard grid) pasted in the bottom-right corner",
))


# --- Blended --------------------------------------------------------------------------------

def _blended_build(cfg: dict, info: DatasetInfo) -> Params:
    for key in ("blend_alpha", "blend_alpha_test"):
        if not 0.0 <= cfg[key] <= 1.0:
            raise UserError(f"{key} must be within [0, 1], got {cfg[key]}")
    key_image = triggers.blend_key(info.channels, info.image_size, cfg["trigger_path"] or None, cfg["blend_key"])
    return {"key": key_image, "alpha": float(cfg["blend_alpha"]), "alpha_test": float(cfg["blend_alpha_test"])}


def _blended_apply(images: torch.Tensor, params: Params, train: bool) -> torch.Tensor:
    return triggers.apply_blend(images, params["key"], params["alpha"] if train else params["alpha_test"])


register_attack(AttackSpec(
    name="blended",
    options=[
        Option("blend_alpha", float, 0.2, "blend weight of the trigger image in poisoned training images"),
        Option("blend_alpha_test", float, 0.2, "blend weight at test time"),
        Option("trigger_path", str, "", "trigger image file (empty: the built-in image named by blend_key)"),
        Option("blend_key", str, "landscape", "built-in blend image when trigger_path is empty: a smooth procedural "
               "landscape (natural-image-like, as the paper's Hello Kitty) or fixed-seed noise (high-frequency, "
               "a much easier trigger)", choices=triggers.BLEND_KEYS),
    ],
    build=_blended_build, apply=_blended_apply,
    description="x' = (1-a) x + a K with a fixed full-size image K",
))


# --- SIG (clean label) ----------------------------------------------------------------------

def _sig_build(cfg: dict, info: DatasetInfo) -> Params:
    return {"pattern": triggers.sig_pattern(info.channels, info.image_size, cfg["sig_delta"], cfg["sig_f"])}


def _sig_apply(images: torch.Tensor, params: Params, train: bool) -> torch.Tensor:
    return triggers.apply_additive(images, params["pattern"])


register_attack(AttackSpec(
    name="sig",
    options=[
        Option("sig_delta", float, 40.0, "amplitude of the sinusoid in pixel units (0..255)"),
        Option("sig_f", float, 6.0, "number of periods across the image width"),
    ],
    build=_sig_build, apply=_sig_apply, clean_label=True,
    description="clean-label: add delta * sin(2 pi j f / W) along the columns, clip",
))


# --- Bypass (adversarial embedding) ---------------------------------------------------------

def _with_bypass(base: AttackSpec, name: str) -> AttackSpec:
    return AttackSpec(name=name, options=base.options + bypass.BYPASS_OPTIONS, build=base.build, apply=base.apply,
                      clean_label=base.clean_label, training=bypass.bypass_hooks,
                      description=f"{base.name} trigger + adversarial-embedding regulariser against a feature discriminator")


register_attack(_with_bypass(ATTACKS["badnet"], "badnet_bypass"))
register_attack(_with_bypass(ATTACKS["blended"], "blended_bypass"))


# --- WaNet ----------------------------------------------------------------------------------

def _wanet_build(cfg: dict, info: DatasetInfo) -> Params:
    if cfg["k"] < 2 or cfg["k"] > info.image_size:
        raise UserError(f"k must be within [2, {info.image_size}], got {cfg['k']}")
    if cfg["cross_ratio"] < 0:
        raise UserError(f"cross_ratio must be 0 or positive, got {cfg['cross_ratio']}")
    return {"grid": wanet.make_field(info.image_size, cfg["k"], cfg["s"], cfg["random_seed"], cfg["grid_rescale"])}


register_attack(AttackSpec(
    name="wanet", options=wanet.WANET_OPTIONS, build=_wanet_build,
    apply=lambda images, params, train: wanet.apply_uint8(images, params["grid"]),
    training=wanet.wanet_hooks, batch_poisoning=True,
    description="fixed smooth warping field applied inside each batch, with noise-mode samples",
))


from utils import ssba as _ssba  # noqa: E402,F401  (registers itself)
from utils import lc as _lc, lf as _lf  # noqa: E402,F401  (register themselves)
from utils import inputaware as _inputaware  # noqa: E402,F401  (registers itself)
