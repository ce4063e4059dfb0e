"""SSBA: the StegaStamp-style encoder/decoder, the sample-specific trigger, the cached encoder
resource and an end-to-end run followed by fine-tuning."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from utils.attacks import ssba
from utils.attacks.registry import PrepareContext, get_attack
from utils.data.datasets import DatasetInfo, ImageSet
from utils.errors import UserError
from utils.attacks.poison import poison_train_set
from utils.record.resources import Progress, Resource


def _info(channels: int, size: int, name: str = "x") -> DatasetInfo:
    return DatasetInfo(name, 10, channels, size, (0.5,) * channels, (0.5,) * channels, False)


def _cfg(**over) -> dict:
    cfg = {"ssba_bits": 8, "ssba_steps": 2, "ssba_batch_size": 8, "ssba_lr": 1e-3, "ssba_image_weight": 0.0,
           "ssba_ramp": 0.4, "ssba_width": 8, "random_seed": 0, "resource_root": "unused"}
    cfg.update(over)
    return cfg


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random uint8 images (blocky noise plus a gradient), away from 0 and 255."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=gen)
    x = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    x = 0.2 + 0.6 * x + 0.05 * torch.rand(n, channels, size, size, generator=gen)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _objects(n: int, seed: int) -> torch.Tensor:
    """1x16x16 images of an 8x8 textured object at a random place on a black background (as in
    Fashion-MNIST): the encoder cannot add one fixed pattern everywhere and has to adapt to each."""
    x = _images(n, 1, 16, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    mask = torch.zeros(n, 1, 16, 16, dtype=torch.bool)
    for i, (a, b) in enumerate(torch.randint(0, 9, (n, 2), generator=gen).tolist()):
        mask[i, :, a:a + 8, b:b + 8] = True
    return torch.where(mask, x, torch.zeros_like(x))


def _params(channels: int, size: int, seed: int = 0, steps: int = 2, **over) -> dict:
    cfg = _cfg(random_seed=seed, ssba_steps=steps, **over)
    params = ssba.ssba_build(cfg, _info(channels, size))
    enc, _, _ = ssba.train_pair(_images(32, channels, size, seed), cfg["ssba_bits"], steps, cfg["ssba_batch_size"],
                                cfg["ssba_lr"], cfg["ssba_image_weight"], cfg["ssba_ramp"], cfg["ssba_width"], seed,
                                torch.device("cpu"))
    params["encoder"] = ssba.plain_state(enc.state_dict())
    return params


@pytest.fixture(scope="module")
def tiny_pair():
    """An encoder/decoder pair trained briefly on a tiny synthetic 1x16x16 set."""
    return ssba.train_pair(_objects(256, 1), bits=8, steps=150, batch_size=32, lr=2e-3, final_weight=5.0, ramp=0.2,
                           width=8, seed=0, device=torch.device("cpu"))


def test_encoder_and_decoder_learn_the_bits_on_a_tiny_synthetic_set(tiny_pair):
    enc, dec, _ = tiny_pair
    held_out = _objects(128, 2)
    secrets = torch.randint(0, 2, (128, 8), generator=torch.Generator().manual_seed(3)).float()
    quality = ssba.measure(enc, dec, held_out, secrets, torch.device("cpu"))
    assert quality["bit_acc"] > 0.75, quality  # chance is 0.5
    assert 15.0 < quality["psnr_db"] < 60.0, quality  # a real, bounded change
    untrained = ssba.measure(ssba.Encoder(1, 16, 8, 8), ssba.Decoder(1, 8), held_out, secrets, torch.device("cpu"))
    assert untrained["bit_acc"] < 0.65


def test_residual_is_sample_specific(tiny_pair):
    enc = tiny_pair[0]
    secret = ssba.make_secret(8, 0)[None].expand(8, -1)
    x = _objects(8, 4).float() / 255
    with torch.no_grad():
        residual = enc(x, secret)
    # how far each image's residual is from the mean residual, relative to the residual's size: 0 for
    # one pattern added to every image; about 0.4 here, about 0.6 on Fashion-MNIST with the defaults
    spread = (residual - residual.mean(0, keepdim=True)).abs().mean() / residual.abs().mean()
    assert float(spread) > 0.25
    first = residual[0].flatten()
    for other in residual[1:]:
        assert float(torch.corrcoef(torch.stack((first, other.flatten())))[0, 1]) < 0.95


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_trigger_keeps_shape_dtype_range_and_is_batch_independent(channels, size):
    params = _params(channels, size)
    images = _images(10, channels, size, seed=5)
    images[0] = 0
    images[1] = 255
    out = get_attack("ssba").apply(images, params, True)
    assert out.dtype == torch.uint8 and out.shape == images.shape and not torch.equal(out, images)
    assert torch.equal(get_attack("ssba").apply(images, params, False), out)  # same trigger at test time
    assert torch.equal(ssba.apply_uint8(images[3:6], params), out[3:6])  # per image, whatever the batch
    assert torch.equal(ssba.apply_uint8(images[:0], params), images[:0])
    with pytest.raises(UserError, match="trained for"):
        ssba.apply_uint8(torch.zeros(2, channels, size + 4, size + 4, dtype=torch.uint8), params)


def test_the_official_100_bit_secret_is_supported():
    """BackdoorBench's StegaStamp hides 100 bits; `--ssba_bits 100` builds, trains, encodes and
    stores an encoder for that length (only the default differs)."""
    params = _params(3, 32, ssba_bits=100)
    assert params["secret"].shape == (100,) and params["bits"] == 100
    assert params["encoder"]["secret.weight"].shape[1] == 100
    images = _images(4, 3, 32, seed=6)
    out = get_attack("ssba").apply(images, params, True)
    assert out.dtype == torch.uint8 and out.shape == images.shape and not torch.equal(out, images)


def test_dirty_label_poisoning_changes_only_the_chosen_indices():
    spec = get_attack("ssba")
    assert not spec.clean_label and spec.prepare is not None
    params = _params(1, 28)
    images, labels = _images(40, 1, 28, seed=7), torch.arange(40) % 10
    idx = torch.tensor([3, 11, 25])
    out = poison_train_set(images, labels, idx, lambda x: spec.apply(x, params, True), 0, "all2one", 10, False)
    changed = (out.images != images).flatten(1).any(1)
    assert torch.equal(changed.nonzero().flatten(), idx)
    assert torch.equal(out.labels[idx], torch.zeros(3, dtype=torch.long))
    keep = torch.ones(40, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(out.labels[keep], labels[keep])


def test_same_seed_same_trigger_other_seed_other_secret():
    a, b, c = _params(1, 28, seed=0), _params(1, 28, seed=0), _params(1, 28, seed=1)
    assert torch.equal(a["secret"], b["secret"]) and not torch.equal(a["secret"], c["secret"])
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])
    images = _images(6, 1, 28, seed=9)
    assert torch.equal(ssba.apply_uint8(images, a), ssba.apply_uint8(images, b))
    assert not torch.equal(ssba.apply_uint8(images, a), ssba.apply_uint8(images, c))


def test_encoder_is_small_enough_for_the_record():
    params = ssba.ssba_build(_cfg(ssba_bits=32, ssba_width=16), _info(3, 32))
    enc = ssba.Encoder(3, 32, 32, params["width"])
    size = sum(t.numel() * t.element_size() for t in enc.state_dict().values())
    assert size < 2 * 1024 * 1024


class _Recorder(Progress):
    """A Progress that keeps every saved state in memory and resumes from a chosen one."""

    def __init__(self, resume=None):
        self.saved, self.resume = [], resume

    def load(self):
        return self.resume

    def save(self, state):
        buffer = io.BytesIO()  # a copy, as on disk: the live state keeps changing after this call
        torch.save(state, buffer)
        buffer.seek(0)
        self.saved.append(torch.load(buffer, weights_only=True))


def test_training_resumes_to_the_same_weights(monkeypatch):
    monkeypatch.setattr(ssba, "SAVE_EVERY", 5)
    images = _images(64, 1, 12)
    args = (images, 6, 12, 8, 1e-3, 1.0, 0.5, 4, 0, torch.device("cpu"))
    full = _Recorder()
    enc_full, dec_full, _ = ssba.train_pair(*args, progress=full)
    assert [s["step"] for s in full.saved] == [5, 10]
    enc_res, dec_res, _ = ssba.train_pair(*args, progress=_Recorder(resume=full.saved[0]))
    for a, b in ((enc_full, enc_res), (dec_full, dec_res)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _context(tmp_path, cfg, channels=1, size=28, name="fmnist"):
    info = _info(channels, size, name)
    train = ImageSet(_images(48, channels, size, seed=1), torch.arange(48) % 10)
    test = ImageSet(_images(16, channels, size, seed=2), torch.arange(16) % 10)
    params = ssba.ssba_build(cfg, info)
    return PrepareContext(cfg, info, train, test, None, torch.tensor([0, 1]), params, torch.device("cpu"), None,
                          False, str(tmp_path))


def test_encoder_cache_is_reused_and_keyed(tmp_path, monkeypatch, capsys):
    cfg = _cfg(ssba_steps=3)
    extra = ssba.ssba_prepare(_context(tmp_path, cfg))
    assert set(extra) == {"encoder", "info"} and 0.0 <= extra["info"]["bit_acc"] <= 1.0 and extra["info"]["psnr_db"] > 0
    folders = list((tmp_path / "ssba_encoder").iterdir())
    assert len(folders) == 1 and (folders[0] / "resource.pt").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("the encoder was trained again instead of read from the cache")

    monkeypatch.setattr(ssba, "train_pair", no_training)
    capsys.readouterr()
    again = ssba.ssba_prepare(_context(tmp_path, cfg))
    assert "using the cache" in capsys.readouterr().out
    assert all(torch.equal(extra["encoder"][k], again["encoder"][k]) for k in extra["encoder"])
    assert extra["info"] == again["info"]

    base = Resource("ssba_encoder", ssba.encoder_key(_context(tmp_path, cfg)), tmp_path).folder
    for other in (_context(tmp_path, _cfg(ssba_steps=3, random_seed=1)),
                  _context(tmp_path, cfg, size=32),
                  _context(tmp_path, _cfg(ssba_steps=3, ssba_bits=16)),
                  _context(tmp_path, cfg, name="other")):
        assert Resource("ssba_encoder", ssba.encoder_key(other), tmp_path).folder != base


@pytest.mark.parametrize("key,value,message", [
    ("ssba_bits", 0, "ssba_bits must be positive"),
    ("ssba_bits", 5000, "ssba_bits must be at most"),
    ("ssba_steps", 0, "ssba_steps must be positive"),
    ("ssba_batch_size", -1, "ssba_batch_size must be positive"),
    ("ssba_lr", 0.0, "ssba_lr must be positive"),
    ("ssba_image_weight", -1.0, "ssba_image_weight must be 0 or positive"),
    ("ssba_ramp", 1.5, r"ssba_ramp must be within \[0, 1\]"),
    ("ssba_width", 0, "ssba_width must be positive"),
    ("ssba_width", 64, "ssba_width must be at most 32"),
])
def test_bad_options_are_user_errors(key, value, message):
    with pytest.raises(UserError, match=message):
        ssba.ssba_build(_cfg(**{key: value}), _info(1, 28))


def test_bad_option_through_the_cli(tiny_fmnist, tmp_path):
    run = subprocess.run([sys.executable, "attack/ssba.py", "--yaml_path", "config/attack/prototype/fmnist.yaml",
                          "--dataset_path", str(tiny_fmnist), "--download", "false", "--device", "cpu",
                          "--record_root", str(tmp_path), "--ssba_bits", "0"], cwd=REPO_ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2 and "ssba_bits must be positive" in run.stderr
    assert not list(tmp_path.glob("fmnist/ssba/*/attack_result.pt"))


def test_ssba_runs_end_to_end_and_fine_tunes_without_the_cache(tiny_fmnist, tmp_path):
    resources = tmp_path / "resources"
    argv = ["--yaml_path", "config/attack/prototype/fmnist.yaml", "--dataset_path", str(tiny_fmnist),
            "--download", "false", "--epochs", "1", "--device", "cpu", "--record_root", str(tmp_path),
            "--progress", "false", "--batch_size", "32", "--ssba_steps", "20", "--ssba_batch_size", "16",
            "--resource_root", str(resources)]
    run = subprocess.run([sys.executable, "attack/ssba.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "bit accuracy" in run.stdout and "PSNR" in run.stdout
    folder = next(tmp_path.glob("fmnist/ssba/*/attack_result.pt")).parent
    record = torch.load(folder / "attack_result.pt", weights_only=True)
    trigger = record["trigger"]
    assert record["attack"] == "ssba" and not record["clean_label"] and len(record["poison_indices"]) == 20
    assert trigger["secret"].shape == (32,) and set(trigger["info"]) == {"bit_acc", "psnr_db"}
    assert sum(t.numel() * t.element_size() for t in trigger["encoder"].values()) < 2 * 1024 * 1024
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["attack_info"] == trigger["info"]
    # the record is self-contained: purification rebuilds the poisoned sets from it alone
    shutil.rmtree(resources)
    ft = subprocess.run([sys.executable, "fine_tune/ft.py", "--attack", "ssba", "--dataset", "fmnist", "--model",
                         "smallcnn", "--pratio", "0.1", "--epochs", "1", "--ft_mode", "fst", "--device", "cpu",
                         "--dataset_path", str(tiny_fmnist), "--record_root", str(tmp_path), "--progress", "false"],
                        cwd=REPO_ROOT, capture_output=True, text=True)
    assert ft.returncode == 0, ft.stderr
