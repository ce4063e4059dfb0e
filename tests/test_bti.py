"""Tests for utils.defenses.bti (BTI-DBF trigger inversion as the official PAM code runs it): the UNet's
design, the pre-training and generator objectives against independent re-computations of the
official formulas, the feature-map mask, round handling (generator every round or first only,
target CE from round 2), that the model under test is left as it was, determinism, and target
detection on a real record.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from utils.defenses import bti
from utils import engine
from utils.data.datasets import dataset_info
from utils.errors import UserError

NUM_CLASSES = 10


def _settings(**changes) -> bti.BTISettings:
    base = dict(pretrain_epochs=1, mask_epochs=2, gen_epochs=1, batch_size=16, unet_width=4, seed=5, progress=False)
    base.update(changes)
    return bti.BTISettings(**base)


def _setup(size: int = 32):
    """A smallcnn in train mode with one frozen layer, its pipeline, 48 images and labels."""
    device = torch.device("cpu")
    pipeline = engine.Pipeline.for_dataset(dataset_info("cifar10"), device, size)
    torch.manual_seed(0)
    model = engine.place_model(models.build_model("smallcnn", NUM_CLASSES, 3, size), pipeline, device)
    model.train()
    model.trunk[0].weight.requires_grad_(False)  # a mixed pattern of flags, to be restored as it was
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (48, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.arange(48) % NUM_CLASSES
    return model, pipeline, images, labels


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the generator ------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28), (3, 8), (3, 40)])
def test_unet_output_shape_for_any_size(channels, size):
    g = bti.UNetGenerator(channels, width=4, blocks=4)
    x = torch.randn(2, channels, size, size)
    assert g(x).shape == x.shape
    assert g.padded_side(size) % 16 == 0 and g.padded_side(size) >= max(32, size)


def test_unet_has_the_official_design():
    """32 base filters, 4 levels (32/64/128/256), a 512-wide bottleneck, InstanceNorm with affine
    parameters, transposed-convolution up-sampling, a 1x1 output, no normalisation layer with
    running statistics, and no residual path (at initialisation G(x) is far from x)."""
    g = bti.UNetGenerator(3)
    assert [b.conv2.out_channels for b in g.down] == [32, 64, 128, 256]
    assert g.bottleneck.conv2.out_channels == 512
    assert [b.block.conv2.out_channels for b in g.up] == [256, 128, 64, 32]
    assert all(isinstance(b.up, nn.ConvTranspose2d) and b.up.stride == (2, 2) for b in g.up)
    norms = [m for m in g.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
    assert len(norms) == 2 * 9 and all(n.affine and not n.track_running_stats for n in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in g.modules())
    assert g.out.kernel_size == (1, 1) and g.out.out_channels == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert F.mse_loss(g(x), x) > 0.5


def test_unet_init_is_seeded():
    a, b, c = bti.UNetGenerator(3, 4, seed=1), bti.UNetGenerator(3, 4, seed=1), bti.UNetGenerator(3, 4, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


# --- the objectives against the official formulas -----------------------------------------------

def test_pretrain_loss_is_the_official_objective():
    """soft-target CE whose 'logits' are the clean softmax, + feature-map MSE, + 100 or 0.01 times the
    image MSE depending on whether it exceeds 0.1; recomputed here with torch's own losses."""
    model, pipeline, images, _ = _setup()
    model.eval()
    g = bti.UNetGenerator(3, 4, seed=0)
    for scale in (1.0, 1e-3):  # a raw UNet on normal images (image MSE >> 0.1), then tiny images and output
        x = pipeline.eval_batch(images[:8]) * (1.0 if scale == 1.0 else 0.05)
        with torch.no_grad():
            g.out.weight.mul_(scale)
            g.out.bias.mul_(scale)
        loss, *_ = bti.pretrain_loss(g, model, x)
        with torch.no_grad():
            gx = g(x)
            clean_out, pur_out = model(x), model(gx)
            pred = nn.CrossEntropyLoss()(F.softmax(clean_out, 1), F.softmax(pur_out, 1))
            feat = nn.MSELoss()(model.feature_maps(x), model.feature_maps(gx))
            norm = nn.MSELoss()(x, gx)
            expected = pred + feat + (100 if norm > 0.1 else 0.01) * norm
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert float(norm) < 0.1  # both branches were exercised


def test_generator_objective_switches_and_adds_the_target_ce():
    s = _settings()
    logits = torch.randn(4, NUM_CLASSES)
    norm, benign, backdoor = torch.tensor(0.5), torch.tensor(1.0), torch.tensor(2.0)
    loss, over = bti.generator_objective(norm, benign, backdoor, logits, s)
    assert over and float(loss) == 0.5  # image MSE over 0.3: only shrink the change
    loss, over = bti.generator_objective(torch.tensor(0.1), torch.tensor(4.0), backdoor, logits, s)
    assert over and abs(float(loss) - 0.1) < 1e-7  # benign-feature MSE over 3
    loss, over = bti.generator_objective(torch.tensor(0.1), benign, backdoor, logits, s)
    assert not over and abs(float(loss) - (-2.0 + 0.01 * 1.0)) < 1e-6
    loss, _ = bti.generator_objective(torch.tensor(0.1), benign, backdoor, logits, s, target=3)
    ce = F.cross_entropy(logits, torch.full((4,), 3))
    assert abs(float(loss) - (-2.0 + 0.01 + float(ce))) < 1e-5


def test_generator_losses_are_batch_mean_squared_errors_on_masked_feature_maps():
    model, pipeline, images, _ = _setup()
    model.eval()
    x = pipeline.eval_batch(images[:6])
    gx = x + 0.1 * torch.randn_like(x)
    maps = model.feature_maps(x)
    mask = torch.rand(1, *maps.shape[1:])
    norm, benign, backdoor, logits = bti.generator_losses(model, mask, x, gx, None)
    with torch.no_grad():
        f0, f1 = model.feature_maps(x), model.feature_maps(gx)
        torch.testing.assert_close(norm, ((x - gx) ** 2).mean())
        torch.testing.assert_close(benign, ((mask * f0 - mask * f1) ** 2).mean())
        torch.testing.assert_close(backdoor, (((1 - mask) * f0 - (1 - mask) * f1) ** 2).mean())
        torch.testing.assert_close(logits, model(gx))


def test_pretraining_lowers_the_objective_and_leaves_the_model_alone():
    model, pipeline, images, _ = _setup()
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    g = bti.UNetGenerator(3, 4, seed=0)
    rows = bti.pretrain_generator(g, model, images, pipeline, _settings(pretrain_epochs=4, batch_size=12))
    assert len(rows) == 4
    assert rows[-1]["recon_mse"] < rows[0]["recon_mse"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training


# --- mask, rounds, detection ----------------------------------------------------------------------

def test_mask_covers_the_feature_maps_and_runs_the_copy_in_train_mode():
    model, pipeline, images, labels = _setup()
    inv = copy.deepcopy(model)
    bn = next(m for m in inv.modules() if isinstance(m, nn.BatchNorm2d))
    stats_before = bn.running_mean.clone()
    mask = bti.learn_feature_mask(inv, images, labels, pipeline, _settings())
    model.eval()
    with torch.no_grad():
        shape = model.feature_maps(pipeline.eval_batch(images[:1])).shape
    assert mask.shape == (1, *shape[1:])
    assert float(mask.min()) > 0 and float(mask.max()) < 1
    # train mode, as officially: the copy's BatchNorm statistics followed the clean batches
    assert not torch.equal(bn.running_mean, stats_before)
    torch.testing.assert_close(bti.mask_from_params(torch.tensor([0.0, 50.0, -50.0])),
                               torch.tensor([0.5, 1 / (2 + 1e-7) + 0.5, -1 / (2 + 1e-7) + 0.5]))


@pytest.mark.parametrize("rounds_mode", ["all", "first"])
def test_inverter_rounds(rounds_mode):
    """Round 1 trains G; later rounds train it again only with generator_rounds 'all'; the target
    found after round 1 is kept; the model under test is never changed."""
    model, pipeline, images, labels = _setup()
    before = _state(model)
    settings = _settings(generator_rounds=rounds_mode)
    inv = bti.Inverter(model, images, labels, pipeline, settings)
    pretrained = _state(inv.generator)
    first = inv.invert(model, 1)
    after_first = _state(inv.generator)
    second = inv.invert(model, 2)
    after_second = _state(inv.generator)
    assert first["generator_trained"] and not all(torch.equal(pretrained[k], after_first[k]) for k in pretrained)
    assert second["generator_trained"] == (rounds_mode == "all")
    same = all(torch.equal(after_first[k], after_second[k]) for k in after_first)
    assert same == (rounds_mode == "first")
    assert inv.target == first["detected_target"]
    assert 0 <= second["detected_target"] < NUM_CLASSES and 0 < second["target_share"] <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_second_round_pulls_the_generator_towards_the_detected_target(monkeypatch):
    model, pipeline, images, labels = _setup()
    seen = []
    real = bti.train_generator

    def spy(*args, **kwargs):
        seen.append(kwargs.get("target"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bti, "train_generator", spy)
    inv = bti.Inverter(model, images, labels, pipeline, _settings())
    inv.invert(model, 1)
    inv.invert(model, 2)
    assert seen == [None, inv.target]


def test_inversion_is_deterministic_with_a_seed():
    model, pipeline, images, labels = _setup()

    def run(seed):
        inv = bti.Inverter(model, images, labels, pipeline, _settings(seed=seed))
        found = inv.invert(model, 1)
        return _state(inv.generator), found

    (a, fa), (b, fb), (c, _) = run(3), run(3), run(4)
    assert all(torch.equal(a[k], b[k]) for k in a) and fa == fb
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_detect_target_uses_noisy_inputs():
    """With a generator that passes its input through, detection sees x + noise: a large noise
    level changes the predictions of a model that is sensitive to it."""
    model, pipeline, images, _ = _setup()

    class Passthrough(nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return x + 0 * self.anchor

    quiet = bti.detect_target(model, Passthrough(), images, pipeline, _settings(detect_noise=0.0))
    loud = bti.detect_target(model, Passthrough(), images, pipeline, _settings(detect_noise=50.0))
    assert quiet != loud
    assert bti.detect_target(model, Passthrough(), images, pipeline, _settings()) == \
        bti.detect_target(model, Passthrough(), images, pipeline, _settings())


def test_user_errors():
    model, pipeline, images, labels = _setup()
    with pytest.raises(UserError, match="labels"):
        bti.learn_feature_mask(model, images, labels[:5], pipeline, _settings())
    with pytest.raises(UserError, match="no images"):
        bti.pretrain_generator(bti.UNetGenerator(3, 4), model, images[:0], pipeline, _settings())
    with pytest.raises(UserError, match="norm_bound"):
        _settings(norm_bound=0.0).validate()
    with pytest.raises(UserError, match="generator_rounds"):
        _settings(generator_rounds="second").validate()


def test_inversion_on_a_badnet_record(badnet_record, tiny_cifar10):
    """The fixture's 1-epoch BadNet model runs through a whole round. That model is degenerate (one
    class for almost every clean input) and a one-epoch UNet is far from the identity, so this checks
    the plumbing on a real record (grey or colour sizes, a real pipeline), not the quality of the
    inversion, which the Fashion-MNIST measurement in docs/ reports."""
    from utils.record.store import load_record, load_state_dict_checked
    from utils.victim.experiment import build_model_for, rebuild_experiment

    record = load_record(badnet_record)
    device = torch.device("cpu")
    exp = rebuild_experiment(record, str(tiny_cifar10), device)
    model = build_model_for(record["model_name"], exp.info, exp.pipeline.input_size)
    load_state_dict_checked(model, record["model"], str(badnet_record))
    model = engine.place_model(model, exp.pipeline, device)
    images, labels = exp.clean_train.images[:64].to(device), exp.clean_train.labels[:64].to(device)
    inv = bti.Inverter(model, images, labels, exp.pipeline, _settings(mask_epochs=3, batch_size=32))
    found = inv.invert(model, 1)
    assert found["generator_trained"] and inv.target == found["detected_target"]
    assert 0 <= found["detected_target"] < exp.info.num_classes and 0 < found["target_share"] <= 1
    assert all(k in found for k in ("image_mse", "benign_mse", "backdoor_mse", "over_bound", "mask_mean"))
