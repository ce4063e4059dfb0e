"""LC (label-consistent): corner trigger, the adversarially trained (or standard) surrogate, PGD
images against it, the `lc_pgd` cache, the index-aware training trigger, and an end-to-end run
followed by fine-tuning."""
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
from utils.attacks.lc import corner_pattern
from utils.attacks.poison import choose_poison_indices, poison_train_set
from utils.record.store import load_record
from utils.record.resources import RESOURCE_FILE
from utils.attacks.surrogate import adversarial_training_loss, get_surrogate

SPEC = get_attack("lc")


def _ctx(data_root, tmp_path, *extra, pratio=0.05):
    """The PrepareContext `prepare_experiment` would hand LC for a tiny run (1-epoch surrogate at
    lr 0.01, which learns the tiny sets, adversarially trained with 3-step PGD by default; 3 PGD
    steps for the images), with the resource cache under `tmp_path`."""
    argv = attack_argv(data_root, tmp_path, "--pratio", str(pratio), "--surrogate_epochs", "1", "--lc_steps", "3",
                       "--surrogate_at_steps", "3", "--lr", "0.01", "--resource_root", str(tmp_path / "res"), *extra)
    cfg = victim.parse_attack_config("lc", argv)
    info = victim.validate_config(cfg)
    train = load_dataset(info.name, cfg["dataset_path"], train=True)
    test = load_dataset(info.name, cfg["dataset_path"], train=False)
    params = SPEC.build(cfg, info)
    poison = choose_poison_indices(train.labels, cfg["pratio"], cfg["random_seed"], cfg["attack_target"], True)
    device = torch.device("cpu")
    return PrepareContext(cfg, info, train, test, None, poison, params, device,
                          engine.amp_dtype(cfg["amp"], device), False, cfg["resource_root"])


# The original all-corners trigger at 32 px, read off its annotation list: rows 0-2 and 29-31,
# columns 0-2 | 29-31. Not a regular checkerboard: (0, 2), (0, 29), (29, 2), (29, 29) are "-".
OFFICIAL_CORNERS_32 = {
    0: "+-- --+", 1: "-+- -+-", 2: "+-+ +-+",
    29: "+-- --+", 30: "-+- -+-", 31: "+-+ +-+",
}


def _official_grid_32() -> torch.Tensor:
    grid = torch.zeros(32, 32)
    for row, text in OFFICIAL_CORNERS_32.items():
        left, right = text.split()
        for col, ch in zip([0, 1, 2, 29, 30, 31], left + right):
            grid[row, col] = 1.0 if ch == "+" else -1.0
    return grid


def test_corner_pattern_has_the_official_signs_at_32_px():
    p = corner_pattern(3, 32, 255.0)
    assert p.shape == (3, 32, 32) and torch.equal(p, p[:1].expand_as(p))  # the same in every channel
    assert torch.equal(p[0], _official_grid_32() * 255.0)  # all 36 signs, zero elsewhere
    for row, col in [(0, 2), (0, 29), (29, 2), (29, 29)]:  # where a mirrored checkerboard would be +
        assert float(p[0, row, col]) == -255.0
    assert torch.equal(corner_pattern(1, 32, 32.0), p[:1] * 32.0 / 255.0)  # reduced amplitude


@pytest.mark.parametrize("size", [28, 64, 40])
def test_corner_pattern_at_other_sizes_samples_the_32_px_grid_at_its_nearest_pixel(size):
    grid = _official_grid_32()
    # nearest-neighbour resizing takes source pixel floor(i * 32 / size) for output pixel i
    src = [i * 32 // size for i in range(size)]
    expected = torch.tensor([[float(grid[r, c]) for c in src] for r in src]) * 255.0
    p = corner_pattern(1, size, 255.0)
    assert torch.equal(p[0], expected)
    if size == 28:  # source rows/columns 0-2 and 29-30 survive, 31 is never sampled
        assert int((p[0] != 0).sum()) == 9 + 6 + 6 + 4
        assert torch.equal(p[0, :3, :3], grid[:3, :3] * 255.0)
        assert torch.equal(p[0, 26:, 26:], grid[29:31, 29:31] * 255.0)
    if size == 64:  # every pixel doubled
        assert torch.equal(p[0], (grid * 255.0).repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_corner_trigger_keeps_dtype_range_and_adds_with_clipping():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=gen, dtype=torch.uint8)
    info = _info(3, 32)
    params = SPEC.build({"reduced_amplitude": 0.25, "lc_eps": 8.0, "lc_step": 1.5, "lc_steps": 1}, info)
    out = SPEC.apply(images, params, False)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    expected = (images.float() + corner_pattern(3, 32, 0.25 * 255)).round().clamp(0, 255)
    assert torch.equal(out.float(), expected)
    changed = (out != images).any(0).any(0)
    assert not changed[3:-3, :].any() and not changed[:, 3:-3].any()  # corners only
    full = SPEC.apply(images, SPEC.build({"reduced_amplitude": 1.0, "lc_eps": 8.0, "lc_step": 1.5, "lc_steps": 1},
                                         info), True)
    assert set(full[:, :, 0, 0].unique().tolist()) == {255} and set(full[:, :, 0, 1].unique().tolist()) == {0}


@pytest.mark.parametrize("key,value", [("reduced_amplitude", 0.0), ("reduced_amplitude", 1.5), ("lc_eps", -1.0),
                                       ("lc_steps", -1), ("lc_step", 0.0)])
def test_bad_options_are_user_errors(key, value):
    cfg = {"reduced_amplitude": 1.0, "lc_eps": 8.0, "lc_step": 1.5, "lc_steps": 10, key: value}
    with pytest.raises(UserError, match=key):
        SPEC.build(cfg, _info(1, 28))


def test_training_trigger_uses_the_stored_pgd_image_and_test_trigger_is_corner_only():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(20, 236, (10, 1, 28, 28), generator=gen, dtype=torch.uint8)
    adv = (clean.int() + torch.randint(-8, 9, clean.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    params = {"pattern": corner_pattern(1, 28, 255.0), "adv_indices": torch.tensor([2, 5, 7]), "adv_images": adv[[2, 5, 7]]}
    train = SPEC.train_apply(clean[[5, 2]], torch.tensor([5, 2]), params)
    assert torch.equal(train, SPEC.apply(adv[[5, 2]], params, True))  # the PGD image of each index + corners
    test = SPEC.apply(clean[[5, 2]], params, False)
    assert torch.equal(test[:, :, 5:-5, 5:-5], clean[[5, 2]][:, :, 5:-5, 5:-5])  # no adversarial part at test time
    assert not torch.equal(train, test)
    with pytest.raises(UserError, match="index 3"):
        SPEC.train_apply(clean[[3]], torch.tensor([3]), params)


def test_lc_changes_only_target_class_images_and_keeps_labels(tiny_fmnist, tmp_path):
    ctx = _ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist", "--attack_target", "3", pratio=0.06)
    params = {**ctx.params, **SPEC.prepare(ctx)}
    labels = ctx.train.labels
    assert len(ctx.poison_indices) == 12 and bool((labels[ctx.poison_indices] == 3).all())
    trigger = lambda x: SPEC.train_apply(x, ctx.poison_indices, params)  # noqa: E731
    out = poison_train_set(ctx.train.images, labels, ctx.poison_indices, trigger, 3, "all2one", 10, clean_label=True)
    assert torch.equal(out.labels, labels)
    changed = (out.images != ctx.train.images).flatten(1).any(1)
    assert torch.equal(changed.nonzero().flatten(), ctx.poison_indices)
    # only the poisoned images' PGD versions go into the record's params
    assert torch.equal(params["adv_indices"], ctx.poison_indices) and len(params["adv_images"]) == 12
    info = params["info"]
    assert "smallcnn" in info["surrogate"] and info["target_images"] == int((labels == 3).sum())


def test_pgd_stays_within_eps_and_lowers_the_surrogates_accuracy(tiny_cifar10, tmp_path):
    ctx = _ctx(tiny_cifar10, tmp_path, "--surrogate_epochs", "2")
    surrogate = get_surrogate(ctx)
    images, labels = ctx.test.images[:60], ctx.test.labels[:60]
    clean_acc = (adversarial.surrogate_predict(surrogate, images, ctx.device) == labels).float().mean()
    # the tiny classes differ by their colour, so fooling takes a larger ball than 8/255
    adv = adversarial.pgd_untargeted(surrogate, images, labels, eps=24.5, step=6.0, steps=6)
    assert adv.dtype == torch.uint8 and adv.shape == images.shape
    assert int((adv.int() - images.int()).abs().max()) <= 24  # rounding stays inside the eps-ball
    adv_acc = (adversarial.surrogate_predict(surrogate, adv, ctx.device) == labels).float().mean()
    assert clean_acc >= 0.5 and adv_acc < clean_acc - 0.2, (clean_acc, adv_acc)
    assert torch.equal(adv, adversarial.pgd_untargeted(surrogate, images, labels, 24.5, 6.0, 6))  # deterministic


def test_pgd_cache_is_reused_across_pratios_and_keyed_by_seed_and_eps(tiny_cifar10, tmp_path, capsys):
    first = SPEC.prepare(_ctx(tiny_cifar10, tmp_path))
    out = capsys.readouterr().out
    assert "lc_pgd: building" in out
    folders = list((tmp_path / "res" / "lc_pgd").iterdir())
    assert len(folders) == 1
    mtime = (folders[0] / RESOURCE_FILE).stat().st_mtime_ns
    second = SPEC.prepare(_ctx(tiny_cifar10, tmp_path, pratio=0.08))  # another pratio: same PGD images
    out = capsys.readouterr().out
    assert "lc_pgd: using the cache" in out and "lc_pgd: building" not in out
    assert (folders[0] / RESOURCE_FILE).stat().st_mtime_ns == mtime
    common = torch.isin(second["adv_indices"], first["adv_indices"])
    assert common.any()
    pos = torch.searchsorted(first["adv_indices"], second["adv_indices"][common])
    assert torch.equal(second["adv_images"][common], first["adv_images"][pos])
    assert first["info"]["surrogate_acc_adv"] == second["info"]["surrogate_acc_adv"]
    SPEC.prepare(_ctx(tiny_cifar10, tmp_path, "--random_seed", "1"))
    SPEC.prepare(_ctx(tiny_cifar10, tmp_path, "--lc_eps", "4"))
    assert len(list((tmp_path / "res" / "lc_pgd").iterdir())) == 3
    capsys.readouterr()
    # a damaged cache is noticed and rebuilt
    data = folders[0] / RESOURCE_FILE
    flip_middle_byte(data)
    again = SPEC.prepare(_ctx(tiny_cifar10, tmp_path))
    captured = capsys.readouterr()
    assert "checksum" in captured.err and "lc_pgd: building" in captured.out
    assert torch.equal(again["adv_images"], first["adv_images"])  # same seed, same result


def test_surrogate_record_is_used_and_must_match_the_dataset(badnet_record, tiny_cifar10, tiny_fmnist, tmp_path):
    ctx = _ctx(tiny_cifar10, tmp_path, "--surrogate_record", str(badnet_record))
    surrogate = get_surrogate(ctx)
    record = load_record(badnet_record)
    assert surrogate.identity["surrogate"] == "record" and str(badnet_record) in surrogate.description
    x = surrogate.pipeline.eval_batch(ctx.test.images[:4])
    net = victim.build_model_for("smallcnn", ctx.info, 32)
    net.load_state_dict(record["model"])
    assert torch.allclose(surrogate.model(x), net.eval()(x), atol=1e-5)
    params = SPEC.prepare(ctx)
    assert str(badnet_record) in params["info"]["surrogate"]
    assert not (tmp_path / "res" / "surrogate").exists()  # nothing was trained
    with pytest.raises(UserError, match="is for cifar10"):
        SPEC.prepare(_ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist", "--surrogate_record", str(badnet_record)))


def test_lc_defaults_are_the_originals_adversarial_surrogate_and_pgd(tmp_path):
    cfg = victim.parse_attack_config("lc", ["--yaml_path", "config/attack/prototype/cifar10.yaml"])
    assert cfg["lc_surrogate"] == "adversarial"
    assert (cfg["lc_eps"], cfg["lc_step"], cfg["lc_steps"]) == (8.0, 1.5, 100)
    assert (cfg["surrogate_at_eps"], cfg["surrogate_at_step"], cfg["surrogate_at_steps"]) == (8.0, 2.0, 10)
    assert cfg["surrogate_at_random_start"] is True and cfg["surrogate_train_size"] == 0
    with pytest.raises(UserError, match="lc_surrogate"):
        victim.parse_attack_config("lc", ["--lc_surrogate", "robust"])


def _pgd_by_hand(model, x, y, eps, step, steps, start):
    """Independent PGD for the checks below: mean loss (its gradient's sign is the summed one's)."""
    xa = start.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
        xa = xa.detach() + step * g.sign()
        xa = torch.min(torch.max(xa, x - eps), x + eps).clamp(0, 1)
    return xa.detach()


def test_adversarial_training_loss_is_the_loss_on_pgd_examples():
    torch.manual_seed(0)
    model = victim.build_model_for("smallcnn", _info(1, 28), 28).train()
    x = torch.rand(16, 1, 28, 28)
    y = torch.arange(16) % 10
    eps, step = 8 / 255, 2 / 255
    clean = F.cross_entropy(model(x), y)
    loss, logits = adversarial_training_loss(eps, step, 4, False)(model, x, y, torch.arange(16))
    x_adv = _pgd_by_hand(model, x, y, eps, step, 4, x)
    assert torch.allclose(loss, F.cross_entropy(model(x_adv), y), atol=1e-5)
    assert torch.allclose(logits, model(x_adv), atol=1e-5)
    assert loss.item() > clean.item() + 0.01  # skipping the attack would give the clean loss
    assert torch.allclose(adversarial_training_loss(eps, step, 0, False)(model, x, y, None)[0], clean, atol=1e-6)
    # random start: uniform in the eps-ball from the given generator, clipped to [0, 1]
    loss_rs, _ = adversarial_training_loss(eps, step, 4, True, torch.Generator().manual_seed(5))(model, x, y, None)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(5))
    start = (x + (2 * noise - 1) * eps).clamp(0, 1)
    assert torch.allclose(loss_rs, F.cross_entropy(model(_pgd_by_hand(model, x, y, eps, step, 4, start)), y), atol=1e-5)
    assert not torch.allclose(loss_rs, loss)


def test_adversarial_surrogate_attacks_every_training_batch_in_train_mode(tiny_fmnist, tmp_path, monkeypatch):
    calls = []
    real = adversarial.linf_pgd

    def spy(forward, x0, labels, eps, step, steps, high, start=None):
        if isinstance(forward, torch.nn.Module):  # training batches (the robust evaluation passes a closure)
            calls.append((forward.training, len(labels), eps, step, steps, high, start is not None,
                          float(x0.min()), float(x0.max())))
        return real(forward, x0, labels, eps, step, steps, high, start)
    monkeypatch.setattr(adversarial, "linf_pgd", spy)
    ctx = _ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist", "--surrogate_epochs", "2", "--batch_size", "64")
    sur = get_surrogate(ctx, adversarial=True)
    batches = -(-len(ctx.train.labels) // 64)
    assert len(calls) == 2 * batches  # every batch of every epoch
    assert all(c[0] for c in calls)  # against the model in training mode
    assert {c[2:7] for c in calls} == {(8 / 255, 2 / 255, 3, 1.0, True)}
    assert min(c[7] for c in calls) >= 0.0 and max(c[8] for c in calls) <= 1.0  # unnormalised input
    assert sur.identity["surrogate"] == "adversarial" and "adversarially trained" in sur.description
    assert torch.equal(sur.pipeline.mean, torch.zeros_like(sur.pipeline.mean))
    assert torch.equal(sur.pipeline.std, torch.ones_like(sur.pipeline.std))
    # the images are crafted on [0, 1] input: surrogate_logits of pixels x is the model on x / 255
    img = ctx.test.images[:4].float()
    assert torch.allclose(adversarial.surrogate_logits(sur, img), sur.model(img / 255.0), atol=1e-5)


def test_surrogate_cache_keys_separate_standard_and_adversarial(tiny_fmnist, tmp_path, capsys):
    ctx = _ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist")
    standard = get_surrogate(ctx)
    adv = get_surrogate(ctx, adversarial=True)
    assert "adversarial_training" not in standard.identity  # the standard key (and its caches) as before
    assert adv.identity["adversarial_training"]["steps"] == 3 and adv.identity["weights"] != standard.identity["weights"]
    assert len(list((tmp_path / "res" / "surrogate").iterdir())) == 2
    capsys.readouterr()
    again = get_surrogate(ctx, adversarial=True)
    assert "surrogate: using the cache" in capsys.readouterr().out and again.identity == adv.identity
    get_surrogate(_ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist", "--surrogate_at_steps", "2"), adversarial=True)
    sub = get_surrogate(_ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist", "--surrogate_train_size", "50"),
                        adversarial=True)
    assert sub.identity["adversarial_training"]["train_images"] == 50 and "on 50 images" in sub.description
    assert len(list((tmp_path / "res" / "surrogate").iterdir())) == 4
    for flag, value in [("--surrogate_train_size", "-1"), ("--surrogate_at_steps", "-1"), ("--surrogate_at_eps", "300")]:
        with pytest.raises(UserError, match=flag[2:]):
            get_surrogate(_ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist", flag, value), adversarial=True)


def test_lc_images_come_from_the_chosen_surrogate_and_a_cache_hit_reproduces_them(tiny_fmnist, tmp_path, capsys):
    adv = SPEC.prepare(_ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist"))
    assert "adversarially trained" in adv["info"]["surrogate"]
    standard = SPEC.prepare(_ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist", "--lc_surrogate", "standard"))
    assert "clean smallcnn" in standard["info"]["surrogate"]
    assert torch.equal(adv["adv_indices"], standard["adv_indices"]) and not torch.equal(adv["adv_images"],
                                                                                          standard["adv_images"])
    assert len(list((tmp_path / "res" / "lc_pgd").iterdir())) == 2
    capsys.readouterr()
    again = SPEC.prepare(_ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist"))
    out = capsys.readouterr().out
    assert "surrogate: using the cache" in out and "lc_pgd: using the cache" in out and "building" not in out
    assert torch.equal(again["adv_images"], adv["adv_images"])
    # without the PGD cache, the cached surrogate gives the same images again
    adv_folder = next(f for f in (tmp_path / "res" / "lc_pgd").iterdir()
                      if json.loads((f / "meta.json").read_text())["key"]["surrogate"]["surrogate"] == "adversarial")
    (adv_folder / RESOURCE_FILE).unlink()
    rebuilt = SPEC.prepare(_ctx(tiny_fmnist, tmp_path, "--dataset", "fmnist"))
    assert "lc_pgd: building" in capsys.readouterr().out
    assert torch.equal(rebuilt["adv_images"], adv["adv_images"])


def test_lc_runs_end_to_end_and_fine_tunes(tiny_cifar10, tmp_path):
    argv = attack_argv(tiny_cifar10, tmp_path, "--pratio", "0.05", "--surrogate_epochs", "1", "--lc_steps", "3",
                       "--surrogate_at_steps", "2", "--resource_root", str(tmp_path / "res"))
    run = subprocess.run([sys.executable, "attack/lc.py", *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "lc_pgd: building" in run.stdout and "adversarial surrogate epoch 1" in run.stdout
    folder = next(tmp_path.glob("cifar10/lc/*/"))
    record = load_record(folder)
    assert record["attack"] == "lc" and record["clean_label"]
    trig = record["trigger"]
    assert torch.equal(trig["adv_indices"], record["poison_indices"]) and len(trig["adv_images"]) == 15
    summary = json.loads((folder / "summary.json").read_text())
    assert {"surrogate", "surrogate_acc_clean", "surrogate_acc_adv"} <= set(summary["attack_info"])
    # the record alone rebuilds the poisoned training set, with the PGD images
    exp = victim.rebuild_experiment(record, str(tiny_cifar10), torch.device("cpu"))
    idx = record["poison_indices"]
    assert torch.equal(exp.train.images[idx], SPEC.apply(trig["adv_images"], trig, True))
    ft = subprocess.run([sys.executable, "fine_tune/ft.py", "--attack", "lc", "--dataset", "cifar10", "--model", "smallcnn",
                         "--pratio", "0.05", "--epochs", "1", "--ft_mode", "fst", "--device", "cpu",
                         "--dataset_path", str(tiny_cifar10), "--record_root", str(tmp_path), "--progress", "false"],
                        cwd=REPO_ROOT, capture_output=True, text=True)
    assert ft.returncode == 0, ft.stderr


def _info(channels, size):
    from utils.data.datasets import DatasetInfo
    return DatasetInfo("x", 10, channels, size, (0.5,) * channels, (0.5,) * channels, False)
