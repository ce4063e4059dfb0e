"""QRA (`fine_tune/qra.py`): the bounded, seeded perturbation generator, its training loop, and the
CLI end to end on a copy of the BadNet record with fabricated purified/retuned models."""
from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import RECORD_REL, copy_record
from utils import engine
from utils.errors import UserError, run_cli
from utils.data.datasets import ImageSet
from utils.attacks.poison import BackdoorTestSet, PoisonedTrainSet
from utils.robustness.qra import (AttackSamples, FrozenModel, PerturbationGenerator, QRASettings, parse_args,
                                  draw_samples, evaluate, main, train_generator)
from utils.record.store import clean_state_dict, load_record, save_torch

EPS = 16 / 255
CLEAN_REL = RECORD_REL.parent / "pratio_0.0-target_0-archi_smallcnn"


# --- the generator ----------------------------------------------------------------------------

@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_perturbation_stays_within_eps_and_range(amp):
    gen = PerturbationGenerator((3, 8, 8), hidden=16, eps=EPS, seed=0)
    with torch.no_grad():  # saturate tanh so that the bound, not the init, is what is tested
        gen.net[-1].weight.mul_(1000.0)
        gen.net[-1].bias.mul_(1000.0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(32, 3, 8, 8, generator=g)
    x[:4] = 0.0
    x[4:8] = 1.0
    with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        out = gen.perturb(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert float((out - x).abs().max()) <= EPS + 1e-6
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - x).abs().max()) > 0.9 * EPS  # saturated: the perturbation does reach the bound
    with torch.no_grad():
        assert float(gen(x).abs().max()) <= EPS + 1e-7


def test_generator_is_deterministic_with_seed():
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    a, b, c = (PerturbationGenerator((1, 6, 6), hidden=12, eps=EPS, seed=s) for s in (3, 3, 4))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))
    # the global RNG is neither used nor advanced
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    PerturbationGenerator((1, 6, 6), hidden=12, eps=EPS, seed=3)
    assert torch.equal(torch.rand(1), before)


def test_default_generator_is_the_official_mlp_on_the_normalised_image():
    """D -> 1024 -> 1024 -> 1024 -> D with ReLU between, fed the normalised image; δ = eps * tanh(.)
    added to the pixels and clipped. Recomputed here layer by layer from the generator's weights."""
    shape, mean, std = (2, 4, 4), torch.tensor([0.3, 0.6]), torch.tensor([0.2, 0.4])
    gen = PerturbationGenerator(shape, eps=EPS, seed=0, mean=mean, std=std)
    linears = [m for m in gen.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 1024), (1024, 1024), (1024, 1024), (1024, 32)]
    assert sum(isinstance(m, nn.ReLU) for m in gen.net) == 3 and isinstance(gen.net[-1], nn.Linear)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(2))
    normalised = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    h = normalised.flatten(1)
    for i, layer in enumerate(linears):
        h = h @ layer.weight.T + layer.bias
        if i < len(linears) - 1:
            h = torch.relu(h)
    delta = torch.clamp(torch.tanh(h) * EPS, -EPS, EPS).view(5, *shape)
    expected = torch.clamp(normalised * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1) + delta, 0, 1)
    with torch.no_grad():
        assert torch.allclose(gen.perturb(x), expected, atol=1e-6)
        # the same weights on the [0, 1] pixels (the earlier toolkit generator's input) give another δ
        pixels = PerturbationGenerator(shape, eps=EPS, seed=0)
        assert not torch.allclose(pixels(x), gen(x), atol=1e-4)
    assert "mean" not in gen.state_dict()  # the statistics come from the dataset, not the checkpoint
    args = parse_args([])
    assert (args.hidden, args.generator_input, args.poison_source) == ("1024,1024,1024", "normalised", "record")


def _poisoned_train(n: int, target: int, poisoned: list[int], true: list[int]) -> PoisonedTrainSet:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 200, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
    true_labels = torch.tensor(true)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[poisoned] = True
    images[mask] = 255  # the "trigger" of these fabricated poisoned images
    labels = torch.where(mask, torch.full_like(true_labels, target), true_labels)
    return PoisonedTrainSet(images, labels, true_labels, mask)


def _patch(x: torch.Tensor) -> torch.Tensor:  # a test-time trigger that is easy to recognise
    x = x.clone()
    x[..., 0, 0] = 7
    return x


def test_qra_poisoned_samples_are_the_victims_own_poisoned_training_images():
    n, target = 40, 0
    true = [i % 4 for i in range(n)]
    recorded = [1, 2, 3, 4, 5, 6]  # 4 is of the target class: left out, as officially
    poisoned_train = _poisoned_train(n, target, recorded, true)
    clean = ImageSet(torch.randint(0, 200, (n, 1, 4, 4), generator=torch.Generator().manual_seed(6), dtype=torch.uint8),
                     torch.tensor(true))
    samples, n_recorded = draw_samples(clean, _patch, target, "all2one", 4, 10, 4, seed=0, poisoned_train=poisoned_train)
    assert n_recorded == 4 and int(samples.poisoned.sum()) == 4 and len(samples.labels) == 14
    got = samples.images[samples.poisoned]
    assert (got == 255).all()  # the recorded images, not triggered clean ones
    # a seeded choice among the five eligible ones, with their true labels (target class excluded)
    eligible = {i: true[i] for i in recorded if true[i] != target}
    assert set(samples.labels[samples.poisoned].tolist()) <= set(eligible.values())
    assert (samples.targets[samples.poisoned] == target).all()
    # too few recorded: all five, topped up with triggered clean non-target images
    more, n_recorded = draw_samples(clean, _patch, target, "all2one", 4, 10, 8, seed=0, poisoned_train=poisoned_train)
    assert n_recorded == 5 and int(more.poisoned.sum()) == 8
    tail = more.images[more.poisoned]
    assert (tail[:5] == 255).all() and (tail[5:, :, 0, 0] == 7).all() and (more.labels[more.poisoned][5:] != target).all()
    # --poison_source trigger: the earlier behaviour, every poisoned sample made with the test trigger
    made, n_recorded = draw_samples(clean, _patch, target, "all2one", 4, 10, 4, seed=0)
    assert n_recorded == 0 and (made.images[made.poisoned][:, :, 0, 0] == 7).all()
    assert torch.equal(made.images[~made.poisoned], samples.images[~samples.poisoned])  # same clean draw


def test_clean_to_target_is_the_share_of_clean_images_predicted_as_the_target():
    net = _linear_net(0)
    g = torch.Generator().manual_seed(3)
    clean_test = ImageSet(torch.randint(0, 256, (50, 1, 4, 4), generator=g, dtype=torch.uint8),
                          torch.randint(0, 3, (50,), generator=g))
    bd = BackdoorTestSet(clean_test.images[:10], torch.zeros(10, dtype=torch.long), clean_test.labels[:10], torch.arange(10))
    pred = net.logits(clean_test.images.float() / 255).argmax(1)
    for target in range(3):
        out = evaluate(net, clean_test, bd, torch.full((50,), target))
        assert out["clean_to_target"] == pytest.approx(float((pred == target).float().mean()))
    # every image is predicted as some class: the three shares add up to one
    assert sum(evaluate(net, clean_test, bd, torch.full((50,), t))["clean_to_target"] for t in range(3)) == pytest.approx(1)


def _linear_net(seed: int) -> FrozenModel:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    pipe = engine.Pipeline(torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), 4, 4, False)
    return FrozenModel(model, pipe)


def test_train_generator_lowers_the_loss_and_freezes_the_models():
    purified, retuned, clean = _linear_net(0), _linear_net(1), _linear_net(2)
    frozen = [p.clone() for p in purified.model.parameters()]
    g = torch.Generator().manual_seed(0)
    n = 64
    labels = torch.randint(0, 3, (n,), generator=g)
    samples = AttackSamples(torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8), labels,
                            torch.zeros(n, dtype=torch.long), torch.arange(n) % 2 == 0)
    settings = QRASettings(eps=64 / 255, epochs=15, lr=0.1, batch_size=16, hidden=32, seed=0, progress=False)
    gen, rows = train_generator(purified, retuned, clean, samples, settings)
    assert [r["epoch"] for r in rows] == list(range(1, 16))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(0.0 <= r["train_asr_purified"] <= 1.0 and 0.0 <= r["imitation"] <= 1.0 for r in rows)
    assert all(torch.equal(a, b) for a, b in zip(frozen, purified.model.parameters()))
    again, rows2 = train_generator(purified, retuned, clean, samples, settings)
    assert rows2[-1]["loss"] == rows[-1]["loss"]  # same seed, same run
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in gen.state_dict().items())


# --- the command line -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qra_root(badnet_record, tmp_path_factory) -> Path:
    """A record root holding a copy of the BadNet record, the inputs ft_poison.py would leave
    (defense/fst/model.pt and defense/fst/retune/model.pt, here the record's own weights) and a
    clean reference under the pratio-0 name (a copy of the same record)."""
    root = tmp_path_factory.mktemp("qra-root")
    folder = copy_record(badnet_record, root)
    weights = clean_state_dict(load_record(folder)["model"])
    save_torch(folder / "defense" / "fst" / "model.pt", weights)
    save_torch(folder / "defense" / "fst" / "retune" / "model.pt", weights)
    copy_record(badnet_record, root, CLEAN_REL)
    return root


def _argv(data_root: Path, root: Path, *extra: str) -> list[str]:
    return ["--dataset", "cifar10", "--model", "smallcnn", "--dataset_path", str(data_root), "--record_root", str(root),
            "--epochs", "2", "--n_clean", "20", "--n_poison", "20", "--batch_size", "40", "--hidden", "32",
            "--device", "cpu", "--amp", "none", "--progress", "false", *extra]


def _run(argv):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trained with pratio")  # the fabricated clean record
        return main(argv)


def test_cli_end_to_end_writes_results_and_refuses_overwrite(tiny_cifar10, qra_root, capsys):
    out = qra_root / RECORD_REL / "defense" / "fst" / "qra"
    result = _run(_argv(tiny_cifar10, qra_root))
    assert Path(result["folder"]) == out
    data = json.loads((out / "result.json").read_text())
    assert data["defense_type"] == "fst" and data["record"] == str(RECORD_REL)
    assert data["clean_record"] == str(CLEAN_REL)
    assert data["settings"]["n_clean"] == 20 and data["settings"]["n_poison"] == 20
    assert data["settings"]["eps"] == pytest.approx(EPS)
    assert set(data["before"]) == {"retuned", "purified", "clean"} and set(data["after"]) == {"purified", "clean"}
    for group in (data["before"], data["after"]):
        for numbers in group.values():
            assert all(0.0 <= numbers[k] <= 1.0 for k in ("clean_acc", "asr", "ra", "clean_to_target"))
    # the tiny record holds enough poisoned non-target training images: all 20 are the victim's own
    assert (data["settings"]["poison_source"], data["settings"]["n_poison_recorded"]) == ("record", 20)
    assert data["settings"]["hidden"] == [32] and data["settings"]["normalised_input"] is True
    assert data["before"]["purified"] == data["before"]["retuned"]  # same weights fabricated for both
    assert str(tiny_cifar10) not in json.dumps(data["args"])  # no absolute paths
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"loss", "ce_clean", "kl", "train_asr_purified", "train_asr_clean"} <= set(rows[0])
    assert (out / "config.yaml").is_file()
    state = torch.load(out / "generator.pt", weights_only=True)
    gen = PerturbationGenerator((3, 32, 32), hidden=32, eps=EPS)
    gen.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert float((gen.perturb(x) - x).abs().max()) <= EPS + 1e-6
    printed = capsys.readouterr().out
    assert "ASR+δ" in printed and "C+δ→tgt" in printed and "clean + δ predicted as the target" in printed
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left

    stamp = (out / "result.json").stat().st_mtime_ns
    with pytest.raises(UserError, match="already exists"):
        _run(_argv(tiny_cifar10, qra_root))
    assert (out / "result.json").stat().st_mtime_ns == stamp
    again = _run(_argv(tiny_cifar10, qra_root, "--overwrite", "true"))
    assert (out / "result.json").stat().st_mtime_ns != stamp
    assert again["after"] == result["after"]  # same seed, same numbers


def _error(argv) -> str:
    with pytest.raises(UserError) as info:
        _run(argv)
    return str(info.value)


def test_clear_errors(tiny_cifar10, qra_root, tmp_path, capsys):
    base = _argv(tiny_cifar10, qra_root)
    assert "no record" in _error(base + ["--attack_target", "3"])
    assert "no purified model" in _error(base + ["--defense_type", "ft"])
    msg = _error(base + ["--retune_tag", "x"])
    assert "retune_x" in msg and "ft_poison.py" in msg and "--defense_type fst" in msg
    assert "--eps" in _error(base + ["--eps", "0"])
    assert "--n_poison must be positive" in _error(base + ["--n_poison", "0"])  # names the flag that is wrong
    assert "--clean_record" in _error(base + ["--clean_record", str(tmp_path / "nowhere")])
    # a record root without a pratio-0 record
    lonely = copy_record(qra_root / RECORD_REL, tmp_path / "lonely")
    shutil.rmtree(lonely / "defense" / "fst" / "qra", ignore_errors=True)  # the end-to-end test's result
    assert "no clean reference model" in _error(_argv(tiny_cifar10, tmp_path / "lonely"))
    # a clean record of another dataset
    other = copy_record(qra_root / CLEAN_REL, tmp_path / "other")
    rec = load_record(other)
    rec["dataset"] = "gtsrb"
    save_torch(other / "attack_result.pt", rec)
    assert "gtsrb" in _error(base + ["--clean_record", str(other)])
    assert not (lonely / "defense" / "fst" / "qra").exists()
    # through the entry point's wrapper: one line, exit status 2
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(base + ["--eps", "-1"]))
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --eps")
