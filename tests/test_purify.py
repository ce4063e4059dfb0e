"""Tests for utils.defenses.purify: the defining property of every mode on every registered model, the
head-norm projection, the FST loss term, the tuning split and DER.

Every model x every mode runs one SGD step on four random uint8 images with a tiny learning rate,
no augmentation (pad 0, no flip) and a fake `evaluate`, so runs with the same seed see exactly the
same batch and differ only by what the mode does.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import models
from models import get_head
from utils import engine
from utils.errors import UserError
from utils.defenses.purify import MODES, PurifySettings, der, get_mode, purify, reinit_linear, tuning_indices

BIG_MODELS = {n for n in models.model_names() if models.is_heavy(n)}
NUM_CLASSES = 10
BATCH = 4
TINY_LR = 1e-6
# Large enough that one step at TINY_LR moves the FST head measurably: the extra move is
# lr * alpha * W_orig, i.e. an inner-product drop of lr * alpha * |W_orig|^2.
FST_ALPHA = 100.0
SEED = 3


def _image_size(name: str) -> int:
    # The big models get CIFAR-sized inputs; the rest get 16 px (or their declared minimum), which
    # keeps them quick without changing anything purification does.
    return 32 if name in BIG_MODELS else max(16, _model_and_data(name)[0].min_input_size)


def _pipeline(size: int) -> engine.Pipeline:
    """Normalisation only: no crop padding and no flip, so every run sees the same batch."""
    return engine.Pipeline(mean=torch.full((1, 3, 1, 1), 0.5), std=torch.full((1, 3, 1, 1), 0.25),
                           input_size=size, native_size=size, flip=False, pad=0)


class FakeEvaluate:
    """Stands in for the test-set evaluation; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, net):
        self.calls += 1
        return {"clean_acc": 0.5, "asr": 0.25, "ra": 0.125}


_MODELS: dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = {}
_RUNS: dict[tuple, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_cached_models():
    yield
    _MODELS.clear()
    _RUNS.clear()


def _model_and_data(name: str):
    """One freshly initialised model per architecture (shared, never modified) and its data."""
    if name not in _MODELS:
        torch.manual_seed(0)
        size = 32 if name in BIG_MODELS else 16
        model = models.build_model(name, NUM_CLASSES, 3, size)
        if model.min_input_size > size:
            size = model.min_input_size
            torch.manual_seed(0)
            model = models.build_model(name, NUM_CLASSES, 3, size)
        gen = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (BATCH, 3, size, size), dtype=torch.uint8, generator=gen)
        labels = torch.tensor([0, 1, 2, 3])
        _MODELS[name] = (model, images, labels)
    return _MODELS[name]


def _run(name: str, mode: str, **overrides) -> dict:
    """purify() once per (model, mode, settings), summarised (the big models are not kept), and
    cached so that modes can be compared."""
    key = (name, mode, tuple(sorted(overrides.items())))
    if key not in _RUNS:
        model, images, labels = _model_and_data(name)
        settings = dict(epochs=1, lr=TINY_LR, alpha=FST_ALPHA, batch_size=BATCH, norm_proj="fst", seed=SEED,
                        progress=False)
        settings.update(overrides)
        evaluate = FakeEvaluate()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        out, rows = purify(model, MODES[mode], images, labels, _pipeline(_image_size(name)),
                           PurifySettings(**settings), evaluate)
        # the input model must come back untouched, parameters and BatchNorm buffers alike
        after = model.state_dict()
        old_backbone, new_backbone = _backbone(model), _backbone(out)
        head = get_head(out)
        _RUNS[key] = {
            "is_input": out is model,
            "input_untouched": all(torch.equal(before[k], after[k]) for k in before),
            "rows": rows, "evaluate_calls": evaluate.calls,
            "all_trainable": all(p.requires_grad for p in out.parameters()),
            "weight": head.weight.detach().clone(), "bias": head.bias.detach().clone(),
            "backbone_keys_match": old_backbone.keys() == new_backbone.keys(),
            "backbone_changed": [n for n in old_backbone if not torch.equal(old_backbone[n], new_backbone[n])],
        }
    return _RUNS[key]


def _reinit_values(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What `reinit_linear` makes of the model's head with the test seed."""
    head = copy.deepcopy(get_head(_model_and_data(name)[0]))
    reinit_linear(head, SEED)
    return head.weight.detach(), head.bias.detach()


def _backbone(model) -> dict[str, torch.Tensor]:
    head_ids = {id(p) for p in get_head(model).parameters()}
    return {n: p.detach() for n, p in model.named_parameters() if id(p) not in head_ids}


def _head_name(model) -> str:
    return model.head_name


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


MODEL_NAMES = models.model_names()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_mode_defining_property(name, mode):
    original, _, _ = _model_and_data(name)
    run = _run(name, mode)
    rows = run["rows"]
    spec = MODES[mode]

    # a copy is returned and the backdoored model is left as it was
    assert not run["is_input"]
    assert run["input_untouched"], "purify() modified the model it was given"
    assert run["evaluate_calls"] == 1 and len(rows) == 1
    assert rows[0]["epoch"] == 1 and rows[0]["clean_acc"] == 0.5 and rows[0]["asr"] == 0.25
    assert math.isfinite(rows[0]["train_loss"])
    # every parameter trains again afterwards (the caller may go on training the returned model)
    assert run["all_trainable"]

    w0 = get_head(original).weight.detach()
    b0 = get_head(original).bias.detach()
    w, b = run["weight"], run["bias"]
    w_init, b_init = _reinit_values(name)
    bound = 1.0 / w.shape[1] ** 0.5

    assert run["backbone_keys_match"]
    backbone_changed = run["backbone_changed"]

    if spec.reinit_head:
        # far from the backdoored head, close to the fresh one, inside PyTorch's default bounds
        assert _max_diff(w, w0) > 0.1 * bound
        assert float(F.cosine_similarity(w.flatten(), w_init.flatten(), dim=0)) > 0.999
        if mode != "fst":  # fst's weight is rescaled to |W_orig| (norm_proj "fst"), the others are not
            assert float(w.detach().abs().max()) <= bound * (1 + 1e-3)
        assert float(b.detach().abs().max()) <= bound * (1 + 1e-3)
    else:
        # ft and lp keep the backdoored head: one tiny step moves it by far less than 1e-3
        assert _max_diff(w, w0) < 1e-3 and _max_diff(b, b0) < 1e-3

    if mode == "lp":
        assert backbone_changed == [], f"lp changed non-head parameters: {backbone_changed[:5]}"
        assert not torch.equal(w, w0), "lp did not train the head"
    else:
        assert backbone_changed, f"{mode} did not train the backbone"

    if mode == "ft":
        assert not torch.equal(w, w0), "ft did not train the head"
    if mode == "fe-tuning":
        # the re-initialised head stays frozen: exactly reinit_linear's values after training
        assert torch.equal(w, w_init) and torch.equal(b, b_init)
    if mode == "ft-init":
        assert not torch.equal(w, w_init), "ft-init did not train the re-initialised head"
        assert _max_diff(w, w_init) < 1e-3
    if mode == "fst":
        # norm projection: the head keeps the backdoored head's Frobenius norm
        assert float(w.norm()) == pytest.approx(float(w0.norm()), rel=1e-5)
        # the feature-shift term pushes <W, W_orig> down compared with ft-init (same seed, same data);
        # ft-init is not projected under norm_proj "fst", so compare at the same norm
        w_ftinit = _run(name, "ft-init")["weight"]
        ip_fst = float((w * w0).sum())
        ip_ftinit = float((w_ftinit * w0).sum() * w0.norm() / w_ftinit.norm())
        expected_drop = TINY_LR * FST_ALPHA * float((w0 * w0).sum())
        assert ip_fst < ip_ftinit - 0.25 * expected_drop, (ip_fst, ip_ftinit, expected_drop)
        # and the cosine to the backdoored head ends lower than right after re-initialisation
        cos_start = float(F.cosine_similarity(w_init.flatten(), w0.flatten(), dim=0))
        assert float(F.cosine_similarity(w.flatten(), w0.flatten(), dim=0)) < cos_start - 0.25 * TINY_LR * FST_ALPHA
        assert rows[0]["head_weight_norm"] == pytest.approx(float(w0.norm()), rel=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reinit_linear_bounds_and_seed(name):
    model, _, _ = _model_and_data(name)
    original = get_head(model)
    head = copy.deepcopy(original)
    reinit_linear(head, 7)
    bound = 1.0 / head.in_features ** 0.5
    assert float(head.weight.detach().abs().max()) <= bound and float(head.bias.detach().abs().max()) <= bound
    # it fills the range rather than shrinking toward zero
    assert float(head.weight.detach().abs().max()) > 0.9 * bound
    assert not torch.equal(head.weight, original.weight)
    again = copy.deepcopy(original)
    reinit_linear(again, 7)
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)
    other = copy.deepcopy(original)
    reinit_linear(other, 8)
    assert not torch.equal(other.weight, head.weight)


# --- settings that matter beyond one step (smallcnn, a few real steps) ---------------------------

def _small_setup(n: int = 16, seed: int = 5):
    torch.manual_seed(seed)
    model = models.build_model("smallcnn", NUM_CLASSES, 3, 16)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % NUM_CLASSES
    return model, images, labels


def _small_run(mode, model, images, labels, **kw):
    settings = dict(epochs=2, lr=0.05, alpha=0.2, batch_size=8, seed=0, progress=False)
    settings.update(kw)
    return purify(model, get_mode(mode), images, labels, _pipeline(16), PurifySettings(**settings), FakeEvaluate())


def test_fst_inner_product_lower_than_ft_init_at_real_lr():
    model, images, labels = _small_setup()
    w0 = get_head(model).weight.detach().clone()
    fst, _ = _small_run("fst", model, images, labels, norm_proj="all")
    ftinit, _ = _small_run("ft-init", model, images, labels, norm_proj="all")
    w_fst, w_ftinit = get_head(fst).weight.detach(), get_head(ftinit).weight.detach()
    # both projected to |W_orig| ("all"), so the inner products compare directly
    assert float(w_fst.norm()) == pytest.approx(float(w0.norm()), rel=1e-5)
    assert float(w_ftinit.norm()) == pytest.approx(float(w0.norm()), rel=1e-5)
    assert float((w_fst * w0).sum()) < float((w_ftinit * w0).sum())


@pytest.mark.parametrize("mode", list(MODES))
def test_norm_proj_all_forces_the_norm_in_every_mode(mode):
    model, images, labels = _small_setup()
    w0 = get_head(model).weight.detach().clone()
    out, rows = _small_run(mode, model, images, labels, norm_proj="all", lr=0.2)
    assert float(get_head(out).weight.detach().norm()) == pytest.approx(float(w0.norm()), rel=1e-5)
    assert all(r["head_weight_norm"] == pytest.approx(float(w0.norm()), rel=1e-5) for r in rows)


def test_fe_tuning_under_norm_proj_all_keeps_the_reinit_direction():
    model, images, labels = _small_setup()
    w0 = get_head(model).weight.detach().clone()
    out, _ = _small_run("fe-tuning", model, images, labels, norm_proj="all")
    init = copy.deepcopy(get_head(model))
    reinit_linear(init, 0)
    w = get_head(out).weight.detach()
    expected = init.weight.detach() * (w0.norm() / init.weight.detach().norm())
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(get_head(out).bias, init.bias)  # the bias is never rescaled


def test_norm_proj_none_does_not_force_the_norm():
    model, images, labels = _small_setup()
    w0_norm = float(get_head(model).weight.detach().norm())
    for mode in ("fst", "ft-init", "ft"):
        out, _ = _small_run(mode, model, images, labels, norm_proj="none", lr=0.2, alpha=1.0)
        assert abs(float(get_head(out).weight.detach().norm()) - w0_norm) > 1e-3 * w0_norm, mode


def test_norm_proj_fst_only_projects_fst():
    model, images, labels = _small_setup()
    w0_norm = float(get_head(model).weight.detach().norm())
    fst, _ = _small_run("fst", model, images, labels, norm_proj="fst", lr=0.2)
    ftinit, _ = _small_run("ft-init", model, images, labels, norm_proj="fst", lr=0.2)
    assert float(get_head(fst).weight.detach().norm()) == pytest.approx(w0_norm, rel=1e-5)
    assert abs(float(get_head(ftinit).weight.detach().norm()) - w0_norm) > 1e-3 * w0_norm


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["fst", "ft-init"])
def test_loss_is_ce_with_smoothing_plus_the_fst_term(mode, smoothing):
    """With a single full batch the logged training loss is the loss at the starting weights, which
    can be recomputed by hand: CE (with label smoothing) plus alpha <W, W_orig> for fst only."""
    model, images, labels = _small_setup(n=8)
    alpha = 0.7
    _, rows = _small_run(mode, model, images, labels, epochs=1, batch_size=8, lr=1e-8, alpha=alpha,
                         label_smoothing=smoothing, norm_proj="none")
    net = copy.deepcopy(model)
    w0 = get_head(net).weight.detach().clone()
    reinit_linear(get_head(net), 0)
    net.train()
    with torch.no_grad():
        logits = net(_pipeline(16).train_batch(images))
        ce = float(F.cross_entropy(logits, labels, label_smoothing=smoothing))
        term = alpha * float((get_head(net).weight.detach() * w0).sum())
    expected = ce + term if mode == "fst" else ce
    assert rows[0]["train_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    if mode == "fst":
        assert abs(term) > 1e-3  # so the comparison above can tell the two apart
        assert rows[0]["train_loss"] != pytest.approx(ce, rel=1e-4, abs=1e-5)


def test_evaluate_runs_once_per_epoch_and_rows_are_complete():
    model, images, labels = _small_setup()
    evaluate = FakeEvaluate()
    _, rows = purify(model, get_mode("fst"), images, labels, _pipeline(16),
                     PurifySettings(epochs=3, lr=0.05, alpha=0.2, batch_size=8, progress=False), evaluate)
    assert evaluate.calls == 3
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"epoch", "lr", "train_loss", "train_acc", "clean_acc", "asr", "ra", "head_weight_norm",
                "head_cosine_to_orig"} <= row.keys()
    # cosine schedule over the run's own epochs
    assert rows[0]["lr"] == pytest.approx(0.05)
    assert rows[0]["lr"] > rows[1]["lr"] > rows[2]["lr"] > 0


@pytest.mark.parametrize("losses, reduced_at", [([1.0] * 13, 13), ([1.0 / e for e in range(1, 14)], None)])
def test_plateau_schedule_cuts_the_lr_after_ten_epochs_without_a_lower_training_loss(monkeypatch, losses, reduced_at):
    # torch's ReduceLROnPlateau defaults (x0.1, patience 10) stepped on each epoch's mean training
    # loss: a flat loss cuts the lr at epoch 13 (epoch 1 sets the best, 2-12 are 11 bad epochs);
    # a falling loss never does
    model, images, labels = _small_setup()
    fed = iter(losses)
    monkeypatch.setattr(engine, "train_epoch", lambda *a, **k: {"train_loss": next(fed), "train_acc": 0.5})
    _, rows = purify(model, get_mode("ft"), images, labels, _pipeline(16),
                     PurifySettings(epochs=13, lr=0.01, alpha=0.0, batch_size=8, progress=False, schedule="plateau",
                                    eval_every=13), FakeEvaluate())
    lrs = [r["lr"] for r in rows]
    if reduced_at is None:
        assert lrs == [0.01] * 13
    else:
        assert lrs[: reduced_at - 1] == [0.01] * (reduced_at - 1) and lrs[reduced_at - 1] == pytest.approx(0.001)
    # "constant" overrides the mode's cosine; an unknown name is refused
    fed = iter([1.0] * 3)
    _, rows = purify(model, get_mode("ft"), images, labels, _pipeline(16),
                     PurifySettings(epochs=3, lr=0.01, alpha=0.0, batch_size=8, progress=False, schedule="constant"),
                     FakeEvaluate())
    assert [r["lr"] for r in rows] == [0.01] * 3
    with pytest.raises(ValueError, match="unknown schedule"):
        purify(model, get_mode("ft"), images, labels, _pipeline(16),
               PurifySettings(epochs=1, lr=0.01, alpha=0.0, progress=False, schedule="step"), FakeEvaluate())


def test_same_seed_same_result_other_seed_other_result():
    model, images, labels = _small_setup()
    a, _ = _small_run("fst", model, images, labels, seed=11)
    b, _ = _small_run("fst", model, images, labels, seed=11)
    c, _ = _small_run("fst", model, images, labels, seed=12)
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), ka
    assert not torch.equal(get_head(a).weight, get_head(c).weight)


@pytest.mark.parametrize("frozen_bn_eval", [False, True])
def test_lp_batchnorm_statistics(frozen_bn_eval):
    """The official code leaves frozen BatchNorm in train mode (its statistics move);
    frozen_bn_eval keeps it in eval mode (nothing but the head changes)."""
    model, images, labels = _small_setup()
    out, _ = _small_run("lp", model, images, labels, frozen_bn_eval=frozen_bn_eval)
    head_keys = {f"{_head_name(model)}.weight", f"{_head_name(model)}.bias"}
    before, after = model.state_dict(), out.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert head_keys <= changed
    if frozen_bn_eval:
        assert changed == head_keys
    else:
        buffers = {k for k in changed - head_keys}
        assert any(k.endswith("running_mean") for k in buffers)
        assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in buffers)


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="fst"):
        get_mode("fine-tune")


# --- tuning_indices --------------------------------------------------------------------------

@pytest.mark.parametrize("n,ratio", [(300, 0.02), (1000, 0.05), (50000, 0.02), (37, 0.5), (10, 1.0)])
def test_tuning_indices_count_unique_and_seeded(n, ratio):
    labels = torch.arange(n) % 10
    idx = tuning_indices(labels, ratio, seed=0)
    assert len(idx) == int(n * ratio)
    assert len(set(idx.tolist())) == len(idx)
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert torch.equal(idx, tuning_indices(labels, ratio, seed=0))
    if 1 < len(idx) < n:
        assert not torch.equal(idx, tuning_indices(labels, ratio, seed=1))


def test_tuning_indices_are_not_just_the_first_images():
    idx = tuning_indices(torch.arange(1000) % 10, 0.05, seed=0)
    assert not torch.equal(idx, torch.arange(50))


def test_tuning_indices_balanced_takes_the_first_of_each_class():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (500,), generator=gen)
    idx = tuning_indices(labels, 0.1, seed=0, balanced=True)  # k = 50 -> 5 per class
    expected = torch.cat([torch.nonzero(labels == c).flatten()[:5] for c in range(10)]).sort().values
    assert torch.equal(idx, expected)
    assert torch.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    # balanced does not depend on the seed
    assert torch.equal(idx, tuning_indices(labels, 0.1, seed=9, balanced=True))


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_tuning_indices_bad_split_ratio(ratio):
    with pytest.raises(UserError, match="split_ratio"):
        tuning_indices(torch.arange(100) % 10, ratio, seed=0)


def test_tuning_indices_selecting_nothing_is_a_user_error():
    with pytest.raises(UserError):
        tuning_indices(torch.arange(10) % 10, 0.05, seed=0)


# --- DER ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("before,after,expected", [
    # ASR 0.9 -> 0.1 at a cost of 0.05 C-Acc: (0.8 - 0.05 + 1) / 2
    ({"asr": 0.9, "clean_acc": 0.9}, {"asr": 0.1, "clean_acc": 0.85}, 0.875),
    # a perfect defense
    ({"asr": 1.0, "clean_acc": 0.8}, {"asr": 0.0, "clean_acc": 0.8}, 1.0),
    # nothing removed, all accuracy lost
    ({"asr": 0.5, "clean_acc": 1.0}, {"asr": 0.5, "clean_acc": 0.0}, 0.0),
    # ASR going up and accuracy going up both count as zero
    ({"asr": 0.2, "clean_acc": 0.5}, {"asr": 0.6, "clean_acc": 0.7}, 0.5),
    # ASR 0.95 -> 0.02, C-Acc 0.93 -> 0.90: (0.93 - 0.03 + 1) / 2
    ({"asr": 0.95, "clean_acc": 0.93, "ra": 0.0}, {"asr": 0.02, "clean_acc": 0.90, "ra": 0.8}, 0.95),
])
def test_der(before, after, expected):
    assert der(before, after) == pytest.approx(expected, abs=1e-12)


def test_every_mode_carries_its_title_and_tables_use_it():
    from utils.analysis.results import MODE_NAMES
    from utils.defenses.purify import ALL_MODES

    for name, mode in ALL_MODES.items():
        assert mode.title and MODE_NAMES[name] == mode.title
    assert {n for n, m in ALL_MODES.items() if m.fst} == set(MODES) == {"ft", "lp", "fe-tuning", "ft-init", "fst"}
