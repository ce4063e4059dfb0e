"""WaNet: the warping field, the uint8 trigger and the in-batch poisoning with noise mode."""
from __future__ import annotations

import subprocess
import sys

import torch

from conftest import REPO_ROOT, attack_argv
from utils.attacks.wanet import apply_uint8, make_field, poison_batch, shift_rotate, warp


def test_field_is_seeded_bounded_and_smooth():
    a, b, c = make_field(32, 4, 0.5, 0), make_field(32, 4, 0.5, 0), make_field(32, 4, 0.5, 1)
    assert a.shape == (1, 32, 32, 2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) <= 1.0
    identity = make_field(32, 4, 0.0, 0)
    offset = (a - identity).abs()
    assert 0 < float(offset.max()) < 0.5  # a warp of at most a few pixels


def test_uint8_trigger_keeps_shape_dtype_and_zero_strength_is_identity():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=gen, dtype=torch.uint8)
    out = apply_uint8(images, make_field(32, 4, 0.5, 0))
    assert out.dtype == torch.uint8 and out.shape == images.shape and not torch.equal(out, images)
    assert torch.equal(apply_uint8(images, make_field(32, 4, 0.0, 0)), images)
    assert torch.equal(apply_uint8(images[:3], make_field(32, 4, 0.5, 0)), out[:3])  # per-image, batch-independent


def test_poison_batch_relabels_warped_samples_and_keeps_noise_mode_labels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 1, 28, 28, generator=gen)
    y = torch.arange(20) % 10
    grid = make_field(28, 4, 0.5, 0)
    inputs, targets = poison_batch(x, y, grid, 0.1, 2.0, target=0, label_trans="all2one", classes=10,
                                   gen=torch.Generator().manual_seed(1))
    assert inputs.shape == x.shape
    assert torch.equal(targets[:2], torch.zeros(2, dtype=torch.long))  # int(20 * 0.1) poisoned -> target
    assert torch.equal(targets[2:], y[2:])  # noise mode (next 4) and clean samples keep their labels
    assert torch.allclose(inputs[:2], warp(x[:2], grid))
    assert not torch.allclose(inputs[2:6], warp(x[2:6], grid))  # jittered, not the trigger field
    assert torch.equal(inputs[6:], x[6:])
    _, t2 = poison_batch(x, y, grid, 0.1, 2.0, 0, "all2all", 10, torch.Generator().manual_seed(1))
    assert torch.equal(t2[:2], (y[:2] + 1) % 10)


def test_shift_rotate_keeps_shape_and_zero_range_is_identity():
    x = torch.randn(4, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    assert shift_rotate(x, 5, 10.0, True, gen).shape == x.shape
    assert torch.allclose(shift_rotate(x, 0, 0.0, False, gen), x, atol=1e-5)


def test_wanet_runs_end_to_end_with_empty_static_poison_list(tiny_cifar10, tmp_path):
    argv = attack_argv(tiny_cifar10, tmp_path)
    run = subprocess.run([sys.executable, "attack/wanet.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    record = torch.load(next(tmp_path.glob("cifar10/wanet/*/attack_result.pt")), weights_only=True)
    assert record["batch_poisoning"] and len(record["poison_indices"]) == 0
    assert record["trigger"]["grid"].shape == (1, 32, 32, 2)


def test_post_augment_switch_selects_who_augments():
    from types import SimpleNamespace

    from utils import engine
    from utils.data.datasets import dataset_info
    from utils.attacks.wanet import wanet_hooks

    info = dataset_info("fmnist")
    exp = SimpleNamespace(trigger_params={"grid": make_field(28, 4, 0.5, 0)}, device=torch.device("cpu"), info=info,
                          pipeline=engine.Pipeline.for_dataset(info, torch.device("cpu")))
    cfg = {"random_seed": 0, "pratio": 0.25, "cross_ratio": 0.0, "attack_target": 0, "attack_label_trans": "all2one"}
    x = torch.randn(8, 1, 28, 28)
    y = torch.arange(8) + 1
    seen = []

    def net(inputs):
        seen.append(inputs.detach().clone())
        return torch.zeros(len(inputs), 10, requires_grad=True)

    without = wanet_hooks({**cfg, "post_augment": False}, None, exp)
    assert without.augment  # the pipeline's crop/flip runs before the hook
    without.loss_fn(net, x, y, torch.arange(8))
    assert torch.allclose(seen[-1][:2], warp(x[:2], exp.trigger_params["grid"]))  # exactly the test-time warp
    assert torch.equal(seen[-1][2:], x[2:])
    with_aug = wanet_hooks({**cfg, "post_augment": True}, None, exp)
    assert not with_aug.augment
    for _ in range(4):  # the batch-wide draw may leave a batch untouched (p 0.2 x 0.5 without flips)
        with_aug.loss_fn(net, x, y, torch.arange(8))
    assert any(not torch.allclose(s[2:], x[2:]) for s in seen[-4:])  # cropped/rotated after poisoning
    per_sample = wanet_hooks({**cfg, "post_augment": True, "post_augment_scope": "sample"}, None, exp)
    same = x[:1].expand(8, -1, -1, -1).clone()
    per_sample.loss_fn(net, same, torch.full((8,), 1), torch.arange(8))
    assert not torch.allclose(seen[-1][2], seen[-1][3])  # each sample its own shift/rotation


def test_grid_rescale_scales_identity_and_field_together():
    """The original's grid is clamp((identity + s * field / H) * grid_rescale); re-computed here from
    the same seeded control points."""
    import torch.nn.functional as F

    from utils import engine

    size, k, s, rescale = 32, 4, 0.5, 0.9
    gen = torch.Generator().manual_seed(engine.derive_seed(0, "wanet-field"))
    ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    line = torch.linspace(-1, 1, size)
    first, second = torch.meshgrid(line, line, indexing="ij")
    identity = torch.stack((second, first), 2)[None]
    expected = ((identity + s * noise / size) * rescale).clamp(-1, 1)
    got = make_field(size, k, s, 0, grid_rescale=rescale)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(make_field(size, k, s, 0), (identity + s * noise / size).clamp(-1, 1), atol=1e-6)


def _torchvision_batch_augment(x, pad, degrees, flip, seed):
    """The original's PostTensorTransform on a batch tensor, with torchvision's own functions and the
    draws that `batch_augment` takes from a generator seeded with `seed`."""
    from utils.compat import import_torchvision

    import_torchvision()
    import torchvision.transforms.functional as TF

    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(4, generator=gen)
    offset = torch.randint(0, 2 * pad + 1, (2,), generator=gen)
    drawn = (bool(u[0] < 0.8), bool(u[1] < 0.5), bool(flip and u[3] < 0.5))
    h, w = x.shape[-2:]
    if drawn[0]:
        x = TF.crop(TF.pad(x, [pad]), int(offset[0]), int(offset[1]), h, w)
    if drawn[1]:
        x = TF.rotate(x, float((u[2] * 2 - 1) * degrees), interpolation=TF.InterpolationMode.NEAREST, fill=[0.0])
    if drawn[2]:
        x = TF.hflip(x)
    return x, drawn


def test_batch_augment_is_the_originals_crop_rotation_flip_with_one_draw_per_batch():
    from utils.attacks.wanet import batch_augment

    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = set()
    for seed in range(16):
        expected, drawn = _torchvision_batch_augment(x, 5, 10.0, True, seed)
        got = batch_augment(x, 5, 10.0, True, torch.Generator().manual_seed(seed))
        assert torch.allclose(got, expected, atol=1e-6), (seed, drawn)
        seen.add(drawn)
    assert {d[0] for d in seen} == {True, False} and {d[1] for d in seen} == {True, False}
    assert {d[2] for d in seen} == {True, False}
    # one draw for the whole batch: identical images stay identical (a per-sample draw separates them)
    same = x[:1].expand(8, -1, -1, -1).clone()
    for seed in range(4):
        out = batch_augment(same, 5, 10.0, True, torch.Generator().manual_seed(seed))
        assert all(torch.equal(out[0], out[i]) for i in range(1, 8))
    # no flip where the dataset forbids it; nothing at all with zero ranges and no flip
    for seed in range(8):
        expected, _ = _torchvision_batch_augment(x, 5, 10.0, False, seed)
        assert torch.allclose(batch_augment(x, 5, 10.0, False, torch.Generator().manual_seed(seed)), expected, atol=1e-6)
    assert torch.equal(batch_augment(x, 0, 0.0, False, torch.Generator().manual_seed(0)), x)


def test_rotation_matches_torchvision_on_non_square_images():
    import torch.nn.functional as F

    from utils.compat import import_torchvision
    from utils.attacks.wanet import rotation_theta

    import_torchvision()
    import torchvision.transforms.functional as TF

    x = torch.randn(2, 1, 20, 28, generator=torch.Generator().manual_seed(1))
    for degrees in (7.3, -9.1):
        grid = F.affine_grid(rotation_theta(torch.tensor([degrees] * 2), 20, 28), [2, 1, 20, 28], align_corners=False)
        got = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        assert torch.allclose(got, TF.rotate(x, degrees, interpolation=TF.InterpolationMode.NEAREST, fill=[0.0]),
                              atol=1e-6)


def test_default_config_is_the_originals_constant_lr_and_batch_augmentation():
    from utils.victim.experiment import parse_attack_config

    cfg = parse_attack_config("wanet", ["--yaml_path", "config/attack/prototype/cifar10.yaml"])
    assert cfg["lr_scheduler"] == "none" and cfg["lr"] == 0.1
    assert cfg["post_augment"] and cfg["post_augment_scope"] == "batch"
    assert (cfg["random_crop"], cfg["random_rotation"], cfg["grid_rescale"]) == (5, 10.0, 1.0)


def test_augmentation_options_are_checked():
    from types import SimpleNamespace

    import pytest

    from utils import engine
    from utils.data.datasets import dataset_info
    from utils.errors import UserError
    from utils.attacks.wanet import wanet_hooks

    info = dataset_info("fmnist")
    exp = SimpleNamespace(trigger_params={"grid": make_field(28, 4, 0.5, 0)}, device=torch.device("cpu"), info=info,
                          pipeline=engine.Pipeline.for_dataset(info, torch.device("cpu")))
    cfg = {"random_seed": 0, "pratio": 0.1, "cross_ratio": 2.0, "attack_target": 0, "attack_label_trans": "all2one"}
    with pytest.raises(UserError, match="random_crop"):
        wanet_hooks({**cfg, "random_crop": 28, "random_rotation": 10.0}, None, exp)
    with pytest.raises(UserError, match="random_rotation"):
        wanet_hooks({**cfg, "random_crop": 5, "random_rotation": -1.0}, None, exp)


def test_cpu_recipe_loads_and_differs_from_the_default_only_where_documented():
    from utils.victim.experiment import parse_attack_config

    base = ["--yaml_path", "config/attack/prototype/fmnist.yaml"]
    default = parse_attack_config("wanet", base)
    cpu = parse_attack_config("wanet", base + ["--bd_yaml_path", "config/attack/wanet/fmnist_cpu.yaml"])
    differ = {k for k in default if default[k] != cpu[k]}
    assert differ == {"post_augment", "lr_scheduler", "bd_yaml_path"}
    assert not cpu["post_augment"] and cpu["lr_scheduler"] == "cosine"
