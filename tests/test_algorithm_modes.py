"""The extension point for defenses that are not a variant of the fine-tuning loop (`Mode.algorithm`):
ft.py hands the algorithm a copy of the model, the tuning set and, when asked, the record's poisoned
training samples with their true labels; what it reports lands in result.json and the result folder."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import copy_record
from utils.commands import finetune
from utils.defenses import purify as purify_module
from utils.defenses.purify import FINETUNE, Mode, PurifySettings, StepHooks, purify
from utils.config import Option, positive


def _probe_algorithm(seen: dict):
    def algorithm(model, mode, tuning):
        seen["tuning"] = tuning
        seen["scale"] = tuning.option("probe_scale")
        # the shared loop as a fine-tuning phase, with an extra loss term counted per step
        calls = []
        hooks = StepHooks(extra_loss=lambda net, x, y, logits: calls.append(1) or logits.sum() * 0.0,
                          after_step=lambda: calls.append(2))
        tuned, rows = purify(model, FINETUNE, tuning.images, tuning.labels, tuning.pipeline, tuning.settings,
                             tuning.evaluate, tuning.amp, hooks=hooks)
        seen["hook_calls"] = calls
        tuning.result["probe"] = {"poisoned": len(tuning.poisoned.images)}
        tuning.artifacts["probe.txt"] = b"reversed trigger would go here"
        return tuned, rows
    return algorithm


def test_an_algorithm_mode_runs_from_ft_py_and_reports(badnet_record, tiny_cifar10, tmp_path, monkeypatch):
    seen: dict = {}
    mode = Mode("probe", "Probe", False, "all", False, "test algorithm", algorithm=_probe_algorithm(seen),
                needs_poisoned=True, options=(Option("probe_scale", float, 2.5, "probe (default 2.5)", check=positive),))
    monkeypatch.setitem(purify_module.ALL_MODES, "probe", mode)
    monkeypatch.setitem(finetune.ALL_MODES, "probe", mode)
    folder = copy_record(badnet_record, tmp_path)
    finetune.main(["--dataset", "cifar10", "--dataset_path", str(tiny_cifar10), "--model", "smallcnn",
                   "--record_root", str(tmp_path), "--attack", "badnet", "--device", "cpu", "--ft_mode", "probe",
                   "--epochs", "1", "--split_ratio", "0.2", "--probe_scale", "4", "--progress", "false"])
    record = torch.load(folder / "attack_result.pt", weights_only=True)
    tuning = seen["tuning"]
    # the poisoned samples: as many as the record poisoned, with their true labels (the images of
    # every class were poisoned, so the labels are not all the target as the relabelled ones are)
    assert len(tuning.poisoned.images) == len(record["poison_indices"]) > 0
    assert tuning.poisoned.images.dtype == torch.uint8
    assert len(set(tuning.poisoned.true_labels.tolist())) > 1
    # and they carry the trigger: BadNet's patch is white in the bottom-right corner
    assert (tuning.poisoned.images[:, :, -1, -1] == 255).all()
    assert seen["scale"] == 4.0
    assert 1 in seen["hook_calls"] and 2 in seen["hook_calls"]
    out = folder / "defense" / "probe"
    result = json.loads((out / "result.json").read_text())
    assert result["probe"] == {"poisoned": len(record["poison_indices"])}
    assert (out / "probe.txt").read_bytes() == b"reversed trigger would go here"
    assert (out / "model.pt").is_file()


def test_an_algorithm_needing_poisoned_samples_refuses_without_them():
    mode = Mode("probe", "Probe", False, "all", False, "test", algorithm=lambda m, mo, t: (m, []), needs_poisoned=True)
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(Exception, match="poisoned training samples"):
        purify(torch.nn.Linear(1, 1), mode, images, torch.zeros(4, dtype=torch.long), None,
               PurifySettings(epochs=1, lr=0.1, alpha=0.0), lambda net: {})


def test_step_hooks_change_the_shared_loop():
    """An extra loss term that pulls every logit up changes the weights; without it they differ."""
    from utils import engine

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 8 * 8, 4)

        def forward(self, x):
            return self.linear(x.flatten(1))

    torch.manual_seed(0)
    net = Net()
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(8) % 4
    pipe = engine.Pipeline(mean=torch.full((1, 3, 1, 1), 0.5), std=torch.full((1, 3, 1, 1), 0.25),
                           input_size=8, native_size=8, flip=False, pad=0)
    settings = PurifySettings(epochs=1, lr=0.1, alpha=0.0, batch_size=4, progress=False, linear_name="linear")
    fake_eval = lambda n: {"clean_acc": 0.0, "asr": 0.0, "ra": 0.0}  # noqa: E731
    plain, _ = purify(net, FINETUNE, images, labels, pipe, settings, fake_eval)
    pulled, _ = purify(net, FINETUNE, images, labels, pipe, settings, fake_eval,
                       hooks=StepHooks(extra_loss=lambda n, x, y, logits: -logits.mean() * 10))
    assert not torch.allclose(plain.linear.bias, pulled.linear.bias)
    assert F.mse_loss(plain.linear.weight, net.linear.weight) > 0  # both trained
