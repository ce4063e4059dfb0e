"""Model registry: `build_model(name, ...)`, plus the head and feature accessors.

Every registered model is a `BackdoorNet`: it splits into `feature_maps(x)` (the output of the last
convolutional / transformer stage, (N, C, h, w)), `pool(maps)` (what turns them into the penultimate
feature vector; `features(x) = pool(feature_maps(x))`) and a linear classifier head stored under the
attribute path `head_name`. BTI-DBF works on the last-stage feature maps, as its official code does. Purification
modes, Bypass and feature plots use `get_head`/`model.features` instead of finding layers
by evaluating strings, so every mode works on every model.

`stages(model, x)` gives the outputs of the model's main stages (NAD's attention maps), shallow to
deep, each as (N, C, h, w), the last one the feature maps. A model names its stage modules in
`stage_modules()`; `StageTap` captures their outputs with forward hooks during the model's own
forward pass, so no second pass and no layer names are needed.
"""
from __future__ import annotations

from typing import Callable


import torch
from torch import nn

# import the architectures so they register themselves
from utils.errors import UserError

_REGISTRY: dict[str, Callable[..., "BackdoorNet"]] = {}
_HEAVY: set[str] = set()
#: name prefix -> (builder taking the rest of the name first, validator raising UserError)
_PREFIXES: dict[str, tuple[Callable[..., "BackdoorNet"], Callable[[str], object]]] = {}


class BackdoorNet(nn.Module):
    """Base class: subclasses set `head_name` and implement `feature_maps` and `pool`."""

    head_name: str = "linear"
    #: smallest input side the architecture accepts without padding
    min_input_size: int = 1
    #: the stage modules emit (N, h, w, C) token grids (Swin); `stages` turns them into (N, C, h, w)
    stage_channels_last: bool = False

    def stage_modules(self) -> list[nn.Module]:
        """The modules whose outputs are the model's main stages, shallow to deep, in the order the
        forward pass runs them; the last one's output is the feature maps. The default declares none:
        `stages` then reports the feature maps alone."""
        return []

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The last stage's output, (N, C, h, w)."""
        raise NotImplementedError

    def pool(self, maps: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Last-stage feature maps -> the penultimate feature vector (N, D) that the head reads."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_maps(x))

    def logits_from_maps(self, maps: torch.Tensor) -> torch.Tensor:
        return get_head(self)(self.pool(maps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return get_head(self)(self.features(x))


def register_model(name: str, heavy: bool = False):
    """Decorator adding a builder `fn(num_classes, in_channels, image_size) -> BackdoorNet`.
    `heavy` marks a model too slow on a CPU for the tests' loops (they give it tiny inputs or only
    the cheap checks: `light_model_names()` leaves it out)."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        if heavy:
            _HEAVY.add(name)
        return fn

    return wrap


def register_prefix(prefix: str, builder: Callable[..., "BackdoorNet"], check: Callable[[str], object]) -> None:
    """Make every name `prefix<rest>` a model: `check(rest)` raises a UserError for a bad `rest`,
    `builder(rest, num_classes, in_channels, image_size)` builds it (`tv:<torchvision name>`)."""
    if prefix in _PREFIXES:
        raise ValueError(f"model prefix {prefix!r} registered twice")
    _PREFIXES[prefix] = (builder, check)


def model_names() -> list[str]:
    """The registered names (prefixed families such as `tv:<name>` are not listed: see `is_model_name`)."""
    return sorted(_REGISTRY)


def light_model_names() -> list[str]:
    """The registered names not marked heavy."""
    return sorted(set(_REGISTRY) - _HEAVY)


def is_heavy(name: str) -> bool:
    """Marked heavy at registration; prefixed names (`tv:...`) count as heavy."""
    return name in _HEAVY or (name not in _REGISTRY and name.startswith(tuple(_PREFIXES)))


def _prefixed(name: str):
    return next(((p, entry) for p, entry in _PREFIXES.items() if name.startswith(p)), (None, None))


def check_model_name(name: str) -> None:
    """Nothing for a model `build_model` can build, else one UserError line."""
    if name in _REGISTRY:
        return
    prefix, entry = _prefixed(name)
    if entry is not None:
        entry[1](name[len(prefix):])
        return
    shown = name if len(name) <= 60 and name.isprintable() else repr(name[:60])
    extra = "".join(f", or {p}<name>" for p in _PREFIXES)
    raise UserError(f"unknown model {shown}; choose one of: {', '.join(model_names())}{extra}")


def is_model_name(name: str) -> bool:
    try:
        check_model_name(name)
    except UserError:
        return False
    return True


def name_check(allow_empty: bool = False) -> Callable[[object], str | None]:
    """An Option `check=` for a model name: None for a buildable name (or empty when `allow_empty`),
    else what is wrong with it (the registered names, or why a `tv:` name is refused)."""
    def check(value) -> str | None:
        if (allow_empty and value == "") or (isinstance(value, str) and value in _REGISTRY):
            return None
        if isinstance(value, str) and _prefixed(value)[1] is not None:
            try:
                check_model_name(value)
            except UserError as err:
                return f"is refused: {err}"
            return None
        extra = "".join(f", or {p}<name>" for p in _PREFIXES)
        return f"is not one of: {', '.join(model_names())}{extra}{' (or empty)' if allow_empty else ''}"
    return check


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> BackdoorNet:
    """Build a registered model (or a `tv:<name>` one) with freshly initialised weights."""
    check_model_name(name)
    if name in _REGISTRY:
        net = _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    else:
        prefix, (builder, _check) = _prefixed(name)
        net = builder(name[len(prefix):], num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    net.registry_name = name  # what messages call the model (a plain attribute: not in the state dict)
    return net


def model_label(model: nn.Module) -> str:
    """The registered name of a model built by `build_model`, else its class name."""
    return getattr(model, "registry_name", None) or type(model).__name__


def get_head(model: nn.Module, name: str | None = None) -> nn.Linear:
    """The classifier head: `name` (a dotted attribute path such as `classifier.6`) or the model's own."""
    path = name or getattr(model, "head_name", None)
    if not path:
        raise UserError("this model declares no head; pass --linear_name")
    try:
        head = model.get_submodule(path)
    except AttributeError:
        raise UserError(f"--linear_name {path!r} names no layer of {type(model).__name__}; "
                        f"its head is {getattr(model, 'head_name', '?')!r}") from None
    if not isinstance(head, nn.Linear):
        raise UserError(f"--linear_name {path!r} is a {type(head).__name__}, not a Linear layer")
    return head


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The model's declared stage modules (empty for a model that declares none)."""
    declared = getattr(model, "stage_modules", None)
    return list(declared()) if callable(declared) else []


class StageTap:
    """Forward hooks on a model's stage modules that keep the stage outputs of its latest forward
    pass (`latest()`), each as (N, C, h, w). The hooks travel with `copy.deepcopy` of the model (the
    copy's stages report into the same tap), so a tap set before a routine that trains a copy sees
    the copy's passes; `remove(*models)` takes the hooks off the model and any such copy."""

    def __init__(self, model: nn.Module):
        self.modules = stage_modules(model)
        self._outputs: list[torch.Tensor] = []
        self._ids: list[int] = []
        channels_last = bool(getattr(model, "stage_channels_last", False))
        for position, module in enumerate(self.modules):
            def hook(_module, _inputs, output, position=position):
                if position == 0:  # a new forward pass starts: keep only its outputs
                    self._outputs.clear()
                self._outputs.append(output.permute(0, 3, 1, 2) if channels_last else output)
            self._ids.append(module.register_forward_hook(hook).id)
        self._model = model

    def latest(self) -> list[torch.Tensor]:
        """The stage outputs of the latest forward pass (and forget them)."""
        out, self._outputs = self._outputs[-len(self.modules):] if self.modules else [], []
        return out

    def remove(self, *models: nn.Module) -> None:
        for model in (self._model, *models):
            for module in stage_modules(model):
                for hook_id in self._ids:
                    module._forward_hooks.pop(hook_id, None)
        self._outputs = []


def stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the model's main stages on `x`, shallow to deep, each (N, C, h, w); the last
    has the shape of `model.feature_maps(x)`. A model that declares no stage modules has one
    stage, its feature maps."""
    tap = StageTap(model)
    if not tap.modules:
        return [model.feature_maps(x)]
    try:
        model(x)
        return tap.latest()
    finally:
        tap.remove()
