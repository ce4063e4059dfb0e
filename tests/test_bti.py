"""Tests for utils.bti (BTI-DBF trigger inversion): the UNet's shapes and MSE projection, that
pre-training reconstructs, the feature mask's range and size, the generator's MSE bound, that the
model under test is left exactly as it was, determinism, and target detection.

One small run (smallcnn on 48 random CIFAR-sized images, a width-4 UNet, one or two epochs per
step) is shared by most tests through a module fixture.
"""
from __future__ import annotations

import copy

import pytest
import torch

import models
from utils import bti, engine
from utils.datasets import dataset_info
from utils.errors import UserError

NUM_CLASSES = 10
BOUND_TOL = 1e-4  # relative: the projection holds the bound up to float32 rounding


def _settings(**changes) -> bti.BTISettings:
    base = dict(pretrain_epochs=2, mask_epochs=3, gen_epochs=2, batch_size=16, width=4, seed=5, progress=False)
    base.update(changes)
    return bti.BTISettings(**base)


def _setup():
    """A smallcnn in train mode with one frozen layer, its pipeline, 48 images and labels."""
    device = torch.device("cpu")
    pipeline = engine.Pipeline.for_dataset(dataset_info("cifar10"), device)
    torch.manual_seed(0)
    model = engine.place_model(models.build_model("smallcnn", NUM_CLASSES, 3, 32), pipeline, device)
    model.train()
    model.trunk[0].weight.requires_grad_(False)  # a mixed pattern of flags, to be restored as it was
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(48) % NUM_CLASSES
    return model, pipeline, images, labels


def _run(model, pipeline, images, labels, settings):
    """The whole inversion: pre-training, mask, two generator rounds (the second continuing from
    the first), detection."""
    generator = bti.UNetGenerator(3, settings.width, seed=settings.seed)
    rows = bti.pretrain_generator(generator, images, pipeline, settings)
    mask = bti.learn_feature_mask(model, images, labels, pipeline, settings)
    stats1 = bti.train_generator(generator, model, mask, images, pipeline, settings)
    after_first = copy.deepcopy(generator.state_dict())
    stats2 = bti.train_generator(generator, model, mask, images, pipeline, settings)
    target, share = bti.detect_target(model, generator, images, pipeline, batch_size=20)
    return {"generator": generator, "rows": rows, "mask": mask, "stats1": stats1, "after_first": after_first,
            "stats2": stats2, "target": target, "share": share}


@pytest.fixture(scope="module")
def run():
    model, pipeline, images, labels = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    out = _run(model, pipeline, images, labels, _settings())
    out.update(model=model, pipeline=pipeline, images=images, labels=labels, before=before, flags=flags)
    return out


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 64), (3, 15), (1, 7), (3, 1)])
def test_unet_output_shape(channels, size):
    g = bti.UNetGenerator(channels, width=4)
    x = torch.randn(2, channels, size, size)
    out = g(x)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_unet_projection_bounds_every_image():
    g = bti.UNetGenerator(3, width=4)
    x = torch.randn(4, 3, 15, 15) * torch.tensor([0.1, 1.0, 10.0, 100.0]).view(4, 1, 1, 1)
    free = bti._image_mse(g(x), x)
    assert (free > 0.02).all()  # the untrained UNet changes the images by more than the bound below
    g.mse_bound.fill_(0.01)
    bounded = bti._image_mse(g(x), x)
    assert (bounded <= 0.01 * (1 + BOUND_TOL)).all()
    assert torch.allclose(bounded, torch.full_like(bounded, 0.01), rtol=1e-4)  # rescaled onto the bound
    assert "mse_bound" in g.state_dict()


def test_unet_init_is_seeded():
    a, b, c = bti.UNetGenerator(3, 4, seed=1), bti.UNetGenerator(3, 4, seed=1), bti.UNetGenerator(3, 4, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["out.weight"], sc["out.weight"])


def test_pretraining_lowers_reconstruction_error():
    _, pipeline, images, _ = _setup()
    g = bti.UNetGenerator(3, width=4, seed=0)
    x = pipeline.eval_batch(images)
    before = float(bti._image_mse(bti.synthesize(g, x), x).mean())
    rows = bti.pretrain_generator(g, images, pipeline, _settings(pretrain_epochs=3))
    after = float(bti._image_mse(bti.synthesize(g, x), x).mean())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["recon_mse"] < rows[0]["recon_mse"]
    assert after < 0.5 * before
    assert not g.training


def test_mask_range_and_size(run):
    mask = run["mask"]
    dim = models.get_head(run["model"]).in_features  # = model.features(x).shape[1]
    assert mask.shape == (dim,) and mask.dtype == torch.float32
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    assert float(mask.std()) > 0  # learnt, not left at its initial 0.5 everywhere


def test_generator_within_mse_bound(run):
    bound = _settings().mse_bound
    for stats in (run["stats1"], run["stats2"]):
        assert set(stats) >= {"benign_shift", "backdoor_shift", "mse"}
        assert 0 < stats["mse"] <= bound * (1 + BOUND_TOL)
        assert stats["max_mse"] <= bound * (1 + BOUND_TOL)
    x = run["pipeline"].eval_batch(run["images"])
    assert float(bti._image_mse(bti.synthesize(run["generator"], x), x).max()) <= bound * (1 + BOUND_TOL)


def test_second_round_continues_from_the_first(run):
    now = run["generator"].state_dict()
    assert any(not torch.equal(now[k], v) for k, v in run["after_first"].items())


def test_model_left_unchanged(run):
    model = run["model"]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in run["before"].items())  # weights and BN buffers
    assert [p.requires_grad for p in model.parameters()] == run["flags"]
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_detect_target_valid(run):
    assert 0 <= run["target"] < NUM_CLASSES
    assert 0 < run["share"] <= 1
    assert run["share"] * len(run["images"]) == pytest.approx(round(run["share"] * len(run["images"])))


def test_deterministic_with_seed(run):
    model, pipeline, images, labels = _setup()
    again = _run(model, pipeline, images, labels, _settings())
    assert torch.equal(again["mask"], run["mask"])
    assert again["rows"] == run["rows"] and again["stats2"] == run["stats2"]
    a, b = again["generator"].state_dict(), run["generator"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (again["target"], again["share"]) == (run["target"], run["share"])
    other = bti.learn_feature_mask(model, images, labels, pipeline, _settings(seed=6))
    assert not torch.equal(other, run["mask"])


def test_synthesize_keeps_mode_and_needs_no_grad(run):
    g = run["generator"]
    x = run["pipeline"].eval_batch(run["images"][:4])
    g.train()
    out = bti.synthesize(g, x)
    assert g.training and not out.requires_grad and out.shape == x.shape
    g.eval()
    assert torch.equal(bti.synthesize(g, x), out)  # GroupNorm: the same in either mode
    assert not g.training


def test_bf16_autocast_runs_within_bound():
    model, pipeline, images, labels = _setup()
    settings = _settings(pretrain_epochs=1, mask_epochs=1, gen_epochs=1)
    g = bti.UNetGenerator(3, settings.width)
    bti.pretrain_generator(g, images[:16], pipeline, settings, amp=torch.bfloat16)
    mask = bti.learn_feature_mask(model, images[:16], labels[:16], pipeline, settings, amp=torch.bfloat16)
    stats = bti.train_generator(g, model, mask, images[:16], pipeline, settings, amp=torch.bfloat16)
    assert stats["max_mse"] <= settings.mse_bound * (1 + BOUND_TOL)
    target, share = bti.detect_target(model, g, images[:16], pipeline, amp=torch.bfloat16)
    assert 0 <= target < NUM_CLASSES and 0 < share <= 1
    assert mask.dtype == torch.float32 and torch.isfinite(mask).all()


def test_user_errors(run):
    model, pipeline, images, labels = run["model"], run["pipeline"], run["images"], run["labels"]
    with pytest.raises(UserError, match="mask of shape"):
        bti.train_generator(bti.UNetGenerator(3, 4), model, torch.ones(7), images[:4], pipeline, _settings())
    with pytest.raises(UserError, match="labels"):
        bti.learn_feature_mask(model, images, labels[:5], pipeline, _settings())
    with pytest.raises(UserError, match="no images"):
        bti.pretrain_generator(bti.UNetGenerator(3, 4), images[:0], pipeline, _settings())
    with pytest.raises(UserError, match="mse_bound"):
        bti.pretrain_generator(bti.UNetGenerator(3, 4), images, pipeline, _settings(mse_bound=0.0))


def test_detect_target_on_badnet_record(badnet_record, tiny_cifar10):
    """The fixture's 1-epoch BadNet model (target 0). Caveat: that model is degenerate (C-Acc 0.10:
    it predicts class 0 for almost every input), so this checks the plumbing on a real record
    rather than the quality of the inversion."""
    from utils.record import load_record, load_state_dict_checked
    from utils.victim import build_model_for, rebuild_experiment

    record = load_record(badnet_record)
    device = torch.device("cpu")
    exp = rebuild_experiment(record, str(tiny_cifar10), device)
    model = build_model_for(record["model_name"], exp.info, exp.pipeline.input_size)
    load_state_dict_checked(model, record["model"], str(badnet_record))
    model = engine.place_model(model, exp.pipeline, device)
    images, labels = exp.clean_train.images[:64].to(device), exp.clean_train.labels[:64].to(device)
    settings = _settings(pretrain_epochs=1, mask_epochs=5, gen_epochs=1, batch_size=32)
    generator = bti.UNetGenerator(exp.info.channels, settings.width, seed=settings.seed)
    bti.pretrain_generator(generator, images, exp.pipeline, settings)
    mask = bti.learn_feature_mask(model, images, labels, exp.pipeline, settings)
    bti.train_generator(generator, model, mask, images, exp.pipeline, settings)
    target, share = bti.detect_target(model, generator, images, exp.pipeline)
    assert target == record["attack_target"] == 0
    assert share > 0.5
