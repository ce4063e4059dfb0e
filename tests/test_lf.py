"""LF (low-frequency universal pattern): the DCT subspace, the pattern optimisation against a
surrogate, the `lf_pattern` cache, the trigger, and an end-to-end run followed by fine-tuning."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, attack_argv, flip_middle_byte
from utils.attacks import adversarial
from utils import engine
from utils.victim import experiment as victim
from utils.attacks.registry import PrepareContext, get_attack
from utils.data.datasets import load_dataset
from utils.errors import UserError
from utils.attacks.lf import optimise_pattern
from utils.attacks.poison import choose_poison_indices, poison_train_set
from utils.record.store import load_record
from utils.record.resources import RESOURCE_FILE
from utils.attacks.surrogate import get_surrogate

SPEC = get_attack("lf")
OPTS = {"lf_eps": 10.0, "lf_cutoff": 0.15, "lf_steps": 5, "lf_step": 1.0, "lf_batch_size": 32}


def _ctx(data_root, tmp_path, *extra):
    """The PrepareContext `prepare_experiment` would hand LF for a tiny run (1-epoch surrogate at
    lr 0.01, 6 pattern steps), with the resource cache under `tmp_path`."""
    argv = attack_argv(data_root, tmp_path, "--surrogate_epochs", "1", "--lr", "0.01", "--lf_steps", "6",
                       "--lf_step", "3", "--lf_batch_size", "32", "--resource_root", str(tmp_path / "res"), *extra)
    cfg = victim.parse_attack_config("lf", argv)
    info = victim.validate_config(cfg)
    train = load_dataset(info.name, cfg["dataset_path"], train=True)
    test = load_dataset(info.name, cfg["dataset_path"], train=False)
    params = SPEC.build(cfg, info)
    poison = choose_poison_indices(train.labels, cfg["pratio"], cfg["random_seed"], cfg["attack_target"])
    device = torch.device("cpu")
    return PrepareContext(cfg, info, train, test, None, poison, params, device,
                          engine.amp_dtype(cfg["amp"], device), False, cfg["resource_root"])


def test_dct_is_orthonormal_and_lowpass_is_a_projection():
    d = adversarial.dct_matrix(28)
    assert torch.allclose(d @ d.T, torch.eye(28), atol=1e-5)
    x = torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(adversarial.idct2(adversarial.dct2(x)), x, atol=1e-4)
    mask = adversarial.lowpass_mask(28, 0.15)
    assert int(mask.sum()) == 25 and bool(mask[4, 4]) and not bool(mask[5, 0])  # u, v < 4.2
    low = adversarial.lowpass(x, mask)
    assert torch.allclose(adversarial.lowpass(low, mask), low, atol=1e-5)
    assert adversarial.energy_share(low, mask) > 1 - 1e-9
    assert 0.0 < adversarial.energy_share(x, mask) < 0.1  # white noise is mostly high-frequency
    assert bool(adversarial.lowpass_mask(28, 1.0).all())


@pytest.mark.parametrize("key,value", [("lf_eps", 0.0), ("lf_cutoff", 0.0), ("lf_cutoff", 1.5), ("lf_steps", 0),
                                       ("lf_step", -1.0), ("lf_batch_size", 0)])
def test_bad_options_are_user_errors(key, value):
    with pytest.raises(UserError, match=key):
        SPEC.build({**OPTS, key: value}, None)


def test_trigger_is_additive_clipped_identical_at_train_and_test_and_only_on_chosen_images():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 28, 28), generator=gen, dtype=torch.uint8)
    pattern = adversarial.lowpass(torch.randn(1, 28, 28, generator=gen) * 30, adversarial.lowpass_mask(28, 0.15))
    params = {"pattern": pattern}
    out = SPEC.apply(images, params, True)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, SPEC.apply(images, params, False))
    assert torch.equal(out.float(), (images.float() + pattern).round().clamp(0, 255))
    assert not SPEC.clean_label
    labels = torch.arange(40) % 10
    idx = choose_poison_indices(labels, 0.25, 0, target=0)
    poisoned = poison_train_set(images, labels, idx, lambda x: SPEC.apply(x, params, True), 0, "all2one", 10)
    changed = (poisoned.images != images).flatten(1).any(1)
    assert torch.equal(changed.nonzero().flatten(), idx)
    assert bool((poisoned.labels[idx] == 0).all()) and torch.equal(poisoned.labels[~changed], labels[~changed])


class _Saves:
    """A stand-in for a resource's Progress that keeps every saved state."""

    def __init__(self, start=None):
        self.start, self.saved = start, []

    def load(self):
        return self.start

    def save(self, state):
        self.saved.append({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})


def test_pattern_is_low_frequency_bounded_seeded_resumable_and_pushes_to_the_target(tiny_fmnist, tmp_path, monkeypatch):
    ctx = _ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist")
    surrogate = get_surrogate(ctx)
    others = ctx.train.images[ctx.train.labels != 0]

    def run(progress=None, steps=8):
        gen = engine.make_generator(0, torch.device("cpu"), "test-lf")
        return optimise_pattern(surrogate, others, 0, eps=12.0, cutoff=0.15, steps=steps, step=4.0, batch_size=32,
                                gen=gen, device=torch.device("cpu"), progress=progress)

    monkeypatch.setattr("utils.attacks.lf.SAVE_EVERY", 3)
    saves = _Saves()
    pattern = run(saves)
    assert pattern.shape == (1, 28, 28)
    assert float(pattern.abs().max()) <= 12.0 + 1e-4 and float(pattern.abs().max()) > 6.0
    mask = adversarial.lowpass_mask(28, 0.15)
    assert adversarial.energy_share(pattern, mask) > 1 - 1e-9  # no energy above the cutoff
    assert torch.equal(pattern, run())  # same seed, same pattern
    assert [s["step"] for s in saves.saved] == [3, 6, 8]
    assert torch.equal(run(_Saves(start=saves.saved[1])), pattern)  # resumed after step 6: same result
    # the pattern lowers the surrogate's loss towards the target on unseen images
    test_others = ctx.test.images[ctx.test.labels != 0]
    target = torch.zeros(len(test_others), dtype=torch.long)
    with torch.no_grad():
        before = F.cross_entropy(adversarial.surrogate_logits(surrogate, test_others.float()), target)
        after = F.cross_entropy(adversarial.surrogate_logits(surrogate, (test_others.float() + pattern).clamp(0, 255)),
                                target)
    assert after < before


def test_pattern_cache_is_reused_keyed_and_rebuilt_when_corrupt(tiny_cifar10, tmp_path, capsys):
    first = SPEC.prepare(_ctx(tiny_cifar10, tmp_path))
    assert "lf_pattern: building" in capsys.readouterr().out
    info = first["info"]
    assert {"surrogate", "fooling_rate", "linf_px", "l2_px", "energy_below_cutoff"} <= set(info)
    assert info["linf_px"] <= 16.0 and info["energy_below_cutoff"] > 0.999999 and 0 <= info["fooling_rate"] <= 1
    folder = next((tmp_path / "res" / "lf_pattern").iterdir())
    mtime = (folder / RESOURCE_FILE).stat().st_mtime_ns
    second = SPEC.prepare(_ctx(tiny_cifar10, tmp_path, "--pratio", "0.2"))
    out = capsys.readouterr().out
    assert "lf_pattern: using the cache" in out and "lf_pattern: building" not in out
    assert (folder / RESOURCE_FILE).stat().st_mtime_ns == mtime and torch.equal(first["pattern"], second["pattern"])
    SPEC.prepare(_ctx(tiny_cifar10, tmp_path, "--random_seed", "1"))
    SPEC.prepare(_ctx(tiny_cifar10, tmp_path, "--lf_eps", "6"))
    assert len(list((tmp_path / "res" / "lf_pattern").iterdir())) == 3
    capsys.readouterr()
    data = folder / RESOURCE_FILE
    flip_middle_byte(data)
    again = SPEC.prepare(_ctx(tiny_cifar10, tmp_path))
    captured = capsys.readouterr()
    assert "checksum" in captured.err and "lf_pattern: building" in captured.out
    assert torch.equal(again["pattern"], first["pattern"])


def test_surrogate_record_is_used_and_must_match_the_dataset(badnet_record, tiny_cifar10, tiny_fmnist, tmp_path):
    params = SPEC.prepare(_ctx(tiny_cifar10, tmp_path, "--surrogate_record", str(badnet_record)))
    assert str(badnet_record) in params["info"]["surrogate"]
    assert not (tmp_path / "res" / "surrogate").exists()  # nothing was trained
    meta = json.loads(next((tmp_path / "res" / "lf_pattern").glob("*/meta.json")).read_text())
    assert meta["key"]["surrogate"]["surrogate"] == "record"
    with pytest.raises(UserError, match="is for cifar10"):
        SPEC.prepare(_ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist", "--surrogate_record", str(badnet_record)))


def test_lf_runs_end_to_end_and_fine_tunes(tiny_fmnist, tmp_path):
    argv = attack_argv(tiny_fmnist, tmp_path, "--dataset", "fmnist", "--surrogate_epochs", "1", "--lr", "0.01",
                       "--lf_steps", "5", "--resource_root", str(tmp_path / "res"))
    run = subprocess.run([sys.executable, "attack/lf.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    folder = next(tmp_path.glob("fmnist/lf/*/"))
    record = load_record(folder)
    assert record["attack"] == "lf" and not record["clean_label"]
    assert record["trigger"]["pattern"].shape == (1, 28, 28)
    summary = json.loads((folder / "summary.json").read_text())
    assert {"fooling_rate", "linf_px", "l2_px", "energy_below_cutoff"} <= set(summary["attack_info"])
    exp = victim.rebuild_experiment(record, str(tiny_fmnist), torch.device("cpu"))
    assert torch.equal(exp.bd_test.images, SPEC.apply(exp.clean_test.images[exp.bd_test.source_indices],
                                                      record["trigger"], False))
    ft = subprocess.run([sys.executable, "fine_tune/ft.py", "--attack", "lf", "--dataset", "fmnist", "--model", "smallcnn",
                         "--pratio", "0.1", "--epochs", "1", "--ft_mode", "fst", "--device", "cpu",
                         "--dataset_path", str(tiny_fmnist), "--record_root", str(tmp_path), "--progress", "false"],
                        cwd=REPO_ROOT, capture_output=True, text=True)
    assert ft.returncode == 0, ft.stderr
