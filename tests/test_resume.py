"""A killed attack run resumes from its last finished epoch and ends with the same model as an
uninterrupted run; a checkpoint from other settings is not reused."""
from __future__ import annotations

import torch

from conftest import attack_argv
from utils import engine
from utils.record.layout import CHECKPOINT_FILE
from utils.victim import train as victim


def _interrupt_at_epoch(monkeypatch, n: int):
    real = engine.train_epoch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_epoch", flaky)


def _weights(folder):
    return torch.load(folder / "attack_result.pt", weights_only=True)["model"]


def test_killed_run_resumes_to_identical_model(tiny_cifar10, tmp_path, monkeypatch, capsys):
    argv = attack_argv(tiny_cifar10, tmp_path / "a", "--epochs", "3")
    _interrupt_at_epoch(monkeypatch, 2)
    try:
        victim.run_attack("badnet", argv)
        raise AssertionError("the interrupted run should not finish")
    except KeyboardInterrupt:
        pass
    final = tmp_path / "a" / "cifar10" / "badnet" / "pratio_0.1-target_0-archi_smallcnn"
    partial = final.parent / f".{final.name}.partial"
    assert not final.exists(), "an interrupted run must not look finished"
    assert (partial / CHECKPOINT_FILE).exists()
    monkeypatch.undo()

    resumed = victim.run_attack("badnet", argv)
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert not partial.exists() and not (resumed / CHECKPOINT_FILE).exists()
    rows = (resumed / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3  # header + every epoch, the one before the kill included

    straight = victim.run_attack("badnet", attack_argv(tiny_cifar10, tmp_path / "b", "--epochs", "3"))
    a, b = _weights(resumed), _weights(straight)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_other_settings_is_ignored(tiny_cifar10, tmp_path, monkeypatch, capsys):
    _interrupt_at_epoch(monkeypatch, 2)
    try:
        victim.run_attack("badnet", attack_argv(tiny_cifar10, tmp_path, "--epochs", "2"))
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    folder = victim.run_attack("badnet", attack_argv(tiny_cifar10, tmp_path, "--epochs", "2", "--lr", "0.05"))
    captured = capsys.readouterr()
    assert "other settings" in captured.err
    assert "resuming" not in captured.out
    assert len((folder / "metrics.csv").read_text().strip().splitlines()) == 1 + 2
