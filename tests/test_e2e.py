"""End to end: a real BadNet backdoor on real Fashion-MNIST, purified with FST; and a Blended
all-to-all run on the tiny CIFAR-10 of conftest, purified as well."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import attack_argv
from utils.commands.finetune import main as ft_main
from utils.record.store import load_record
from utils.victim.experiment import rebuild_experiment
from utils.victim.train import run_attack

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Tuned on a shared 2-core CPU with one thread: ~60 s for the attack. Seed 0 reaches ASR 0.95 and
# C-Acc 0.79 after the fourth epoch (0.90 / 0.75 after the third), so the thresholds below hold with
# some margin; smaller budgets leave the BadNet trigger only half learnt.
FMNIST_ATTACK = ["--yaml_path", "config/attack/prototype/fmnist.yaml", "--train_subset", "6000",
                 "--test_subset", "1000", "--epochs", "4", "--batch_size", "32", "--device", "cpu",
                 "--download", "false", "--progress", "false"]


@pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_badnet_then_fst_on_real_fashion_mnist(tmp_path):
    root = tmp_path / "record"
    folder = run_attack("badnet", FMNIST_ATTACK + ["--record_root", str(root), "--dataset_path", str(FMNIST_DIR)])
    assert folder == root / "fmnist" / "badnet" / "pratio_0.1-target_0-archi_smallcnn"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["train_size"] == 6000 and summary["poisoned"] == 600
    assert summary["asr"] >= 0.9, summary
    assert summary["clean_acc"] >= 0.7, summary

    results = ft_main(["--attack", "badnet", "--dataset", "fmnist", "--model", "smallcnn", "--ft_mode", "fst",
                       "--epochs", "2", "--device", "cpu", "--record_root", str(root),
                       "--dataset_path", str(FMNIST_DIR), "--progress", "false"])
    result = json.loads((folder / "defense" / "fst" / "result.json").read_text())
    assert result["ft_mode"] == "fst"
    assert result["tuning_size"] == 1200  # 2% of the full 60k training set
    # the record's model, re-evaluated on the rebuilt test sets, is the backdoored one
    assert result["before"]["asr"] >= 0.9
    assert result["before"]["asr"] == pytest.approx(summary["asr"], abs=0.02)
    assert result["before"]["clean_acc"] == pytest.approx(summary["clean_acc"], abs=0.02)
    for key in ("clean_acc", "asr", "ra"):
        assert 0.0 <= result["after"][key] <= 1.0
    assert result["after"] == pytest.approx(results["fst"])
    assert result["der"] == pytest.approx(
        (max(0.0, result["before"]["asr"] - result["after"]["asr"])
         - max(0.0, result["before"]["clean_acc"] - result["after"]["clean_acc"]) + 1) / 2)
    print(f"fmnist badnet: before {result['before']}, after fst {result['after']}, DER {result['der']:.3f}")


def test_blended_all2all_on_tiny_cifar10(tmp_path, tiny_cifar10):
    root = tmp_path / "record"
    folder = run_attack("blended", attack_argv(tiny_cifar10, root, "--attack_label_trans", "all2all"))
    assert folder == root / "cifar10" / "blended" / "pratio_0.1-target_0-archi_smallcnn"
    for name in ("attack_result.pt", "config.yaml", "metrics.csv", "summary.json"):
        assert (folder / name).is_file(), name
    record = load_record(folder)
    assert record["attack"] == "blended" and record["attack_label_trans"] == "all2all"
    assert record["trigger"]["alpha"] == pytest.approx(0.2)
    assert tuple(record["trigger"]["key"].shape) == (3, 32, 32)
    assert len(record["poison_indices"]) == 30

    # all-to-all: every test image is in the backdoor test set, each with label (y + 1) mod 10
    exp = rebuild_experiment(record, str(tiny_cifar10), torch.device("cpu"))
    assert len(exp.bd_test.targets) == len(exp.clean_test.labels) == 100
    assert torch.equal(exp.bd_test.targets, (exp.bd_test.true_labels + 1) % 10)
    # poisoned training images are relabelled the same way
    idx = exp.poison_indices
    assert torch.equal(exp.train.labels[idx], (exp.clean_train.labels[idx] + 1) % 10)

    results = ft_main(["--attack", "blended", "--attack_label_trans", "all2all", "--dataset", "cifar10",
                       "--model", "smallcnn", "--ft_mode", "fst", "--epochs", "1", "--split_ratio", "0.1",
                       "--device", "cpu", "--record_root", str(root), "--dataset_path", str(tiny_cifar10),
                       "--progress", "false"])
    result = json.loads((folder / "defense" / "fst" / "result.json").read_text())
    assert result["after"] == pytest.approx(results["fst"])
    assert result["tuning_size"] == 30
