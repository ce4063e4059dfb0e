"""Model registry: `build_model(name, ...)`, plus the head and feature accessors.

Every registered model is a `BackdoorNet`: it splits into `feature_maps(x)` (the output of the last
convolutional / transformer stage, (N, C, h, w)), `pool(maps)` (what turns them into the penultimate
feature vector; `features(x) = pool(feature_maps(x))`) and a linear classifier head stored under the
attribute path `head_name`. BTI-DBF works on the last-stage feature maps, as its official code does. Purification
modes, Bypass and feature plots use `get_head`/`model.features` instead of finding layers
by evaluating strings, so every mode works on every model.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# import the architectures so they register themselves
from utils.errors import UserError

_REGISTRY: dict[str, Callable[..., "BackdoorNet"]] = {}


class BackdoorNet(nn.Module):
    """Base class: subclasses set `head_name` and implement `feature_maps` and `pool`."""

    head_name: str = "linear"
    #: smallest input side the architecture accepts without padding
    min_input_size: int = 1

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


def register_model(name: str):
    """Decorator adding a builder `fn(num_classes, in_channels, image_size) -> BackdoorNet`."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> BackdoorNet:
    """Build a registered model with freshly initialised weights."""
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    net = _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
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
