"""`--amp none` means full precision everywhere: the GPU reproduction script passes it (its
default) to every step that trains or evaluates, and cached attack resources made under autocast are
never reused by a full-precision run."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO_ROOT
from utils.attacks import lc, lf, surrogate
from utils.data.datasets import ImageSet, dataset_info


def _calls(tmp_path: Path, env_extra: dict[str, str]) -> list[list[str]]:
    """Run sh/repro_cifar10.sh with a stand-in for sh/install.sh whose $PY only records its
    arguments (nothing is installed or trained); return the argument lists."""
    (tmp_path / "sh").mkdir()
    shutil.copy(Path(REPO_ROOT) / "sh" / "repro_cifar10.sh", tmp_path / "sh" / "repro_cifar10.sh")
    log = tmp_path / "calls.txt"
    fake_py = tmp_path / "fake_python"
    fake_py.write_text(f'#!/usr/bin/env bash\nprintf "%s\\x1f" "$@" >> {log}\necho >> {log}\n')
    fake_py.chmod(0o755)
    (tmp_path / "sh" / "install.sh").write_text(f"PY={fake_py}\n")
    env = {**os.environ, "ATTACKS": "badnet", "PRATIOS": "0.1", "SEEDS": "0", **env_extra}
    subprocess.run(["bash", str(tmp_path / "sh" / "repro_cifar10.sh")], check=True, env=env, cwd=tmp_path)
    return [line.split("\x1f")[:-1] for line in log.read_text().splitlines() if line]


def _extra(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1:] if "--" in argv else []


@pytest.mark.parametrize("amp,expected", [(None, "none"), ("auto", "auto")])
def test_repro_cifar10_passes_the_precision_to_attacks_and_purification(tmp_path, amp, expected):
    calls = _calls(tmp_path, {} if amp is None else {"AMP": amp})
    sweeps = {argv[2]: argv for argv in calls if argv[:2] == ["-m", "utils.sweep"]}
    assert set(sweeps) == {"attacks", "purify"}
    for kind, argv in sweeps.items():
        extra = _extra(argv)
        assert "--amp" in extra, f"{kind} sweep does not pass --amp to its jobs"
        assert extra[extra.index("--amp") + 1] == expected


# --- cached attack resources ---------------------------------------------------------------------

class _KeyCaught(Exception):
    pass


def _catch_key(monkeypatch, module, keys: list) -> None:
    """Make `module.Resource(kind, key, root)` record its key and stop the step right there."""
    def fake(kind, key, root):
        keys.append(key)
        raise _KeyCaught
    monkeypatch.setattr(module, "Resource", fake)


def _resource_ctx(amp):
    labels = torch.arange(20) % 10
    data = ImageSet(torch.zeros(20, 1, 28, 28, dtype=torch.uint8), labels)
    cfg = {"attack_target": 0, "random_seed": 0, "lc_eps": 8.0, "lc_step": 1.5, "lc_steps": 2,
           "lc_surrogate": "standard",
           "lf_eps": 8.0, "lf_cutoff": 0.25, "lf_steps": 2, "lf_step": 1.0, "lf_batch_size": 8,
           "surrogate_record": "", "surrogate_model": "smallcnn", "surrogate_epochs": 1, "model": "smallcnn",
           "epochs": 1, "lr": 0.05, "batch_size": 8, "sgd_momentum": 0.9, "wd": 5e-4, "lr_scheduler": "cosine",
           "input_size": 0, "eval_batch_size": 0}
    return SimpleNamespace(cfg=cfg, info=dataset_info("fmnist"), train=data, test=data, train_indices=None,
                           poison_indices=torch.tensor([0, 10]), device=torch.device("cpu"), amp=amp,
                           progress=False, resource_root="unused")


@pytest.mark.parametrize("kind", ["surrogate", "lc_pgd", "lf_pattern"])
def test_resources_made_in_low_precision_are_not_reused_at_full_precision(monkeypatch, kind):
    """A surrogate, LC's PGD images or LF's pattern computed under bf16 autocast must not be the
    cache hit of an `--amp none` run: the precision is part of their key (absent in fp32, so the
    caches made before stay valid)."""
    keys: list[dict] = []
    if kind == "surrogate":
        _catch_key(monkeypatch, surrogate, keys)
        run = surrogate.get_surrogate
    else:
        module = lc if kind == "lc_pgd" else lf
        _catch_key(monkeypatch, module, keys)
        monkeypatch.setattr(module, "get_surrogate", lambda ctx, adversarial=False: SimpleNamespace(identity={"surrogate": "stub"}))
        run = module._prepare
    for amp in (None, torch.bfloat16):
        with pytest.raises(_KeyCaught):
            run(_resource_ctx(amp))
    full, low = keys
    assert "amp" not in full
    assert low.pop("amp") == "bfloat16"
    assert low == full
