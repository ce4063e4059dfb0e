"""Tests for utils.engine: the batched augmentation pipeline, seeds, devices, metrics, training."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.engine import runtime
from utils.data.datasets import DatasetInfo
from utils.engine.pipeline import Pipeline
from utils.engine.evaluate import backdoor_metrics, predict
from utils.engine.runtime import derive_seed, make_generator, resolve_device
from utils.engine.loop import train_epoch
from utils.errors import UserError

PAD = 4


def _pipeline(channels: int, size: int, flip: bool, input_size: int | None = None,
              channels_last: bool = False) -> Pipeline:
    mean = torch.tensor([0.3, 0.5, 0.7][:channels]).view(1, -1, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3][:channels]).view(1, -1, 1, 1)
    return Pipeline(mean, std, input_size or size, size, flip, pad=PAD, channels_last=channels_last)


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # values 1..255 so the zero padding is distinguishable from image content
    return torch.randint(1, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)


def _unnormalise(pipe: Pipeline, x: torch.Tensor) -> torch.Tensor:
    return ((x * pipe.std + pipe.mean) * 255.0).round().clamp(0, 255).to(torch.uint8)


def _candidates(img: torch.Tensor, flip: bool) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every 4-pixel-padded crop of one (C, H, W) image, flipped as well when `flip`."""
    _, h, w = img.shape
    padded = F.pad(img, (PAD, PAD, PAD, PAD))
    out = {}
    for dy in range(2 * PAD + 1):
        for dx in range(2 * PAD + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out[(dy, dx, False)] = crop
            if flip:
                out[(dy, dx, True)] = crop.flip(-1)
    return out


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("channels,channels_last", [(1, False), (3, False), (3, True)])
def test_train_batch_is_a_padded_crop_and_maybe_flip(flip, channels, channels_last):
    size, n = 8, 48
    pipe = _pipeline(channels, size, flip, channels_last=channels_last)
    x = _images(n, channels, size, seed=channels)
    gen = torch.Generator().manual_seed(123)
    out = pipe.train_batch(x, gen)
    assert out.shape == (n, channels, size, size) and out.dtype == torch.float32
    recovered = _unnormalise(pipe, out)
    used = set()
    for i in range(n):
        matches = [k for k, c in _candidates(x[i], flip).items() if torch.equal(c, recovered[i])]
        assert matches, f"image {i} is no padded crop{' or flip' if flip else ''} of its input"
        used.update(matches)
    offsets = {(dy, dx) for dy, dx, _ in used}
    # the crop really is random: many different offsets, not always the centred one
    assert len(offsets) >= 10
    flips = {f for _, _, f in used}
    if flip:
        assert flips == {False, True}
    else:
        assert flips == {False}


def test_train_batch_is_reproducible_with_a_generator():
    pipe = _pipeline(3, 8, True)
    x = _images(16, 3, 8)
    a = pipe.train_batch(x, torch.Generator().manual_seed(5))
    b = pipe.train_batch(x, torch.Generator().manual_seed(5))
    c = pipe.train_batch(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_train_batch_without_padding_or_flip_is_eval_batch():
    pipe = _pipeline(3, 8, False)
    pipe.pad = 0
    x = _images(4, 3, 8)
    torch.testing.assert_close(pipe.train_batch(x, torch.Generator().manual_seed(0)), pipe.eval_batch(x))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_batch_is_pure_normalisation(channels, channels_last):
    pipe = _pipeline(channels, 8, True, channels_last=channels_last)
    x = _images(5, channels, 8, seed=9)
    x_before = x.clone()
    out = pipe.eval_batch(x)
    expected = (x.double() / 255.0 - pipe.mean.double()) / pipe.std.double()
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(x, x_before)
    # eval is deterministic: no hidden randomness
    assert torch.equal(pipe.eval_batch(x), out)


@pytest.mark.parametrize("input_size", [4, 16, 24])
def test_resize_to_input_size(input_size):
    pipe = _pipeline(3, 8, True, input_size=input_size)
    x = _images(3, 3, 8)
    assert pipe.eval_batch(x).shape == (3, 3, input_size, input_size)
    assert pipe.train_batch(x, torch.Generator().manual_seed(0)).shape == (3, 3, input_size, input_size)
    # a constant image stays constant under bilinear resizing
    const = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)
    out = pipe.eval_batch(const)
    expected = ((100 / 255 - pipe.mean) / pipe.std).expand(1, 3, input_size, input_size)
    torch.testing.assert_close(out, expected.float())


def test_for_dataset_uses_the_dataset_geometry():
    info = DatasetInfo("tiny", 10, 1, 28, (0.25,), (0.5,), False)
    pipe = Pipeline.for_dataset(info, torch.device("cpu"))
    assert pipe.input_size == 28 and pipe.native_size == 28 and pipe.flip is False
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    torch.testing.assert_close(pipe.eval_batch(x), torch.full((2, 1, 28, 28), 1.5))
    big = Pipeline.for_dataset(info, torch.device("cpu"), input_size=56)
    assert big.eval_batch(x).shape == (2, 1, 56, 56)


# --- seeds and devices --------------------------------------------------------------------------

def test_derive_seed_separates_purposes_and_is_stable():
    purposes = ["poison", "batches", "init", "augment", "bypass"]
    seeds = [derive_seed(0, p) for p in purposes]
    assert len(set(seeds)) == len(purposes)
    assert derive_seed(0, "poison") == derive_seed(0, "poison")
    assert derive_seed(0, "poison") != derive_seed(1, "poison")
    assert derive_seed(0, "poison") != 0 and derive_seed(1, "batches") != 1
    for s in seeds:
        assert 0 <= s < 2**31  # valid for torch.Generator.manual_seed on every device
    a = torch.randint(0, 1000, (5,), generator=make_generator(0, torch.device("cpu"), "poison"))
    b = torch.randint(0, 1000, (5,), generator=make_generator(0, torch.device("cpu"), "poison"))
    assert torch.equal(a, b)


def test_derive_seed_is_the_same_in_another_process():
    # Python's str hash is salted per process; a derived seed must not depend on it
    code = "from utils.engine import derive_seed; print(derive_seed(42, 'poison'), derive_seed(7, 'batches'))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(derive_seed(42, "poison")), str(derive_seed(7, "batches"))]


def test_cuda_without_cuda_falls_back_to_cpu_and_warns_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_warned_cpu_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_device("cuda:0") == torch.device("cpu")
        assert resolve_device("cuda") == torch.device("cpu")
        assert resolve_device("cuda:0") == torch.device("cpu")
    msgs = [str(w.message) for w in caught if "CUDA" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "cuda:0" in msgs[0]


def test_cuda_fallback_warning_with_pytest_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_warned_cpu_fallback", False)
    with pytest.warns(UserWarning, match="CUDA is not available"):
        dev = resolve_device("cuda:0")
    assert dev.type == "cpu"


def test_cpu_and_auto_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" cpu ") == torch.device("cpu")


@pytest.mark.parametrize("name", ["bogus", "cuda:x", "gpu0"])
def test_bogus_device_is_user_error(name):
    with pytest.raises(UserError, match="not a device"):
        resolve_device(name)


# --- predictions and metrics --------------------------------------------------------------------

class PixelOracle(nn.Module):
    """Predicts the class written into pixel (0, 0) of channel 0 (identity normalisation)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.bias = nn.Parameter(torch.zeros(num_classes))  # so .train()/.eval() matter
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        cls = (x[:, 0, 0, 0] * 255).round().long()
        return F.one_hot(cls, self.num_classes).float() * 10 + self.bias


def _identity_pipeline(channels: int = 1, size: int = 4) -> Pipeline:
    return Pipeline(torch.zeros(1, channels, 1, 1), torch.ones(1, channels, 1, 1), size, size, False)


def _coded(classes: list[int], channels: int = 1, size: int = 4) -> torch.Tensor:
    x = torch.zeros(len(classes), channels, size, size, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(classes, dtype=torch.uint8)
    return x


def test_predict_batches_and_restores_mode():
    model = PixelOracle()
    model.train()
    classes = [3, 1, 4, 1, 5, 9, 2]
    pred = predict(model, _coded(classes), _identity_pipeline(), batch_size=3)
    assert pred.tolist() == classes
    assert model.modes == [False, False, False]  # three batches, all in eval mode
    assert model.training  # restored
    assert predict(model, _coded([]), _identity_pipeline()).shape == (0,)


def test_backdoor_metrics_exact_values():
    model = PixelOracle()
    pipe = _identity_pipeline()
    # clean: predictions 1,2,3,4,5 vs labels 1,2,3,0,0 -> 3/5
    clean_x = _coded([1, 2, 3, 4, 5])
    clean_y = torch.tensor([1, 2, 3, 0, 0])
    # backdoor: predictions 0,0,0,7,8,9,6,0 ; targets all 0 -> ASR 4/8 ; true 1,2,0,7,8,5,5,5 -> RA 2/8
    bd_x = _coded([0, 0, 0, 7, 8, 9, 6, 0])
    bd_targets = torch.zeros(8, dtype=torch.long)
    bd_true = torch.tensor([1, 2, 3, 7, 8, 5, 5, 5])
    m = backdoor_metrics(model, pipe, clean_x, clean_y, bd_x, bd_targets, bd_true, batch_size=3)
    assert m["clean_acc"] == pytest.approx(3 / 5)
    assert m["asr"] == pytest.approx(4 / 8)
    assert m["ra"] == pytest.approx(2 / 8)


def test_backdoor_metrics_all2all_targets_and_empty_sets():
    model = PixelOracle()
    pipe = _identity_pipeline()
    bd_true = torch.tensor([0, 1, 2, 3])
    bd_targets = (bd_true + 1) % 10
    bd_x = _coded([1, 2, 2, 3])  # hits target, hits target, hits true, hits true
    m = backdoor_metrics(model, pipe, _coded([]), torch.empty(0, dtype=torch.long), bd_x, bd_targets, bd_true)
    assert m["asr"] == pytest.approx(0.5) and m["ra"] == pytest.approx(0.5)
    assert m["clean_acc"] != m["clean_acc"]  # NaN for an empty clean set


# --- training -----------------------------------------------------------------------------------

def test_train_epoch_lowers_the_loss_on_a_separable_problem():
    torch.manual_seed(0)
    gen_data = torch.Generator().manual_seed(0)
    n, size = 128, 16
    labels = torch.randint(0, 2, (n,), generator=gen_data)
    # class 0: dark images, class 1: bright images, plus noise
    base = torch.where(labels == 1, 180, 60).view(n, 1, 1, 1)
    noise = torch.randint(-40, 41, (n, 1, size, size), generator=gen_data)
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(size * size, 2))
    pipe = Pipeline(torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25), size, size, True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    history = [train_epoch(model, images, labels, pipe, opt, 32, gen, progress=False) for _ in range(5)]
    losses = [h["train_loss"] for h in history]
    assert all(l == l and l < float("inf") for l in losses)
    assert losses[-1] < losses[0] * 0.7, losses
    assert history[-1]["train_acc"] > 0.9
    assert set(history[0]) >= {"train_loss", "train_acc", "seconds", "img_per_s"}
    assert model.training


def test_train_epoch_visits_every_sample_once():
    n = 10
    images = _coded(list(range(n)))
    labels = torch.arange(n)
    seen: list[int] = []

    def loss_fn(model, x, y, idx):
        seen.extend(y.tolist())
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    model = PixelOracle(num_classes=n)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    stats = train_epoch(model, images, labels, _identity_pipeline(), opt, 3, torch.Generator().manual_seed(0),
                        loss_fn=loss_fn, augment=False, progress=False)
    assert sorted(seen) == list(range(n))
    assert stats["train_acc"] == 1.0  # the oracle is right on un-augmented inputs


@pytest.mark.parametrize("n, batch, expect", [(10, 3, 9), (9, 3, 9), (2, 3, 2)])
def test_train_epoch_drop_last_skips_only_the_short_final_batch(n, batch, expect):
    """The official victim loaders drop the last short batch; a set smaller than one batch still trains."""
    images = _coded(list(range(n)))
    labels = torch.arange(n)
    sizes: list[int] = []

    def loss_fn(model, x, y, idx):
        sizes.append(len(y))
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    model = PixelOracle(num_classes=n)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_epoch(model, images, labels, _identity_pipeline(), opt, batch, torch.Generator().manual_seed(0),
                loss_fn=loss_fn, augment=False, progress=False, drop_last=True)
    assert sum(sizes) == expect
    assert len(set(sizes)) == 1
