"""Any torchvision classification CNN as a `BackdoorNet`: ResNet-50 and DenseNet-161 (the 2024
paper's), every other torchvision name as `tv:<name>`, and a user's own torchvision-style module.

`TorchvisionNet` keeps the torchvision model whole under `net` (so its state dict is torchvision's
with a `net.` prefix) and reads its structure instead of rewriting it:

* the head is the last `nn.Linear` among the model's direct children (`fc`) or the last entry of
  its last child (`classifier.6`, `classifier.3`, `heads.head`);
* the feature maps are what the children before global pooling produce, run in order: the children
  up to the first `AdaptiveAvgPool2d` child (ResNet, RegNet, VGG, ConvNeXt, EfficientNet,
  MobileNet-V3), or all but the last child where the model pools in its forward (DenseNet, whose
  forward also applies a ReLU after `features`, MobileNet-V2, MNASNet, ShuffleNet);
* the pool is global pooling (the model's own pooling child, else an average to 1x1) followed by
  whatever the model runs between pooling and the head (ConvNeXt's LayerNorm2d, MobileNet's
  Linear/Hardswish/Dropout, VGG's two hidden Linear layers), flattening before the first Linear;
* the stages (NAD) are, among the trunk's modules (plain `nn.Sequential` containers opened), the
  last module at each of the three deepest spatial resolutions, found with one pass on the `meta`
  device (no memory, no arithmetic);
* `min_input_size` is the smallest side the trunk accepts (found the same way); smaller inputs are
  zero-padded symmetrically, as the VGG wrapper does.

The stem is left as torchvision builds it (the ImageNet 7x7 stride-2 convolution and max-pool),
because BackdoorBench trains torchvision's resnet50 / densenet161 on 32x32 CIFAR images that way;
only a different number of input channels replaces the first convolution.
"""
from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import BackdoorNet, register_model, register_prefix
from utils.compat import import_torchvision
from utils.errors import UserError

#: torchvision families whose forward is "trunk children, pool, flatten, classifier" (or pools in the
#: forward), which the split below reproduces exactly; the tests check several of them
KNOWN_FAMILIES = ("resnet", "resnext", "wide_resnet", "densenet", "vgg", "mobilenet_v2", "mobilenet_v3",
                  "efficientnet", "regnet", "convnext", "mnasnet", "shufflenet", "alexnet")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PROBE_SIDE = 224  # the stage search runs at ImageNet size, where every stage has its own resolution
_PROBES: dict[object, tuple[int, list[int]]] = {}


def torchvision_model_names() -> list[str]:
    """torchvision's classification model names (no detection, segmentation, video, quantised)."""
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def check_torchvision_name(name: str) -> str:
    """`name` if it is a torchvision classification model the adapter can split, else a UserError."""
    shown = name if len(name) <= 60 and name.isprintable() else repr(name[:60])
    if not _NAME.match(name) or name not in torchvision_model_names():
        raise UserError(f"model tv:{shown} is not a torchvision classification model; "
                        "see torchvision.models.list_models(module=torchvision.models)")
    if not name.startswith(KNOWN_FAMILIES):
        raise UserError(f"model tv:{name}: the torchvision adapter cannot split this family into feature maps, "
                        f"pool and head; it handles {', '.join(KNOWN_FAMILIES)} (see docs/extending.md to wrap your own)")
    return name


def _replace_first_conv(net: nn.Module, in_channels: int) -> None:
    path, old = next(((p, m) for p, m in net.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if old is None:
        raise UserError(f"{type(net).__name__} has no Conv2d to take {in_channels} input channels")
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    net.set_submodule(path, new)


def _opened(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules with plain `nn.Sequential` containers replaced by their entries (recursively)."""
    out: list[nn.Module] = []
    for m in modules:
        if type(m) is nn.Sequential:
            out += _opened(list(m.children()))
        else:
            out.append(m)
    return out


class TorchvisionNet(BackdoorNet):
    """A torchvision-style classification CNN split into feature maps, pool and linear head.

    `net` must hold its layers as children in the order its forward runs them, pool globally
    (an `AdaptiveAvgPool2d` child, or in its forward after the last trunk child) and end in a
    `nn.Linear` head (a child, or the last entry of the last child). `final_relu=True` adds the
    ReLU that DenseNet's forward applies after `features`. `TorchvisionNet.wrap` checks a user's
    model against its own forward.
    """

    def __init__(self, net: nn.Module, final_relu: bool = False, probe_key: object = None):
        super().__init__()
        self.net = net
        children = list(net.named_children())
        if len(children) < 2:
            raise UserError(f"{type(net).__name__} has fewer than two child modules; cannot split it")
        last_name, last = children[-1]
        if isinstance(last, nn.Linear):
            self.head_name, pre_head = f"net.{last_name}", []
        elif isinstance(last, nn.Sequential) and len(last) and isinstance(last[-1], nn.Linear):
            entries = list(last.named_children())
            self.head_name, pre_head = f"net.{last_name}.{entries[-1][0]}", [m for _, m in entries[:-1]]
        else:
            raise UserError(f"{type(net).__name__}: its last child {last_name!r} is a {type(last).__name__}, "
                            "neither a Linear head nor a Sequential ending in one; cannot find the head")
        body = [m for _, m in children[:-1]]
        pool_at = next((i for i, m in enumerate(body) if isinstance(m, nn.AdaptiveAvgPool2d)), None)
        if pool_at is None:  # the forward pools (DenseNet, MobileNet-V2, MNASNet, ShuffleNet)
            trunk, self._global_pool, between = body, None, []
        else:
            trunk, self._global_pool, between = body[:pool_at], body[pool_at], body[pool_at + 1:]
        if not trunk:
            raise UserError(f"{type(net).__name__}: nothing runs before its global pooling; cannot find the feature maps")
        self.final_relu = nn.ReLU() if final_relu else None
        # plain lists (not registered again): the modules live under `net`, the state dict stays torchvision's
        self.__dict__["_trunk"] = trunk + ([self.final_relu] if final_relu else [])
        self.__dict__["_between"] = [m for m in between if not isinstance(m, nn.Flatten)] + pre_head
        self.__dict__["_probe_key"] = probe_key
        self.__dict__["_probed"] = None

    @property
    def min_input_size(self) -> int:
        return self._structure()[0]

    def _structure(self) -> tuple[int, list[nn.Module]]:
        """(min input side, stage modules), found on first use: a few shape-only passes, cached per
        `probe_key` (the torchvision name: channels change neither) so rebuilding a model costs nothing more."""
        if self._probed is None:
            cached = _PROBES.get(self._probe_key) if self._probe_key is not None else None
            if cached is None:
                cached = self._probe()
                if self._probe_key is not None:
                    _PROBES[self._probe_key] = cached
            side, positions = cached
            opened = _opened(list(self._trunk))
            self.__dict__["_probed"] = (side, [opened[i] for i in positions])
        return self._probed

    # -- structure found on the meta device ------------------------------------------------------------

    def _trunk_on(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        for m in self._trunk:
            if record is not None and type(m) is nn.Sequential:
                for inner in _opened([m]):
                    x = inner(x)
                    record.append((inner, tuple(x.shape[-2:])))
            else:
                x = m(x)
                if record is not None:
                    record.append((m, tuple(x.shape[-2:])))
        return x

    def _probe(self) -> tuple[int, list[int]]:
        """(smallest accepted input side, the stage modules' positions among the opened trunk
        modules), from passes of shapes only."""
        first = next((m for m in self.net.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise UserError(f"{type(self.net).__name__} has no Conv2d layer; the adapter splits convolutional models only")
        channels = first.in_channels
        meta = _meta_copy(self)
        meta.eval()  # BatchNorm on meta needs no batch statistics
        record: list = []
        try:
            with torch.no_grad():
                out = meta._trunk_on(torch.empty(1, channels, _PROBE_SIDE, _PROBE_SIDE, device="meta"), record)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{type(self.net).__name__}: its children do not run in sequence on an image "
                            f"({str(err).splitlines()[0][:120]}); cannot split it") from None
        if out.dim() != 4:
            raise UserError(f"{type(self.net).__name__}: what runs before its global pooling does not give "
                            "(N, C, h, w) feature maps; cannot split it")
        ends: list[int] = []  # index of the last module at each resolution
        for i, (_m, shape) in enumerate(record):
            if i + 1 == len(record) or record[i + 1][1] != shape:
                ends.append(i)
        index = {id(m): k for k, m in enumerate(_opened(list(meta._trunk)))}
        stages = [index[id(record[i][0])] for i in ends[-3:]]

        def accepts(side: int) -> bool:
            try:
                with torch.no_grad():
                    out = meta._trunk_on(torch.empty(1, channels, side, side, device="meta"))
                return out.dim() == 4 and min(out.shape[-2:]) >= 1
            except (RuntimeError, ValueError):
                return False

        low, high = 1, _PROBE_SIDE  # accepts(high) holds: the pass above ran
        if accepts(1):  # most families (global pooling after strided convolutions) take any side
            high = 1
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if accepts(mid) else (mid + 1, high)
        return low, stages

    # -- the BackdoorNet accessors -------------------------------------------------------------------------

    def feature_maps(self, x):
        short = self.min_input_size - min(x.shape[-2:])
        if short > 0:
            x = F.pad(x, (short // 2, short - short // 2, short // 2, short - short // 2))
        return self._trunk_on(x)

    def pool(self, maps):
        x = self._global_pool(maps) if self._global_pool is not None else F.adaptive_avg_pool2d(maps, 1)
        for m in self._between:
            if isinstance(m, nn.Linear) and x.dim() > 2:
                x = torch.flatten(x, 1)
            x = m(x)
        return torch.flatten(x, 1)

    def stage_modules(self):
        return list(self._structure()[1])

    @classmethod
    def wrap(cls, net: nn.Module, in_channels: int = 3, image_size: int = 32, final_relu: bool = False,
             atol: float = 1e-4) -> "TorchvisionNet":
        """Wrap a user's torchvision-style model and check, on one random batch in eval mode, that the
        split recomposes its own forward; a model it does not fit is a UserError, not a silent misfit."""
        wrapped = cls(net, final_relu=final_relu)
        side = max(image_size, wrapped.min_input_size)
        x = torch.randn(2, in_channels, side, side, generator=torch.Generator().manual_seed(0))
        was = net.training
        net.eval()
        try:
            with torch.no_grad():
                own, split = net(x), wrapped(x)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"{type(net).__name__}: its split does not run on a {side}x{side} image "
                            f"({str(err).splitlines()[0][:120]}); give it a BackdoorNet subclass instead") from None
        finally:
            net.train(was)
        if own.shape != split.shape or not torch.allclose(own, split, atol=atol, rtol=1e-4):
            raise UserError(f"{type(net).__name__}: feature maps -> pool -> head does not reproduce its forward "
                            "(its children do not run in declaration order, or its forward does more than "
                            "pool and flatten before the head); give it a BackdoorNet subclass instead")
        return wrapped


def _meta_copy(model: TorchvisionNet) -> TorchvisionNet:
    """A copy of `model` whose tensors live on the meta device (for shape passes)."""
    memo: dict = {}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = torch.empty_like(t, device="meta") if not isinstance(t, nn.Parameter) else \
            nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    meta = copy.deepcopy(model, memo)
    for m in meta.modules():  # hooks (a StageTap's) must not see the shape passes
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return meta


def build_torchvision(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> TorchvisionNet:
    """torchvision's `name` with random weights and `num_classes` outputs, as a `TorchvisionNet`."""
    check_torchvision_name(name)
    tv = import_torchvision()
    net = tv.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(net, in_channels)
    return TorchvisionNet(net, final_relu=name.startswith("densenet"), probe_key=name)


@register_model("resnet50", heavy=True)
def resnet50(num_classes: int, in_channels: int = 3, image_size: int = 32) -> TorchvisionNet:
    return build_torchvision("resnet50", num_classes, in_channels, image_size)


@register_model("densenet161", heavy=True)
def densenet161(num_classes: int, in_channels: int = 3, image_size: int = 32) -> TorchvisionNet:
    return build_torchvision("densenet161", num_classes, in_channels, image_size)


register_prefix("tv:", build_torchvision, check_torchvision_name)
