"""SIG (clean label) and the Bypass adversarial-embedding attacks."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO_ROOT, attack_argv
from models import build_model, get_head
from utils.attacks import triggers
from utils.attacks.registry import ATTACKS, get_attack
from utils.attacks.bypass import bypass_hooks
from utils.errors import UserError
from utils.attacks.poison import choose_poison_indices, poison_train_set


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 64)])
def test_sig_pattern_varies_along_columns_only(channels, size):
    pattern = triggers.sig_pattern(channels, size, 40.0, 6.0)
    assert pattern.shape == (channels, size, size)
    assert torch.equal(pattern, pattern[:1, :1, :].expand_as(pattern))  # same for every row and channel
    j = torch.arange(size, dtype=torch.float32)
    assert torch.allclose(pattern[0, 0], 40 * torch.sin(2 * torch.pi * j * 6 / size), atol=1e-4)


def test_sig_trigger_keeps_dtype_range_and_clips():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), generator=gen, dtype=torch.uint8)
    images[0] = 255
    images[1] = 0
    spec = get_attack("sig")
    params = spec.build({"sig_delta": 40.0, "sig_f": 6.0}, _info(3, 32))
    out = spec.apply(images, params, True)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    expected = (images.float() + params["pattern"]).round().clamp(0, 255)
    assert torch.equal(out.float(), expected)
    assert out[0].min() < 255 and out[1].max() > 0  # saturated images still carry the signal where it fits


def test_sig_is_clean_label_and_touches_only_target_class():
    spec = get_attack("sig")
    assert spec.clean_label
    labels = torch.arange(200) % 10
    idx = choose_poison_indices(labels, 0.05, 0, target=3, clean_label=True)
    assert len(idx) == 10 and bool((labels[idx] == 3).all())
    images = torch.zeros(200, 1, 8, 8, dtype=torch.uint8)
    params = {"pattern": triggers.sig_pattern(1, 8, 40.0, 2.0)}
    out = poison_train_set(images, labels, idx, lambda x: spec.apply(x, params, True), 3, "all2one", 10, clean_label=True)
    assert torch.equal(out.labels, labels)  # labels kept
    changed = (out.images != images).flatten(1).any(1)
    assert torch.equal(changed.nonzero().flatten(), idx)


def test_sig_target_class_too_small_is_a_clear_error():
    labels = torch.arange(100) % 10  # 10 images per class
    with pytest.raises(UserError, match="target class 0"):
        choose_poison_indices(labels, 0.2, 0, target=0, clean_label=True)


def _info(channels, size):
    from utils.data.datasets import DatasetInfo
    return DatasetInfo("x", 10, channels, size, (0.5,) * channels, (0.5,) * channels, False)


class _Exp:
    def __init__(self, mask):
        self.device = torch.device("cpu")
        self.train = type("T", (), {"poison_mask": mask})()


def test_bypass_loss_has_the_documented_sign_and_discriminator_learns():
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1, 28)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:5] = True
    cfg = {"regularization_ratio": 20.0, "discriminator_lr": 0.01}
    hooks = bypass_hooks(cfg, model, _Exp(mask))
    disc = hooks.state["discriminator"]
    x, y, idx = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)), torch.arange(16)
    loss, logits = hooks.loss_fn(model, x, y, idx)
    # recompute: CE - lambda * BCE(D(feat), is_poisoned), with the discriminator in the same state
    with torch.no_grad():
        feat = model.features(x)
        ce = F.cross_entropy(get_head(model)(feat), y)
    assert torch.allclose(logits, get_head(model)(feat), atol=1e-5)
    detect = (ce - loss.detach()) / 20.0
    assert float(detect) > 0  # the regulariser enters with a minus sign: fooling D lowers the loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    before = [p.detach().clone() for p in disc.parameters()]
    hooks.after_step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, disc.parameters())), "D did not step"
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())


@pytest.mark.parametrize("model", ["smallcnn", "preactresnet18"])
def test_bypass_works_with_any_feature_width(model):
    net = build_model(model, 10, 3, 32)
    hooks = bypass_hooks({"regularization_ratio": 1.0, "discriminator_lr": 0.001}, net, _Exp(torch.tensor([True, False] * 4)))
    loss, _ = hooks.loss_fn(net, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8))
    loss.backward()
    hooks.after_step()
    assert torch.isfinite(loss)


def test_every_registered_attack_has_script_and_yaml():
    for name in ATTACKS:
        script = {"blended_bypass": "blend_bypass"}.get(name, name)
        assert (REPO_ROOT / "attack" / f"{script}.py").is_file(), name
        assert (REPO_ROOT / "config" / "attack" / name / "default.yaml").is_file(), name


@pytest.mark.parametrize("script,name,extra", [
    ("sig", "sig", ["--pratio", "0.05"]),
    ("badnet_bypass", "badnet_bypass", []),
    ("blend_bypass", "blended_bypass", []),
])
def test_new_attacks_run_end_to_end_and_fine_tune(script, name, extra, tiny_cifar10, tmp_path):
    argv = attack_argv(tiny_cifar10, tmp_path, *extra)
    run = subprocess.run([sys.executable, f"attack/{script}.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    record = torch.load(next(tmp_path.glob(f"cifar10/{name}/*/attack_result.pt")), weights_only=True)
    assert record["attack"] == name
    if name == "sig":
        assert record["clean_label"]
    ft = subprocess.run([sys.executable, "fine_tune/ft.py", "--attack", name, "--dataset", "cifar10", "--model", "smallcnn",
                         "--pratio", extra[1] if extra else "0.1", "--epochs", "1", "--ft_mode", "fst", "--device", "cpu",
                         "--dataset_path", str(tiny_cifar10), "--record_root", str(tmp_path), "--progress", "false"],
                        cwd=REPO_ROOT, capture_output=True, text=True)
    assert ft.returncode == 0, ft.stderr
