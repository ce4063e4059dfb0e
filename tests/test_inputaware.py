"""Input-aware dynamic backdoor: the networks, the uint8 trigger, the mask pre-training losses, the
in-batch poisoning with cross-trigger samples, resuming and the record round trip."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO_ROOT
from utils import engine
from utils.attacks import inputaware as ia
from utils.attacks.registry import get_attack
from utils.data.datasets import dataset_info
from utils.errors import UserError


def _params(channels: int, size: int, seed: int = 0, width: int = 4, depth: int = 3, norm: str = "batch") -> dict:
    """Trigger parameters as build + prepare make them (the mask network untrained but seeded)."""
    return {"channels": channels, "image_size": size, "width": width, "depth": depth, "norm": norm,
            "generator": ia.plain_state(ia.init_generator(channels, width, seed, depth, norm).state_dict()),
            "mask": ia.plain_state(ia.init_mask(channels, width, seed, depth, norm).state_dict())}


def _cfg(**over) -> dict:
    cfg = {o.name: o.default for o in get_attack("inputaware").options}
    cfg.update({"random_seed": 0, "pratio": 0.1, "batch_size": 128, "attack_target": 0,
                "attack_label_trans": "all2one"})
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 17)])
def test_trigger_keeps_shape_dtype_range_and_is_input_specific(channels, size):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, channels, size, size), generator=gen, dtype=torch.uint8)
    params = _params(channels, size)
    out = ia.apply_uint8(images, params)
    assert out.dtype == torch.uint8 and out.shape == images.shape and not torch.equal(out, images)
    # per-image and batch-independent: a subset, or a single image, gets exactly the same trigger
    assert torch.equal(ia.apply_uint8(images[3:7].clone(), params), out[3:7])
    assert torch.equal(ia.apply_uint8(images[5:6].clone(), params), out[5:6])
    # input-specific: two images get different residual patterns
    x = images.float() / 255
    g, m = ia.networks_for(params, torch.device("cpu"))
    with torch.no_grad():
        patterns, masks = g(x), m(x)
    assert float(patterns.min()) >= 0 and float(patterns.max()) <= 1 and masks.shape == (10, 1, size, size)
    assert float(ia.rms_distance(patterns[:1], patterns[1:2])) > 0
    # the uint8 trigger is exactly the blend rounded to the grid
    expected = (ia.blend(x, patterns, masks) * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(out, expected)


def test_trigger_is_deterministic_per_seed_and_checks_shapes():
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    a = ia.apply_uint8(images, _params(3, 32, seed=0))
    b = ia.apply_uint8(images, _params(3, 32, seed=0))
    c = ia.apply_uint8(images, _params(3, 32, seed=1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(UserError, match="3x32x32"):
        ia.apply_uint8(images[:, :1], _params(3, 32))
    assert ia.apply_uint8(images[:0], _params(3, 32)).shape == (0, 3, 32, 32)


def test_options_are_checked():
    info = dataset_info("fmnist")
    ia.inputaware_build(_cfg(), info)
    for bad, match in (({"mask_density": 1.5}, "mask_density"), ({"mask_epochs": 0}, "mask_epochs"),
                       ({"cross_ratio": -1.0}, "cross_ratio"), ({"random_crop": 28}, "random_crop"),
                       ({"pratio": 0.001, "batch_size": 64}, "below one sample"), ({"generator_lr": 0.0}, "generator_lr")):
        with pytest.raises(UserError, match=match):
            ia.inputaware_build(_cfg(**bad), info)


def test_density_loss_pushes_the_mask_mean_down():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 1, 28, 28), generator=gen, dtype=torch.uint8)
    before = ia.mask_stats(ia.init_mask(1, 4, 0), images, torch.device("cpu"))["mask_density"]
    net, stats = ia.train_mask_net(images, epochs=4, batch_size=8, lr=0.01, density=0.032, lambda_norm=100.0,
                                   lambda_div=1.0, width=4, seed=0, device=torch.device("cpu"))
    after = ia.mask_stats(net, images, torch.device("cpu"))["mask_density"]
    assert before > 0.2 and after < before / 2
    # without the density term (diversity only) the masks stay dense
    net0, _ = ia.train_mask_net(images, epochs=4, batch_size=8, lr=0.01, density=0.032, lambda_norm=0.0,
                                lambda_div=1.0, width=4, seed=0, device=torch.device("cpu"))
    assert ia.mask_stats(net0, images, torch.device("cpu"))["mask_density"] > after
    assert ia.density_loss(torch.full((2, 1, 4, 4), 0.032), 0.032) == 0


class _Mirror(torch.nn.Module):
    def forward(self, x):
        return x.flip(-1)


class _Half(torch.nn.Module):
    def forward(self, x):
        return torch.full_like(x[:, :1], 0.5)


def test_cross_trigger_samples_keep_labels_and_backdoor_samples_get_the_target():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 28, 28, generator=gen)
    y = torch.arange(20) % 10
    g, m = _Mirror(), _Half()  # an input-specific pattern (the mirrored image) and a fixed half mask
    n_bd, n_cross = ia.batch_counts(20, 0.1, 1.0)
    assert (n_bd, n_cross) == (2, 2)
    sources = ia.partners(20, n_bd, n_cross, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert not torch.equal(sources, torch.arange(n_bd, n_bd + n_cross))
    assert bool((sources != torch.arange(n_bd, n_bd + n_cross)).all())  # always another sample's trigger
    images, labels, div = ia.poison_batch(x, y, g, m, n_bd, n_cross, sources, 0, "all2one", 10)
    assert torch.equal(labels[:2], torch.zeros(2, dtype=torch.long))
    assert torch.equal(labels[2:], y[2:])
    with torch.no_grad():
        own = ia.blend(x[:2], g(x[:2]), m(x[:2]))
        cross = ia.blend(x[2:4], g(x[sources]), m(x[sources]))
        not_own = ia.blend(x[2:4], g(x[2:4]), m(x[2:4]))
    assert torch.allclose(images[:2], (own * 255).round() / 255, atol=1e-6)
    assert torch.allclose(images[2:4], (cross * 255).round() / 255, atol=1e-6)
    assert not torch.equal(images[2:4], (not_own * 255).round() / 255)  # not their own trigger
    assert torch.equal(images[4:], x[4:])
    assert torch.isfinite(div) and float(div) > 0
    _, labels2, _ = ia.poison_batch(x, y, g, m, n_bd, n_cross, sources, 0, "all2all", 10)
    assert torch.equal(labels2[:2], (y[:2] + 1) % 10) and torch.equal(labels2[2:], y[2:])


def _fake_experiment(params: dict, n: int = 64):
    info = dataset_info("fmnist")
    gen = torch.Generator().manual_seed(0)
    train = SimpleNamespace(images=torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8),
                            labels=torch.arange(n) % 10)
    return SimpleNamespace(device=torch.device("cpu"), trigger_params=params, train=train, info=info,
                           pipeline=engine.Pipeline.for_dataset(info, torch.device("cpu")))


def _step(hooks, model, opt, exp, idx):
    loss, _ = hooks.loss_fn(model, None, exp.train.labels[idx], idx)
    opt.zero_grad()
    loss.backward()
    opt.step()
    hooks.after_step()


def test_generator_trains_jointly_mask_stays_fixed_and_resume_state_includes_g():
    import models

    cfg = _cfg(pratio=0.25)
    params = _params(1, 28)
    exp = _fake_experiment(params)
    torch.manual_seed(0)
    model = models.build_model("smallcnn", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hooks = get_attack("inputaware").training(cfg, model, exp)
    assert hooks.augment is False and {"generator", "generator_optimizer", "rng"} <= set(hooks.state)
    _step(hooks, model, opt, exp, torch.arange(16))
    after_one = hooks.trigger_params()
    assert set(after_one) == {"generator"}  # M is fixed after phase 1
    assert any(not torch.equal(after_one["generator"][k], params["generator"][k]) for k in params["generator"])
    # checkpoint (what victim._train_and_record saves), then two more steps
    saved = copy.deepcopy({k: v.state_dict() for k, v in hooks.state.items()})
    model_state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(2):
        _step(hooks, model, opt, exp, torch.arange(16, 32))
    reference = hooks.trigger_params()["generator"]
    # a "resumed" run: fresh hooks from the initial params, state restored, same two steps
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    resumed = get_attack("inputaware").training(cfg, model, _fake_experiment(params))
    for name, obj in resumed.state.items():
        obj.load_state_dict(saved[name])
    assert all(torch.equal(resumed.trigger_params()["generator"][k], after_one["generator"][k]) for k in after_one["generator"])
    for _ in range(2):
        _step(resumed, model, opt, exp, torch.arange(16, 32))
    again = resumed.trigger_params()["generator"]
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True)


def test_end_to_end_record_rebuild_and_fine_tune(tiny_fmnist, tmp_path):
    from utils.record.store import load_torch_file
    from utils.victim.experiment import Experiment, evaluate_experiment, rebuild_experiment
    import models

    resources = tmp_path / "res"
    argv = ["attack/inputaware.py", "--yaml_path", "config/attack/prototype/fmnist.yaml", "--dataset_path",
            str(tiny_fmnist), "--download", "false", "--train_subset", "0", "--test_subset", "0", "--epochs", "2",
            "--device", "cpu", "--record_root", str(tmp_path), "--progress", "false", "--batch_size", "32",
            "--pratio", "0.2", "--mask_epochs", "2", "--net_width", "4", "--resource_root", str(resources)]
    run = _run(argv)
    assert run.returncode == 0, run.stderr
    assert "inputaware_mask: building" in run.stdout
    folder = next(tmp_path.glob("fmnist/inputaware/*"))
    record = load_torch_file(folder / "attack_result.pt", "record")
    assert record["batch_poisoning"] and len(record["poison_indices"]) == 0
    trigger = record["trigger"]
    assert {"generator", "mask", "channels", "image_size", "width"} <= set(trigger)
    initial = ia.init_generator(1, 4, 0).state_dict()
    assert any(not torch.equal(trigger["generator"][k], initial[k]) for k in initial)  # the trained G, not its init
    # the mask cache: one resource folder, reused by a second run with another classifier setting
    assert len(list(resources.glob("inputaware_mask/*/resource.pt"))) == 1
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["attack_info"]["mask_epochs"] == 2
    # rebuilt from the record alone: bit-identical backdoor test set and the same metrics
    exp = rebuild_experiment(record, str(tiny_fmnist), torch.device("cpu"))
    assert isinstance(exp, Experiment) and not exp.train.poison_mask.any()
    expected = torch.cat([ia.apply_uint8(exp.clean_test.images[i:i + 7], trigger)
                          for i in range(0, len(exp.clean_test.images), 7)])
    keep = exp.bd_test.source_indices
    assert torch.equal(exp.bd_test.images, expected[keep])
    model = models.build_model("smallcnn", 10, 1, 28)
    model.load_state_dict(record["model"])
    amp = engine.amp_dtype("auto", torch.device("cpu"))  # what the run used
    assert summary["amp"] == str(amp)
    metrics = evaluate_experiment(engine.place_model(model, exp.pipeline, exp.device), exp, 0, amp)
    assert {k: metrics[k] for k in ("clean_acc", "asr", "ra")} == {k: summary[k] for k in ("clean_acc", "asr", "ra")}
    rerun = _run(argv[:-2] + ["--resource_root", str(resources), "--lr", "0.02", "--overwrite", "true"])
    assert rerun.returncode == 0, rerun.stderr
    assert "inputaware_mask: using the cache" in rerun.stdout
    ft = _run(["fine_tune/ft.py", "--attack", "inputaware", "--dataset", "fmnist", "--model", "smallcnn",
               "--pratio", "0.2", "--epochs", "1", "--ft_mode", "fst", "--device", "cpu", "--dataset_path",
               str(tiny_fmnist), "--record_root", str(tmp_path), "--progress", "false"])
    assert ft.returncode == 0, ft.stderr


class _Killed(Exception):
    pass


class _MemoryProgress:
    """A resources.Progress stand-in kept in memory; `kill_after` stops the run after that many saves."""

    def __init__(self, kill_after: int | None = None):
        self.state, self.kill_after, self.saves = None, kill_after, 0

    def load(self):
        return copy.deepcopy(self.state)

    def save(self, state):
        self.state = copy.deepcopy(state)
        self.saves += 1
        if self.kill_after is not None and self.saves >= self.kill_after:
            raise _Killed


def test_mask_pretraining_resumes_exactly_after_a_kill():
    images = torch.randint(0, 256, (24, 1, 28, 28), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    kwargs = dict(epochs=3, batch_size=8, lr=0.01, density=0.032, lambda_norm=100.0, lambda_div=1.0, width=4, seed=0,
                  device=torch.device("cpu"))
    straight, _ = ia.train_mask_net(images, **kwargs)
    progress = _MemoryProgress(kill_after=1)
    with pytest.raises(_Killed):
        ia.train_mask_net(images, progress=progress, **kwargs)
    assert progress.state["epoch"] == 1
    progress.kill_after = None
    resumed, _ = ia.train_mask_net(images, progress=progress, **kwargs)
    ref = straight.state_dict()
    assert all(torch.equal(resumed.state_dict()[k], ref[k]) for k in ref)


def _conv_layout(net: torch.nn.Module) -> list[tuple[int, int, bool]]:
    """(in, out, followed by ReLU) for every convolution in order; each must be followed by a norm."""
    mods = list(net.modules())
    out = []
    for i, mod in enumerate(mods):
        if isinstance(mod, torch.nn.Conv2d):
            norm = mods[i + 1]
            assert isinstance(norm, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))
            relu = i + 2 < len(mods) and isinstance(mods[i + 2], torch.nn.ReLU)
            out.append((mod.in_channels, mod.out_channels, relu))
    return out


def test_networks_have_the_originals_layout_and_batchnorm():
    # the original's blocks for CIFAR: 3 levels from 32 channels, one middle convolution, a halving
    # convolution at each level on the way up, no ReLU after the last one
    cifar = [(3, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 128),
             (128, 128), (128, 64), (64, 64), (64, 32), (32, 32), (32, 3)]
    layout = _conv_layout(ia.PatternGenerator(3, 32, 3, "batch"))
    assert [c[:2] for c in layout] == cifar
    assert [c[2] for c in layout] == [True] * 12 + [False]
    mnist = [(1, 16), (16, 16), (16, 32), (32, 32), (32, 32), (32, 32), (32, 16), (16, 16), (16, 1)]
    assert [c[:2] for c in _conv_layout(ia.MaskGenerator(1, 16, 2, "batch"))] == mnist
    bns = [m for m in ia.PatternGenerator(3, 32, 3, "batch").modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 13 and all(b.momentum == 0.05 and b.eps == 1e-5 and b.affine for b in bns)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in ia.PatternGenerator(3, 32, 3, "group").modules())
    cfg = _cfg()
    assert (cfg["net_width"], cfg["net_depth"], cfg["net_norm"], cfg["augment_order"]) == (32, 3, "batch", "pre")
    # 28 px is not a multiple of 8: the upsampling returns to each level's size
    x = torch.rand(2, 1, 28, 28)
    assert ia.PatternGenerator(1, 4, 3).eval()(x).shape == x.shape


def test_squashing_and_threshold_are_the_originals():
    torch.manual_seed(0)
    g = ia.PatternGenerator(1, 4, 2, "group").eval()
    m = ia.MaskGenerator(1, 4, 2, "group").eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        raw_g = ia.EncoderDecoder.forward(g, x)
        raw_m = ia.EncoderDecoder.forward(m, x)
        assert torch.allclose(g(x), torch.tanh(raw_g) / (2 + 1e-7) + 0.5, atol=1e-7)
        soft = torch.tanh(raw_m) / (2 + 1e-7) + 0.5
        assert torch.allclose(m(x), torch.tanh(soft * 20 - 10) / (2 + 1e-7) + 0.5, atol=1e-7)


def test_generator_runs_separately_on_backdoor_images_and_sources_and_pairs_them_for_diversity():
    """With BatchNorm in train mode each group is normalised by its own statistics, as the original's
    two calls; the diversity loss pairs backdoor image i with cross source i."""
    torch.manual_seed(0)
    g = ia.PatternGenerator(1, 4, 2, "batch").train()
    m = ia.MaskGenerator(1, 4, 2, "batch").eval()
    x = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 10
    n_bd, n_cross = 3, 3
    sources = ia.partners(20, n_bd, n_cross, torch.Generator().manual_seed(3), torch.device("cpu"))
    images, _, div = ia.poison_batch(x, y, g, m, n_bd, n_cross, sources, 0, "all2one", 10)
    with torch.no_grad():
        p_own, p_src = g(x[:n_bd]), g(x[sources])
        m_own, m_src = m(x[:n_bd]), m(x[sources])
        own = x[:n_bd] + m_own * (p_own - x[:n_bd])
        cross = x[n_bd:6] + m_src * (p_src - x[n_bd:6])
    assert torch.allclose(images[:n_bd], (own * 255).round() / 255, atol=1e-6)
    assert torch.allclose(images[n_bd:6], (cross * 255).round() / 255, atol=1e-6)
    # the original's loss: mean over pairs of rms(x1 - x2) / (rms(G(x1) - G(x2)) + 1e-7)
    d_img = (x[:n_bd] - x[sources]).pow(2).mean(dim=(1, 2, 3)).sqrt()
    d_pat = (p_own - p_src).pow(2).mean(dim=(1, 2, 3)).sqrt()
    assert torch.allclose(div, (d_img / (d_pat + 1e-7)).mean(), rtol=1e-4)


def test_augmentation_comes_before_the_trigger_and_nothing_after():
    cfg = _cfg(pratio=0.25)
    params = _params(1, 28)
    exp = _fake_experiment(params)
    hooks = get_attack("inputaware").training(cfg, None, exp)
    seen = []

    def net(inputs):
        seen.append(inputs.detach().clone())
        return torch.zeros(len(inputs), 10, requires_grad=True)

    idx = torch.arange(16)
    hooks.loss_fn(net, None, exp.train.labels[idx], idx)
    # the same draws: the pipeline's crop/flip first, from the hook's own generator
    gen = engine.make_generator(0, torch.device("cpu"), "inputaware-batches")
    aug = exp.pipeline.augment(exp.train.images[idx], gen).float() / 255
    pipe = exp.pipeline
    assert not torch.equal(aug, exp.train.images[idx].float() / 255)
    n_bd, n_cross = ia.batch_counts(16, 0.25, 1.0)
    assert torch.allclose(seen[0][n_bd + n_cross:], ((aug - pipe.mean) / pipe.std)[n_bd + n_cross:], atol=1e-5)
    g = ia.PatternGenerator(1, 4, 3, "batch")
    g.load_state_dict(params["generator"])
    m = ia.MaskGenerator(1, 4, 3, "batch")
    m.load_state_dict(params["mask"])
    with torch.no_grad():
        own = ia.blend(aug[:n_bd], g.train()(aug[:n_bd]), m.eval()(aug[:n_bd]))
    assert torch.allclose(seen[0][:n_bd], ((own * 255).round() / 255 - pipe.mean) / pipe.std, atol=1e-4)
    # augment_order post: the raw image is triggered, then shifted/rotated (clean rows no longer the crop)
    post = get_attack("inputaware").training(_cfg(pratio=0.25, augment_order="post"), None, _fake_experiment(params))
    post.loss_fn(net, None, exp.train.labels[idx], idx)
    assert not torch.allclose(seen[1][n_bd + n_cross:], seen[0][n_bd + n_cross:], atol=1e-3)


def test_generator_gradient_accumulates_as_in_the_original_unless_cleared():
    import models

    params = _params(1, 28)
    torch.manual_seed(0)
    model = models.build_model("smallcnn", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    exp = _fake_experiment(params)
    hooks = get_attack("inputaware").training(_cfg(pratio=0.25), model, exp)
    gnet = hooks.state["generator"]
    _step(hooks, model, opt, exp, torch.arange(16))
    first = [p.grad.clone() for p in gnet.parameters()]
    idx = torch.arange(16, 32)
    loss, _ = hooks.loss_fn(model, None, exp.train.labels[idx], idx)
    second = torch.autograd.grad(loss, list(gnet.parameters()), retain_graph=True, allow_unused=True)
    opt.zero_grad()
    loss.backward()
    for p, a, b in zip(gnet.parameters(), first, second):
        assert torch.allclose(p.grad, a + (b if b is not None else 0), atol=1e-6)  # the running sum
    assert "generator_grad" in hooks.state
    cleared = get_attack("inputaware").training(_cfg(pratio=0.25, generator_zero_grad=True), model, exp)
    _step(cleared, model, opt, exp, torch.arange(16))
    assert all(p.grad is None for p in cleared.state["generator"].parameters())


def test_default_config_is_the_originals_classifier_schedule():
    from utils.victim.experiment import parse_attack_config

    for proto in ("cifar10", "fmnist"):
        cfg = parse_attack_config("inputaware", ["--yaml_path", f"config/attack/prototype/{proto}.yaml"])
        assert cfg["lr"] == 0.01 and cfg["lr_scheduler"] == "none"
        assert (cfg["net_width"], cfg["net_depth"], cfg["net_norm"], cfg["augment_order"]) == (32, 3, "batch", "pre")
        assert not cfg["generator_zero_grad"]
    with pytest.raises(UserError, match="net_depth"):
        ia.inputaware_build(_cfg(net_depth=3), SimpleNamespace(**{**vars(dataset_info("fmnist")), "image_size": 6}))


def test_cpu_recipe_loads_and_differs_from_the_default_only_where_documented():
    from utils.victim.experiment import parse_attack_config

    base = ["--yaml_path", "config/attack/prototype/fmnist.yaml"]
    default = parse_attack_config("inputaware", base)
    cpu = parse_attack_config("inputaware", base + ["--bd_yaml_path", "config/attack/inputaware/fmnist_cpu.yaml"])
    differ = {k for k in default if default[k] != cpu[k]}
    assert differ == {"mask_epochs", "net_width", "net_depth", "lr", "lr_scheduler", "bd_yaml_path"}
    assert (cpu["net_width"], cpu["net_depth"], cpu["lr"], cpu["lr_scheduler"]) == (16, 2, 0.05, "cosine")
