"""NAD and Neural Cleanse (issue 14): the registry's stage accessor over every model, NAD's attention
term, NC's outlier test on a planted trigger, its unlearning only when a class is flagged, its PNG
artifacts, both modes end to end through ft.py, and their user errors through the real command line."""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import models
from conftest import REPO_ROOT, copy_record
from utils import engine
from utils.commands import finetune
from utils.defenses import nad, nc
from utils.defenses.purify import ALL_MODES, PurifySettings, Tuning, purify

BIG_MODELS = {n for n in models.model_names() if models.is_heavy(n)}


def _size(name: str, model) -> int:
    return 32 if name in BIG_MODELS else max(16, model.min_input_size)


def _pipeline(size: int, channels: int = 3, mean: float = 0.5, std: float = 0.25) -> engine.Pipeline:
    """Normalisation only (no crop, no flip): every run sees the same batches."""
    return engine.Pipeline(mean=torch.full((1, channels, 1, 1), mean), std=torch.full((1, channels, 1, 1), std),
                           input_size=size, native_size=size, flip=False, pad=0)


def _fake_eval(net):
    return {"clean_acc": 0.5, "asr": 0.25, "ra": 0.125}


def _settings(mode: str, **extra) -> PurifySettings:
    """PurifySettings with the mode's own options at their defaults, `extra` overriding."""
    own = {o.name: o.default for o in ALL_MODES[mode].options}
    own.update(extra)
    return PurifySettings(epochs=1, lr=0.01, alpha=0.0, batch_size=8, progress=False, seed=1, extra=own)


# --- the registry's stages --------------------------------------------------------------------

@pytest.mark.parametrize("name", models.model_names())
def test_every_model_has_stages_ending_in_its_feature_maps(name):
    torch.manual_seed(0)
    model = models.build_model(name, 10).eval()
    x = torch.randn(2, 3, _size(name, model), _size(name, model))
    with torch.no_grad():
        found = models.stages(model, x)
        maps = model.feature_maps(x)
    assert len(found) >= 1 and all(s.dim() == 4 and s.shape[0] == 2 for s in found)
    assert found[-1].shape == maps.shape
    if name != "swin_t":  # Swin's stages are pre-norm token grids except the last
        assert torch.allclose(found[-1], maps)
    # the hooks are gone again
    assert all(not m._forward_hooks for m in model.modules())


def test_a_model_that_declares_no_stages_has_its_feature_maps_as_the_one_stage():
    class Plain(models.BackdoorNet):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.linear = nn.Linear(4, 2)

        def feature_maps(self, x):
            return self.conv(x)

        def pool(self, maps):
            return maps.mean(dim=(2, 3))

    net = Plain()
    x = torch.randn(2, 3, 8, 8)
    (only,) = models.stages(net, x)
    assert torch.equal(only, net.feature_maps(x))
    assert models.StageTap(net).modules == []


def test_a_stage_tap_follows_deep_copies_and_is_removed_from_them():
    model = models.build_model("smallcnn", 10)
    tap = models.StageTap(model)
    twin = copy.deepcopy(model)
    twin(torch.randn(2, 3, 16, 16))
    assert [s.shape[1] for s in tap.latest()] == [64, 128, 256]
    tap.remove(twin)
    assert all(not m._forward_hooks for net in (model, twin) for m in net.modules())


# --- NAD ----------------------------------------------------------------------------------------

def _nad_setup(name: str):
    torch.manual_seed(0)
    model = models.build_model(name, 10)
    size = _size(name, model)
    teacher = copy.deepcopy(model)
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.eval()
    images = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8)
    labels = torch.arange(8) % 10
    tuning = Tuning(images, labels, _pipeline(size), _settings("nad"), _fake_eval)
    return model, teacher, tuning


def _params(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.mark.parametrize("name", ["smallcnn", "preactresnet18"])  # resnet18 has the same stages
def test_nad_adds_the_attention_term_and_nothing_else(name):
    model, teacher, tuning = _nad_setup(name)
    plain, plain_rows = purify(model, nad.STUDENT, tuning.images, tuning.labels, tuning.pipeline, tuning.settings,
                               _fake_eval)
    zero, zero_rows = nad.distill(model, teacher, tuning, [0.0, 0.0, 0.0], 2.0)
    assert torch.equal(_params(plain), _params(zero)) and zero_rows[0]["train_loss"] == plain_rows[0]["train_loss"]
    betas = [500.0, 1000.0, 1000.0]
    distilled, rows = nad.distill(model, teacher, tuning, betas, 2.0)
    assert not torch.allclose(_params(plain), _params(distilled))
    # the one batch's loss recomputed independently: CE of the student in train mode + the attention
    # term (sum over channels of a^2, flattened, L2-normalised, MSE, weighted) on the deepest stages
    student = copy.deepcopy(model).train()
    x = tuning.pipeline.eval_batch(tuning.images)
    with torch.no_grad():
        own = models.stages(student, x)
        theirs = models.stages(teacher, x)
    student = copy.deepcopy(model).train()
    with torch.no_grad():
        logits = student(x)
        ce = F.cross_entropy(logits, tuning.labels)

    def att(a):
        m = a.float().pow(2).sum(1).reshape(len(a), -1)
        return m / (m.norm(dim=1, keepdim=True) + 1e-6)

    k = min(3, len(own))
    term = sum(b * ((att(s) - att(t)) ** 2).mean() for b, s, t in zip(betas[3 - k:], own[-k:], theirs[-k:]))
    assert term > 0
    assert rows[0]["train_loss"] == pytest.approx(float(ce + term), rel=1e-4)
    assert all(not m._forward_hooks for net in (model, distilled) for m in net.modules())


def test_nad_as_a_mode_trains_a_teacher_first_and_reports_it():
    model, _, tuning = _nad_setup("smallcnn")
    tuning.settings.extra.update(nad_teacher_epochs=1)
    info: dict = {}
    out, rows = purify(model, ALL_MODES["nad"], tuning.images, tuning.labels, tuning.pipeline, tuning.settings,
                       _fake_eval, info=info)
    assert info["result"]["nad_teacher"] == {"clean_acc": 0.5, "asr": 0.25, "ra": 0.125}
    assert len(rows) == 1 and not torch.allclose(_params(out), _params(model))


def test_nad_betas_parse_and_bad_ones_are_refused():
    assert nad.parse_betas("500, 1000 1000") == [500.0, 1000.0, 1000.0]
    assert nad._betas_problem("1,x") and nad._betas_problem("") and nad._betas_problem("-1") and nad._betas_problem("nan")


# --- Neural Cleanse -----------------------------------------------------------------------------

SIDE = 16
PROTOS = torch.tensor([[0.5, 0.5, 0.5], [0.8, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.8], [0.8, 0.8, 0.2],
                       [0.8, 0.2, 0.8], [0.2, 0.8, 0.8], [0.65, 0.35, 0.5], [0.35, 0.65, 0.5], [0.5, 0.35, 0.65]])


class PatchNet(models.BackdoorNet):
    """A hand-made classifier on [0, 1] input (pipeline mean 0, std 1): nearest colour prototype by
    the image's mean colour, and, when `planted`, a large bonus for class 0 when the 2x2 bottom-right
    patch is bright: a backdoor whose trigger is 4 pixels while every other class needs a mask
    covering much of the image."""

    head_name = "linear"

    def __init__(self, planted: bool):
        super().__init__()
        self.linear = nn.Linear(4, 10)
        k = 20.0
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.weight[:, :3] = 2 * k * PROTOS
            self.linear.bias.copy_(-k * (PROTOS ** 2).sum(1))
            if planted:
                self.linear.weight[0, 3] = 120.0

    def feature_maps(self, x):
        colour = x.mean(dim=(2, 3))
        patch = F.relu(x[:, :, -2:, -2:].mean(dim=(1, 2, 3)) - 0.75)[:, None]  # 0 unless bright
        return torch.cat([colour, patch], 1)[:, :, None, None]

    def pool(self, maps):
        return maps.flatten(1)


def _nc_data(n_per_class: int = 3):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(n_per_class)
    noise = 0.05 * torch.randn(len(labels), 3, SIDE, SIDE, generator=gen)
    images = ((PROTOS[labels][:, :, None, None] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


NC_FAST = dict(nc_epochs=30, nc_patience=2, nc_early_stop_patience=0)


def _run_nc(model, settings=None, **extra):
    images, labels = _nc_data()
    settings = settings or dataclasses.replace(_settings("nc", **{**NC_FAST, **extra}), batch_size=32)
    info: dict = {}
    out, rows = purify(model, ALL_MODES["nc"], images, labels, _pipeline(SIDE, mean=0.0, std=1.0), settings,
                       _fake_eval, info=info)
    return out, rows, info


def test_the_hand_made_models_classify_their_data_and_respond_to_the_patch():
    images, labels = _nc_data()
    x = images.float() / 255
    assert (PatchNet(True)(x).argmax(1) == labels).all() and (PatchNet(False)(x).argmax(1) == labels).all()
    stamped = x.clone()
    stamped[:, :, -2:, -2:] = 1.0
    assert (PatchNet(True)(stamped).argmax(1) == 0).all()


def test_nc_flags_the_target_of_a_planted_trigger_and_unlearns_it():
    model = PatchNet(True)
    out, rows, info = _run_nc(model)
    found = info["result"]["nc"]
    norms = found["norms"]
    assert min(range(10), key=lambda c: norms[c]) == 0 and norms[0] < 10  # about the 4-pixel patch
    assert found["flagged"] and found["flagged"][0] == 0 and found["anomaly_index"][0] > 2
    assert found["unlearned"] and rows[-1]["epoch"] == 1 and rows[-1]["lr"] > 0
    assert not torch.equal(out.linear.weight, model.linear.weight)
    # the reversed mask of class 0 sits on the patch
    mask0 = Image.open(io.BytesIO(info["artifacts"]["class0_mask.png"]))
    assert mask0.size == (SIDE, SIDE) and mask0.mode == "L"
    pixels = torch.tensor(list(mask0.tobytes()), dtype=torch.float).view(SIDE, SIDE)
    assert pixels[-2:, -2:].mean() > 4 * pixels.mean()
    for c in range(10):
        for part, mode in (("mask", "L"), ("pattern", "RGB"), ("trigger", "RGB")):
            img = Image.open(io.BytesIO(info["artifacts"][f"class{c}_{part}.png"]))
            img.verify()
            assert img.format == "PNG" and img.mode == mode and img.size == (SIDE, SIDE)


def test_nc_returns_the_model_unchanged_when_no_class_is_flagged(monkeypatch):
    def equal_norms(model, images, pipeline, target, **kw):
        return {"mask": torch.full((SIDE, SIDE), 0.3), "pattern": torch.full((3, SIDE, SIDE), 0.5),
                "norm": 50.0 + 0.1 * target, "succeeded": True, "epochs": 1}

    monkeypatch.setattr(nc, "reverse_trigger", equal_norms)
    model = PatchNet(True)
    out, rows, info = _run_nc(model)
    assert info["result"]["nc"]["flagged"] == [] and not info["result"]["nc"]["unlearned"]
    assert len(rows) == 1 and rows[0]["epoch"] == 0 and rows[0]["clean_acc"] == 0.5
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), model.state_dict().values()))

    def one_outlier(model, images, pipeline, target, **kw):
        return {**equal_norms(model, images, pipeline, target), "norm": 5.0 if target == 3 else 50.0 + target}

    monkeypatch.setattr(nc, "reverse_trigger", one_outlier)
    out, rows, info = _run_nc(model)
    assert info["result"]["nc"]["flagged"] == [3] and rows[-1]["epoch"] == 1
    assert not torch.equal(out.linear.weight, model.linear.weight)


def test_the_mad_test_and_the_unlearning_set():
    norms = torch.tensor([3.0, 50, 51, 49, 50.5, 49.5, 50, 51, 49, 50])
    index, median, mad = nc.anomaly_indices(norms)  # the lower middle values, as torch.median
    assert median == 50.0 and mad == pytest.approx(1.4826 * 0.5)
    assert float(index[0]) == pytest.approx(47 / (1.4826 * 0.5))
    assert nc.flagged_classes(norms) == [0]
    # a class far above the median is never flagged
    assert nc.flagged_classes(torch.tensor([50.0, 500, 51, 49, 50])) == []
    images = torch.full((10, 3, 4, 4), 100, dtype=torch.uint8)
    labels = torch.arange(10)
    mask = torch.zeros(4, 4)
    mask[0, 0] = 1.0
    trig = {"mask": mask, "pattern": torch.ones(3, 4, 4)}
    new_images, new_labels = nc.unlearning_set(images, labels, [trig, trig], 0.2)
    assert len(new_images) == 8 + 2 * 2 and new_labels.tolist() == list(range(8)) + [8, 9, 8, 9]
    assert (new_images[8:, :, 0, 0] == 255).all() and (new_images[8:, :, 1:, :] == 100).all()
    assert (new_images[:8] == 100).all()


# --- end to end through ft.py, and the user errors ------------------------------------------------

def _ft_argv(tiny_cifar10, root, mode, *extra):
    return ["--dataset", "cifar10", "--dataset_path", str(tiny_cifar10), "--model", "smallcnn",
            "--record_root", str(root), "--attack", "badnet", "--device", "cpu", "--ft_mode", mode,
            "--epochs", "1", "--split_ratio", "0.2", "--progress", "false", *extra]


def test_nad_runs_end_to_end_through_ft_py(badnet_record, tiny_cifar10, tmp_path):
    folder = copy_record(badnet_record, tmp_path)
    finetune.main(_ft_argv(tiny_cifar10, tmp_path, "nad", "--nad_teacher_epochs", "1"))
    out = folder / "defense" / "nad"
    result = json.loads((out / "result.json").read_text())
    assert result["ft_mode"] == "nad" and set(result["nad_teacher"]) == {"clean_acc", "asr", "ra"}
    assert (out / "model.pt").is_file()


def test_nc_runs_end_to_end_through_ft_py(badnet_record, tiny_cifar10, tmp_path):
    folder = copy_record(badnet_record, tmp_path)
    finetune.main(_ft_argv(tiny_cifar10, tmp_path, "nc", "--nc_epochs", "1"))
    out = folder / "defense" / "nc"
    result = json.loads((out / "result.json").read_text())
    found = result["nc"]
    assert len(found["norms"]) == len(found["anomaly_index"]) == 10
    assert found["unlearned"] == bool(found["flagged"])
    for c in range(10):
        for part in ("mask", "pattern", "trigger"):
            with Image.open(out / f"class{c}_{part}.png") as img:
                assert img.format == "PNG" and img.size == (32, 32)


@pytest.mark.parametrize("flags,message", [
    (["--ft_mode", "nad", "--nad_betas", "500,x"], "--nad_betas must be a comma-separated list of numbers"),
    (["--ft_mode", "nc", "--nc_unlearn_ratio", "1.5"], "--nc_unlearn_ratio must be within"),
])
def test_bad_nad_and_nc_settings_are_one_error_line(badnet_record, tiny_cifar10, tmp_path, flags, message):
    folder = copy_record(badnet_record, tmp_path)
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    argv = [a for a in _ft_argv(tiny_cifar10, tmp_path, "x") if a not in ("--ft_mode", "x")] + flags
    proc = subprocess.run([sys.executable, "fine_tune/ft.py", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr
    assert sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
