"""The EP, FP and CLP purification modes (issue 14): each one's defining property on a tiny model, and
all three end to end through ft.py on the session's BadNet record."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from conftest import copy_record
from test_cli import FT, assert_unchanged, assert_user_error, run_script, snapshot
from utils import engine
from utils.commands import finetune
from utils.defenses import clp, ep, fp
from utils.defenses.purify import ALL_MODES, PoisonedSamples, PurifySettings, Tuning
from utils.errors import UserError

SMALL_MODELS = models.light_model_names()  # the heavy ones (register_model(..., heavy=True)) are too big for these loops


def _pipeline(size: int = 8) -> engine.Pipeline:
    return engine.Pipeline(mean=torch.full((1, 3, 1, 1), 0.5), std=torch.full((1, 3, 1, 1), 0.25),
                           input_size=size, native_size=size, flip=False, pad=0)


def _fake_eval(net):
    return {"clean_acc": 0.5, "asr": 0.25, "ra": 0.5}


class TinyNet(models.BackdoorNet):
    """One conv stage of 16 channels (ReLU), global average pool, linear head; channels 3, 7, 11 are
    dead on every input (zero kernel, large negative bias)."""

    head_name = "linear"
    dormant = (3, 7, 11)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.linear = nn.Linear(16, 4)
        with torch.no_grad():
            self.conv.weight.abs_()   # every live channel reads the (positive) normalised image positively
            self.conv.bias.fill_(0.1)
            for c in self.dormant:
                self.conv.weight[c] = 0
                self.conv.bias[c] = -100.0

    def feature_maps(self, x):
        return F.relu(self.conv(x))

    def pool(self, maps):
        return maps.mean(dim=(2, 3))


def _tuning(images, labels, **extra) -> Tuning:
    settings = PurifySettings(epochs=1, lr=0.01, alpha=0.0, batch_size=16, progress=False, extra=extra)
    return Tuning(images, labels, _pipeline(images.shape[-1]) if images is not None else None, settings, _fake_eval)


# --- CLP -------------------------------------------------------------------------------------------

def test_clp_prunes_the_channel_with_a_huge_kernel_and_no_other():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU())
    with torch.no_grad():
        net[0].weight[9] *= 50
    gamma, beta = net[1].weight.detach().clone(), net[1].bias.detach().clone()
    pruned = clp.clp_prune(net, 3.0)
    assert pruned == {"1": [9]}
    assert net[1].weight[9] == 0 and net[1].bias[9] == 0
    keep = [c for c in range(32) if c != 9]
    assert torch.equal(net[1].weight[keep], gamma[keep]) and torch.equal(net[1].bias[keep], beta[keep])
    # the bound is the spectral norm of the BN-scaled kernel of each channel
    lips = clp.channel_lipschitz(net[0], net[1])
    scale = (net[1].weight[0] / net[1].running_var[0].sqrt()).abs()
    assert torch.isclose(lips[0], torch.linalg.svdvals(net[0].weight[0].reshape(3, -1) * scale).max())


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_clp_finds_conv_bn_pairs_in_every_model(name):
    model = models.build_model(name, 10)
    pairs = clp.conv_bn_pairs(model)
    assert pairs and all(conv.out_channels == bn.num_features for _, conv, _, bn in pairs)
    _, conv, bn_name, bn = pairs[len(pairs) // 2]
    with torch.no_grad():
        conv.weight[1] *= 100
    pruned = clp.clp_prune(model, 3.0)
    assert pruned[bn_name] == [1]
    assert bn.weight[1] == 0 and bn.bias[1] == 0


@pytest.mark.parametrize("images", [None, "garbage"])
def test_clp_reads_no_data(images):
    """The mode's algorithm runs on a Tuning without images (or with nonsense ones) and gives the same model."""
    torch.manual_seed(1)
    model = models.build_model("smallcnn", 10)
    with torch.no_grad():
        model.trunk[0].weight[5] *= 100
    if images == "garbage":
        tuning = _tuning(torch.full((4, 3, 8, 8), 255, dtype=torch.uint8), torch.full((4,), 7), clp_u=3.0)
    else:
        tuning = Tuning(None, None, None, PurifySettings(epochs=1, lr=0.01, alpha=0.0, extra={"clp_u": 3.0}), _fake_eval)
    mode = ALL_MODES["clp"]
    pruned_model, rows = mode.algorithm(model, mode, tuning)
    assert rows[-1]["clean_acc"] == 0.5 and len(rows) == 1
    assert 5 in tuning.result["clp"]["pruned"]["trunk.1"]
    torch.manual_seed(1)
    reference = models.build_model("smallcnn", 10)
    with torch.no_grad():
        reference.trunk[0].weight[5] *= 100
    clp.clp_prune(reference, 3.0)
    for (k, a), b in zip(pruned_model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k


def test_clp_refuses_a_model_without_batchnorm():
    with pytest.raises(UserError, match="needs convolutions followed by BatchNorm2d"):
        clp.clp_prune(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), 3.0)


# --- FP --------------------------------------------------------------------------------------------

def test_fp_ranks_dormant_channels_first_and_prunes_them_first():
    net = TinyNet().eval()
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8)
    pipe = _pipeline()
    activation = fp.channel_activations(net, images, pipe)
    assert torch.all(activation[list(TinyNet.dormant)] == 0) and torch.all(activation[[0, 1, 2, 4]] > 0)
    order = torch.argsort(activation, stable=True)
    assert set(order[:3].tolist()) == set(TinyNet.dormant)
    # labels = the model's own predictions: accuracy 1 before pruning; dormant channels cost nothing
    labels = engine.predict(net, images, pipe)
    tuning = _tuning(images, labels, fp_acc_ratio=0.05, fp_once_prune_ratio=1 / 16, fp_acc_data="tuning")
    reader, pruned, log = fp.fine_prune(net, tuning)
    assert reader.name == "linear" and reader.per_channel == 1
    assert set(pruned[:3].tolist()) == set(TinyNet.dormant)
    assert [row["pruned"] for row in log][:4] == [0, 1, 2, 3] and all(row["clean_acc"] == 1.0 for row in log[:4])
    # the margin holds for what is kept, and the search stopped at the first count beyond it
    kept_acc = float((engine.predict(net, images, pipe) == labels).float().mean())
    assert 1.0 - kept_acc < 0.05
    assert log[-1]["within_margin"] is False or log[-1]["pruned"] == len(pruned)
    assert torch.all(net.linear.weight[:, pruned] == 0)


def test_fp_holds_pruned_channels_at_zero_while_fine_tuning():
    """The weights the loop evaluates after its epoch (before the mode's final clean-up) have the pruned
    columns at zero, though live channels were pruned and their columns get gradients."""
    net = TinyNet()
    images = torch.randint(0, 256, (48, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(48) % 4
    seen = []

    def evaluate(model):
        seen.append(model.linear.weight.detach().clone())
        return {"clean_acc": 0.5, "asr": 0.25, "ra": 0.5}

    tuning = _tuning(images, labels, fp_acc_ratio=1.0, fp_once_prune_ratio=1 / 16, fp_acc_data="tuning")
    tuning.evaluate = evaluate
    mode = ALL_MODES["fp"]
    tuned, rows = mode.algorithm(net, mode, tuning)
    pruned = tuning.result["fp"]["pruned"]
    live = [c for c in pruned if c not in TinyNet.dormant]
    assert live, "the search pruned no live channel; the test needs one"
    assert len(seen) == len(rows) == 1 and torch.all(seen[0][:, pruned] == 0)
    kept = [c for c in range(16) if c not in pruned]
    assert not torch.equal(seen[0][:, kept], net.linear.weight.detach()[:, kept])  # the rest trained


def test_fp_select_pruning_respects_the_margin():
    accuracies = {0: 0.80, 2: 0.80, 4: 0.75, 6: 0.73, 8: 0.70, 10: 0.2}
    order = torch.arange(12)
    kept, log = fp.select_pruning(order, 2, lambda n: {"clean_acc": accuracies[n]}, 0.1)
    assert kept == 6  # 0.73 is a 8.75% drop, 0.70 a 12.5% one
    assert [r["pruned"] for r in log] == [0, 2, 4, 6, 8] and log[-1]["within_margin"] is False
    kept, _ = fp.select_pruning(order, 2, lambda n: {"clean_acc": accuracies[n]}, 0.0)
    assert kept == 0


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_fp_zeroed_columns_equal_pruned_channels_in_every_model(name):
    model = models.build_model(name, 10).eval()
    maps = model.feature_maps(torch.randn(2, 3, 32, 32)).detach()
    reader = fp.find_maps_reader(model, maps)
    assert reader.layer is models.get_head(model) and reader.per_channel == 1
    fp.check_folding(model, reader, maps)  # raises if zeroing columns differed from zeroing channels


def test_fp_refuses_a_pooling_that_mixes_channels():
    class Mixing(TinyNet):
        def pool(self, maps):
            return maps.mean(dim=(2, 3)).roll(1, dims=1) + maps.mean(dim=(2, 3))

    net = Mixing().eval()
    maps = net.feature_maps(torch.rand(2, 3, 8, 8))
    with pytest.raises(UserError, match="mixes its last-stage channels"):
        fp.check_folding(net, fp.find_maps_reader(net, maps), maps)


# --- EP --------------------------------------------------------------------------------------------

def test_ep_training_set_adds_the_poisoned_samples_with_their_true_labels():
    clean = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    poisoned = PoisonedSamples(torch.full((10, 3, 8, 8), 255, dtype=torch.uint8), torch.arange(10) % 3)
    tuning = _tuning(clean, torch.zeros(6, dtype=torch.long), ep_poison_num=0)
    tuning.poisoned = poisoned
    images, labels, added = ep.ep_training_set(tuning)
    assert added == 10 and len(images) == 16 and torch.equal(labels[6:], poisoned.true_labels)
    tuning.settings.extra["ep_poison_num"] = 4
    images, labels, added = ep.ep_training_set(tuning)
    assert added == 4 and len(images) == 10 and bool((images[6:] == 255).all())
    assert ALL_MODES["ep"].needs_poisoned and "BackdoorBench" in ALL_MODES["ep"].summary


# --- end to end through ft.py ----------------------------------------------------------------------

def test_ep_fp_clp_run_end_to_end(badnet_record, tiny_cifar10, tmp_path, capsys):
    folder = copy_record(badnet_record, tmp_path)
    results = finetune.main(["--dataset", "cifar10", "--dataset_path", str(tiny_cifar10), "--model", "smallcnn",
                             "--record_root", str(tmp_path), "--attack", "badnet", "--device", "cpu",
                             "--ft_mode", "ep,fp,clp", "--epochs", "1", "--split_ratio", "0.2", "--progress", "false",
                             "--fp_once_prune_ratio", "0.25", "--fp_acc_data", "tuning", "--fp_acc_ratio", "1"])
    assert set(results) == {"ep", "fp", "clp"}
    captured = capsys.readouterr()
    out_text = captured.out
    # clp is data-free: the shared tuning flags given for ep and fp are said to be ignored for it, once each
    assert [line for line in captured.err.splitlines() if line.startswith("warning:")] == [
        "warning: --ft_mode clp does not use --split_ratio; it is ignored for this mode",
        "warning: --ft_mode clp does not use --epochs; it is ignored for this mode"]
    assert "data-free pruning at u = 3.0" in out_text and "1 epochs, lr" in out_text.split("[fp] tuning on")[1]
    record = torch.load(folder / "attack_result.pt", weights_only=True)
    out = {m: folder / "defense" / m for m in results}
    res = {m: json.loads((out[m] / "result.json").read_text()) for m in results}
    assert res["ep"]["ep"]["poisoned_images"] == len(record["poison_indices"]) > 0
    assert res["ep"]["ep"]["clean_images"] == res["ep"]["tuning_size"]
    # fp: the pruned inputs of the head are zero in the saved weights, which load into a plain model
    info = res["fp"]["fp"]
    assert info["layer"] == "linear" and info["channels"] == 256 and info["pruned_channels"] > 0
    assert [r["pruned"] for r in info["search"]][:2] == [0, 64]
    for mode in results:
        state = torch.load(out[mode] / "model.pt", weights_only=True)
        models.build_model("smallcnn", 10).load_state_dict(state, strict=True)
    fp_state = torch.load(out["fp"] / "model.pt", weights_only=True)
    assert torch.all(fp_state["linear.weight"][:, info["pruned"]] == 0)
    assert res["fp"]["args"]["batch_size"] == 256 and res["fp"]["args"]["wd"] == 5e-4
    # clp: BN scale and shift of the pruned channels are zero; nothing else moved
    pruned = res["clp"]["clp"]["pruned"]
    clp_state = torch.load(out["clp"] / "model.pt", weights_only=True)
    for bn_name, channels in pruned.items():
        assert torch.all(clp_state[f"{bn_name}.weight"][channels] == 0)
        assert torch.all(clp_state[f"{bn_name}.bias"][channels] == 0)
    changed = {k for k, v in clp_state.items() if not torch.equal(v, record["model"][k].to(v.dtype))}
    assert changed <= {f"{n}.{p}" for n in pruned for p in ("weight", "bias")}
    assert len((out["clp"] / "metrics.csv").read_text().splitlines()) == 2


def test_bad_mode_settings_are_one_error_line(badnet_record, tiny_cifar10, tmp_path):
    copy_record(badnet_record, tmp_path)
    base = ["--dataset", "cifar10", "--dataset_path", tiny_cifar10, "--model", "smallcnn", "--record_root", tmp_path,
            "--attack", "badnet", "--device", "cpu", "--progress", "false"]
    cases = [
        (["--ft_mode", "fp", "--fp_acc_ratio", "1.5"], "--fp_acc_ratio must be within [0, 1]"),
        (["--ft_mode", "clp", "--clp_u", "nan"], "--clp_u must be a finite number"),
        (["--ft_mode", "ep", "--ep_poison_num", "-3"], "--ep_poison_num must be 0 or positive"),
    ]
    before = snapshot(tmp_path)
    with ThreadPoolExecutor(len(cases)) as pool:
        procs = list(pool.map(lambda case: run_script(FT, [*base, *case[0]]), cases))
    for proc, (_, message) in zip(procs, cases):
        assert_user_error(proc, message)
    assert_unchanged(before, tmp_path)
    # the other checks of the schema, in process (each subprocess costs seconds of torch start-up)
    for flags, message in [(["--fp_once_prune_ratio", "0"], r"--fp_once_prune_ratio must be within \(0, 1\]"),
                           (["--fp_acc_data", "val"], "--fp_acc_data must be one of test, tuning")]:
        with pytest.raises(UserError, match=message):
            finetune.parse_args(["--dataset", "cifar10", "--attack", "badnet", "--model", "smallcnn", *flags])
