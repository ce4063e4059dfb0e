"""FP: fine-pruning (Liu et al., RAID 2018) as BackdoorBench's defense/fp.py runs it.

1. The mean activation of every last-stage channel (`model.feature_maps`, averaged over the clean
   tuning images and the spatial positions; for ResNets this is the mean of the head's input that
   BackdoorBench records) is measured with the model in eval mode.
2. Channels are pruned in increasing order of that activation (dormant ones first),
   ceil(C * once_prune_ratio) more at a time, while the clean accuracy stays within a relative drop
   of acc_ratio of the unpruned model's. BackdoorBench measures that accuracy on the clean *test*
   set (`--fp_acc_data test`, the default); `--fp_acc_data tuning` measures it on the tuning images,
   which keeps the test set out of the defense.
3. The pruned model is fine-tuned on the tuning set with the pruned channels kept at zero.

A channel is pruned by zeroing the columns that read it in the first linear layer after the feature
maps (the head for ResNets and the small CNN, `classifier.0` for VGG), as BackdoorBench masks the
head's input. The zeros are in the weights themselves, so the saved model loads into a plain model
of the architecture. That zeroing equals removing the channel from the feature maps only when the
pooling keeps channels apart; this is checked on the model at hand, and a model where it fails is
refused with one error line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from utils import engine
from utils.config import Option, within
from utils.defenses.purify import FINETUNE, Mode, StepHooks, purify, register_mode
from utils.errors import UserError


def channel_activations(model: nn.Module, images: torch.Tensor, pipeline, amp=None) -> torch.Tensor:
    """Mean activation of each last-stage channel over the images and the spatial positions (eval mode)."""
    per_image = engine.batched(model, images, pipeline, lambda net, x: net.feature_maps(x).float().mean(dim=(2, 3)),
                               amp=amp)
    return per_image.mean(0)


@dataclass
class MapsReader:
    """The first linear layer after the feature maps and how many of its inputs each channel feeds
    (`per_channel` consecutive columns, channel-major as `flatten` lays them out)."""

    name: str
    layer: nn.Linear
    per_channel: int

    def columns(self, channels: torch.Tensor) -> torch.Tensor:
        channels = channels.to(self.layer.weight.device).long()
        offsets = torch.arange(self.per_channel, device=channels.device)
        return (channels[:, None] * self.per_channel + offsets).flatten()

    def zero(self, channels: torch.Tensor) -> None:
        with torch.no_grad():
            self.layer.weight[:, self.columns(channels)] = 0


def find_maps_reader(model: nn.Module, maps: torch.Tensor) -> MapsReader:
    """The first nn.Linear that `model.logits_from_maps` calls on maps like `maps` (N, C, h, w)."""
    called: list[nn.Module] = []
    handles = [m.register_forward_hook(lambda mod, args, out: called.append(mod))
               for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            model.logits_from_maps(maps)
    finally:
        for h in handles:
            h.remove()
    channels = maps.shape[1]
    if not called or called[0].in_features % channels:
        raise UserError(f"--ft_mode fp: no linear layer of {type(model).__name__} reads its {channels} last-stage "
                        "channels directly, so they cannot be pruned")
    layer = called[0]
    name = next(n for n, m in model.named_modules() if m is layer)
    return MapsReader(name, layer, layer.in_features // channels)


def check_folding(model: nn.Module, reader: MapsReader, maps: torch.Tensor) -> None:
    """Zeroing a channel's columns must give the logits of zeroing the channel in the maps (checked
    on half the channels of the given maps, in eval mode); otherwise the pooling mixes channels."""
    was_training = model.training
    model.eval()
    channels = torch.arange(0, maps.shape[1], 2, device=maps.device)
    saved = reader.layer.weight.detach().clone()
    try:
        with torch.no_grad():
            masked = maps.clone()
            masked[:, channels] = 0
            want = model.logits_from_maps(masked).float()
            reader.zero(channels)
            got = model.logits_from_maps(maps).float()
    finally:
        with torch.no_grad():
            reader.layer.weight.copy_(saved)
        model.train(was_training)
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * (1 + float(want.abs().max()))):
        raise UserError(f"--ft_mode fp: the pooling of {type(model).__name__} mixes its last-stage channels before "
                        f"{reader.name}, so a channel cannot be pruned by zeroing that layer's inputs")


def select_pruning(order: torch.Tensor, step: int, accuracy: Callable[[int], dict], acc_ratio: float) -> tuple[int, list[dict]]:
    """How many channels of `order` to prune: 0, step, 2 step, ... (never all, as BackdoorBench's
    range), keeping the largest count whose clean accuracy has dropped by less than `acc_ratio` of the
    unpruned accuracy; the search stops at the first count that drops further. `accuracy(n)` gives
    {"clean_acc", ...} with the first n channels pruned. Returns the count and one log row per count tried."""
    log = []
    base = None
    kept = 0
    for count in range(0, len(order), step):
        metrics = accuracy(count)
        if base is None:
            base = metrics["clean_acc"]
        within_margin = (base - metrics["clean_acc"]) < acc_ratio * base or count == 0
        log.append({"pruned": count, **metrics, "within_margin": within_margin})
        if not within_margin:
            break
        kept = count
    return kept, log


def fine_prune(model: nn.Module, tuning) -> tuple[MapsReader, torch.Tensor, list[dict]]:
    """Steps 1 and 2: rank the channels, prune as many as the accuracy margin allows (in place, as
    zeroed weights). Returns the reader layer, the pruned channels and the pruning log."""
    acc_ratio, once = tuning.option("fp_acc_ratio"), tuning.option("fp_once_prune_ratio")
    activation = channel_activations(model, tuning.images, tuning.pipeline, tuning.amp)
    order = torch.argsort(activation.cpu(), stable=True)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probe = model.feature_maps(tuning.pipeline.eval_batch(tuning.images[:64])).float()
    model.train(was_training)
    reader = find_maps_reader(model, probe)
    check_folding(model, reader, probe)
    original = reader.layer.weight.detach().clone()

    def prune_first(count: int) -> None:
        with torch.no_grad():
            reader.layer.weight.copy_(original)
        if count:
            reader.zero(order[:count])

    if tuning.option("fp_acc_data") == "test":
        measure = tuning.evaluate
    else:
        def measure(net):
            pred = engine.predict(net, tuning.images, tuning.pipeline, amp=tuning.amp)
            return {"clean_acc": float((pred == tuning.labels).float().mean())}

    def accuracy(count: int) -> dict:
        prune_first(count)
        return measure(model)

    step = max(1, math.ceil(len(order) * once))
    kept, log = select_pruning(order, step, accuracy, acc_ratio)
    prune_first(kept)
    return reader, order[:kept], log


def _fp(model: nn.Module, mode: Mode, tuning):
    reader, pruned, log = fine_prune(model, tuning)
    channels = reader.layer.in_features // reader.per_channel
    print(f"[fp] pruned {len(pruned)} of {channels} last-stage channels (zeroed inputs of {reader.name}); "
          f"accuracy {log[0]['clean_acc']:.4f} -> {next(r for r in log if r['pruned'] == len(pruned))['clean_acc']:.4f} "
          f"on the {tuning.option('fp_acc_data')} set; fine-tuning with them held at zero")
    tuning.result["fp"] = {"layer": reader.name, "channels": channels, "pruned_channels": len(pruned),
                           "pruned": pruned.tolist(), "accuracy_on": tuning.option("fp_acc_data"), "search": log}
    # purify trains a deep copy of the model: the extra-loss hook is the one that sees that copy, so it
    # picks up the copy's reader layer; after every optimiser step the pruned columns go back to zero
    trained: dict = {}

    def remember(net, x, y, logits):
        if "layer" not in trained:
            trained["layer"] = MapsReader(reader.name, net.get_submodule(reader.name), reader.per_channel)
        return 0.0

    def keep_pruned():
        trained["layer"].zero(pruned)

    tuned, rows = purify(model, FINETUNE, tuning.images, tuning.labels, tuning.pipeline, tuning.settings,
                         tuning.evaluate, tuning.amp, hooks=StepHooks(extra_loss=remember, after_step=keep_pruned))
    MapsReader(reader.name, tuned.get_submodule(reader.name), reader.per_channel).zero(pruned)
    return tuned, rows


#: BackdoorBench's config/defense/fp/cifar10.yaml (the same for GTSRB and CIFAR-100): 5% clean split,
#: 100 epochs, batch 256, SGD 0.01, momentum 0.9, wd 5e-4, cosine; its tiny.yaml: 200 epochs with
#: ReduceLROnPlateau
FP_DEFAULTS = (("split_ratio", 0.05), ("epochs", 100), ("batch_size", 256), ("lr", 0.01), ("momentum", 0.9),
               ("wd", 5e-4))
FP_DATASET_DEFAULTS = (("tiny", (("epochs", 200), ("lr_schedule", "plateau"))),)
FP_OPTIONS = (
    Option("fp_acc_ratio", float, 0.1, "fp: largest relative drop of clean accuracy the pruning may cause "
           "(default 0.1, BackdoorBench's acc_ratio)", check=within(0, 1)),
    Option("fp_once_prune_ratio", float, 0.01, "fp: share of the last-stage channels pruned per step "
           "(default 0.01, BackdoorBench's once_prune_ratio)", check=within(0, 1, low_open=True)),
    Option("fp_acc_data", str, "test", "fp: where the pruning measures clean accuracy: the clean test set "
           "(default, what BackdoorBench does) or the tuning images (keeps the test set out of the defense)",
           choices=("test", "tuning")),
)

register_mode(Mode("fp", "FP", False, "all", False,
                   "fine-pruning (Liu et al. 2018): prune the least active last-stage channels while clean accuracy "
                   "stays within the margin, then fine-tune with them held at zero",
                   algorithm=_fp, defaults=FP_DEFAULTS, dataset_defaults=FP_DATASET_DEFAULTS, options=FP_OPTIONS))
