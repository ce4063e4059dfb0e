"""SAM and PAM steps: where the gradient is taken, and that the weights come back exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from utils import engine
from utils.data.datasets import dataset_info
from utils.errors import UserError
from utils.defenses.purify import EXTRA_MODES, PurifySettings, get_mode, parse_modes, purify
from utils.defenses.sharpness import WeightShift, path_offsets, sam_offsets


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def _global_norm(ts) -> float:
    return float(torch.sqrt(sum((t ** 2).sum() for t in ts)))


def test_path_offsets_move_exactly_rho_towards_the_backdoored_weights():
    net, backdoored = _net(0), _net(1)
    params = list(net.parameters())
    anchor = [p.detach().clone() for p in backdoored.parameters()]
    theta = [p.detach().clone() for p in params]
    rho = 0.37
    shift = WeightShift(params)
    shift.apply(path_offsets(params, anchor, rho))
    moved = [p.detach() - t for p, t in zip(params, theta)]
    d = [a - t for a, t in zip(anchor, theta)]
    # the evaluation point is exactly rho away from theta ...
    assert abs(_global_norm(moved) - rho) < 1e-5
    # ... along the straight line to the backdoored weights (same direction in every tensor)
    flat_moved = torch.cat([m.flatten() for m in moved])
    flat_d = torch.cat([x.flatten() for x in d])
    assert float(F.cosine_similarity(flat_moved, flat_d, dim=0)) > 1 - 1e-6
    shift.restore()
    assert all(torch.equal(p.detach(), t) for p, t in zip(params, theta)), "weights not restored bit-exactly"


def test_path_offsets_are_zero_at_the_backdoored_weights():
    net = _net(0)
    params = list(net.parameters())
    offsets = path_offsets(params, [p.detach().clone() for p in params], 0.5)
    assert all(float(o.abs().max()) == 0.0 for o in offsets)


def test_sam_offsets_norm_and_adaptive_scaling():
    net = _net(0)
    params = list(net.parameters())
    grads = [torch.randn_like(p) for p in params]
    plain = sam_offsets(params, grads, 0.05, adaptive=False)
    assert abs(_global_norm(plain) - 0.05) < 1e-6
    assert float(F.cosine_similarity(torch.cat([o.flatten() for o in plain]), torch.cat([g.flatten() for g in grads]),
                                     dim=0)) > 1 - 1e-6
    adaptive = sam_offsets(params, grads, 2.0, adaptive=True)
    # ASAM: the offset divided by |theta| has norm rho (T^-1 eps = rho T g / |T g|)
    scaled = [o / p.detach().abs() for o, p in zip(adaptive, params)]
    assert abs(_global_norm(scaled) - 2.0) < 1e-3
    # a parameter without gradient does not move
    none_grad = sam_offsets(params, [None] + grads[1:], 0.05, adaptive=False)
    assert float(none_grad[0].abs().max()) == 0.0


def test_one_pam_step_uses_the_gradient_at_the_shifted_point_and_restores_theta():
    """A full step through train_epoch: the update equals -lr * grad L(theta + rho d/|d|), and with
    lr 0 the weights end bit-identical."""
    x = torch.randn(16, 12)
    y = torch.randint(0, 3, (16,))
    images = x.view(16, 1, 1, 12)
    rho = 0.5
    for lr in (0.0, 0.1):
        net, backdoored = _net(0), _net(1)
        params = list(net.parameters())
        anchor = [p.detach().clone() for p in backdoored.parameters()]
        theta = [p.detach().clone() for p in params]
        # the expected gradient, computed independently at the shifted point
        ref = _net(0)
        with torch.no_grad():
            for p, t, a in zip(ref.parameters(), theta, anchor):
                d = torch.cat([(aa - tt).flatten() for aa, tt in zip(anchor, theta)])
                p.copy_(t + rho * (a - t) / d.norm())
        F.cross_entropy(ref(x), y).backward()
        expected = [t - lr * p.grad for t, p in zip(theta, ref.parameters())]

        shift = WeightShift(params)

        def loss_fn(model, xb, yb, idx):
            shift.apply(path_offsets(params, anchor, rho))
            logits = model(xb)
            return F.cross_entropy(logits, yb), logits

        class _Identity:  # images are already floats: skip the uint8 scaling of the pipeline
            def eval_batch(self, b):
                return b

        opt = torch.optim.SGD(params, lr=lr, momentum=0.0)
        engine.train_epoch(net, images, y, _Identity(), opt, 16, torch.Generator().manual_seed(0), loss_fn,
                           augment=False, progress=False, before_step=shift.restore)
        for p, e in zip(params, expected):
            if lr == 0.0:
                assert torch.equal(p.detach(), e)
            else:
                assert torch.allclose(p.detach(), e, atol=1e-6)


def test_parse_modes_and_unknown_mode():
    assert parse_modes("all") == ["ft", "lp", "fe-tuning", "ft-init", "fst"]
    assert parse_modes("fst, ft-sam,pam,fst") == ["fst", "ft-sam", "pam"]
    with pytest.raises(UserError, match="unknown --ft_mode 'sam'"):
        parse_modes("fst,sam")
    assert {"ft-sam", "bti", "pam"} <= set(EXTRA_MODES) and not set(EXTRA_MODES) & {"ft", "lp", "fe-tuning", "ft-init", "fst"}


def _tiny_data(n=48, size=16):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    images = (labels.view(-1, 1, 1, 1) * 50 + torch.randint(0, 40, (n, 3, size, size), generator=g)).to(torch.uint8)
    return images, labels


def _pipeline(size=16):
    return engine.Pipeline.for_dataset(dataset_info("cifar10"), torch.device("cpu"), size, channels_last=False)


def test_ft_sam_trains_a_copy_and_differs_from_plain_ft():
    torch.manual_seed(0)
    model = models.build_model("smallcnn", 4, 3, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = _tiny_data()
    settings = PurifySettings(epochs=1, lr=0.05, alpha=0.0, batch_size=16, progress=False, norm_proj="none")
    evaluate = lambda net: {"clean_acc": 0.0, "asr": 0.0, "ra": 0.0}  # noqa: E731
    sam, rows = purify(model, get_mode("ft-sam"), images, labels, _pipeline(), settings, evaluate)
    ft, _ = purify(model, get_mode("ft"), images, labels, _pipeline(), settings, evaluate)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "input model changed"
    assert len(rows) == 1 and torch.isfinite(torch.tensor(rows[0]["train_loss"]))
    diffs = [float((a - b).detach().abs().max()) for a, b in zip(sam.parameters(), ft.parameters())]
    assert max(diffs) > 1e-6, "SAM steps gave the same weights as plain steps"
    moved = [float((a - b).detach().abs().max()) for a, b in zip(sam.parameters(), model.parameters())]
    assert max(moved) > 1e-6


def _bti_settings(**kw):
    from utils.defenses.bti import BTISettings
    base = dict(pretrain_epochs=0, mask_epochs=0, gen_epochs=0, unet_width=4, batch_size=48, seed=2, progress=False)
    base.update(kw)
    return BTISettings(**base)


def test_bti_unlearning_loss_is_ce_on_the_mixed_batch_plus_feature_map_mse():
    """BTI-DBF(U): CE(model(mixed), y) + MSE(f(clean), f(mixed)) on the last-stage feature maps,
    recomputed independently (every image replaced, one batch, no augmentation, lr ~ 0)."""
    import dataclasses
    from utils.defenses import bti

    torch.manual_seed(0)
    model = models.build_model("smallcnn", 4, 3, 16)
    images, labels = _tiny_data()
    pipeline = dataclasses.replace(_pipeline(), pad=0, flip=False)
    settings = PurifySettings(epochs=1, lr=1e-12, alpha=0.0, batch_size=48, rounds=1, unlearn_ratio=1.0,
                              progress=False, bti=_bti_settings())
    evaluate = lambda net: {"clean_acc": 0.0, "asr": 0.0, "ra": 0.0}  # noqa: E731
    _, rows = purify(model, get_mode("bti"), images, labels, pipeline, settings, evaluate)
    g = bti.UNetGenerator(3, 4, 4, seed=2)
    ref = models.build_model("smallcnn", 4, 3, 16)
    ref.load_state_dict(model.state_dict())
    ref.train()
    with torch.no_grad():
        x = pipeline.eval_batch(images)
        gx = g(x)
        expected = F.cross_entropy(ref(gx), labels) + F.mse_loss(ref.feature_maps(x), ref.feature_maps(gx))
    assert abs(rows[0]["train_loss"] - float(expected)) < 1e-4


@pytest.mark.parametrize("batch, ratio, replaced", [(10, 0.2, 3), (128, 0.2, 26), (64, 0.0, 0), (5, 1.0, 5)])
def test_unlearning_replaces_int_ratio_b_plus_one_random_images(monkeypatch, batch, ratio, replaced):
    """The official mixing: int(0.2 B + 1) images at random positions become generator outputs."""
    from utils.defenses import bti, purify as purify_mod

    images, labels = _tiny_data()
    settings = PurifySettings(epochs=1, lr=0.01, alpha=0.0, unlearn_ratio=ratio, progress=False, bti=_bti_settings())
    unlearning = purify_mod._Unlearning(models.build_model("smallcnn", 4, 3, 16), images, labels, _pipeline(),
                                        settings, None)
    monkeypatch.setattr(bti, "synthesize", lambda generator, x: torch.full_like(x, 99.0))
    x = torch.randn(batch, 3, 16, 16)
    out = unlearning.mix(x, torch.Generator().manual_seed(0))
    changed = (out == 99.0).flatten(1).all(1)
    assert int(changed.sum()) == replaced
    assert torch.equal(out[~changed], x[~changed])
    if 0 < replaced < batch:
        other = unlearning.mix(x, torch.Generator().manual_seed(1))
        assert not torch.equal((other == 99.0).flatten(1).all(1), changed)  # positions are random


def test_ft_sam_backdoorbench_preset_fills_its_settings_and_flags_win():
    from utils.commands import finetune

    def settle(*extra):
        args = finetune.parse_args(["--dataset", "cifar10", "--ft_mode", "ft-sam", *extra])
        return finetune.mode_args(args, "ft-sam")

    ours = settle()
    assert (ours.split_ratio, ours.epochs, ours.batch_size, ours.wd, ours.lb_smooth) == (0.02, 10, 128, 0.0, 0.1)
    bb = settle("--ft_sam_preset", "backdoorbench")
    assert (bb.split_ratio, bb.epochs, bb.batch_size, bb.lr, bb.momentum, bb.wd) == (0.05, 100, 256, 0.01, 0.9, 5e-4)
    assert bb.batch_cosine_tmax == 100
    # BackdoorBench's smoothing: 1 - 0.1 on the true class, 0.1 / 9 on each other one
    logits = torch.randn(5, 10)
    y = torch.arange(5)
    target = torch.full((5, 10), 0.1 / 9).scatter_(1, y[:, None], 0.9)
    torch.testing.assert_close(F.cross_entropy(logits, y, label_smoothing=bb.lb_smooth),
                               -(target * F.log_softmax(logits, 1)).sum(1).mean())
    assert settle("--ft_sam_preset", "backdoorbench", "--epochs", "7", "--wd", "0").epochs == 7
    assert settle("--ft_sam_preset", "backdoorbench", "--wd", "0").wd == 0.0
    fst = finetune.mode_args(finetune.parse_args(["--dataset", "cifar10", "--ft_sam_preset",
                                                                 "backdoorbench"]), "fst")
    assert (fst.batch_size, fst.wd, fst.batch_cosine_tmax) == (128, 0.0, 0)


def test_batch_cosine_schedule_steps_per_batch():
    torch.manual_seed(0)
    model = models.build_model("smallcnn", 4, 3, 16)
    images, labels = _tiny_data()  # 48 images, batches of 16: three steps per epoch
    settings = PurifySettings(epochs=3, lr=0.01, alpha=0.0, batch_size=16, progress=False, norm_proj="none",
                              batch_cosine_tmax=3, weight_decay=5e-4)
    evaluate = lambda net: {"clean_acc": 0.0, "asr": 0.0, "ra": 0.0}  # noqa: E731
    _, rows = purify(model, get_mode("ft-sam"), images, labels, _pipeline(), settings, evaluate)
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == 0.01 and lrs[1] < 1e-9 and abs(lrs[2] - 0.01) < 1e-9  # period 2 * T_max, as torch's cosine
