"""The on-device batch pipeline: the whole uint8 set lives on the compute device; crop, flip,
resize and normalisation are batched tensor operations on a batch of indices."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from utils.data.datasets import DatasetInfo
from utils.errors import UserError

#: largest model input side: 4096 px is far beyond every recipe (224 at most) and keeps a batch of
#: resized images within memory; a larger value is a typo, refused before anything is allocated
MAX_INPUT_SIZE = 4096


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
        if input_size is not None and not 0 <= input_size <= MAX_INPUT_SIZE:
            # the attack's --input_size is checked with the other options; this also covers records
            raise UserError(f"input_size must be within [0, {MAX_INPUT_SIZE}], got {input_size}")
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


def place_model(model: nn.Module, pipeline: Pipeline, device: torch.device) -> nn.Module:
    """Move a model to the device in the memory format the pipeline's batches use."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if pipeline.channels_last else model


def index_batches(n: int, batch_size: int, shuffle: bool, gen: torch.Generator | None, device: torch.device,
                  drop_last: bool = False) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, device=device, generator=gen) if shuffle else torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]
