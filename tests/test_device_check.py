"""`python -m utils.device_check` (sh/device_check.sh): the table, its JSON, the exit status, and its
own bad input, on the CPU with the tiny size and a couple of steps (the full set runs on a GPU)."""
from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

from utils.attacks.registry import ATTACKS
from utils.data.datasets import load_dataset
from utils.errors import UserError
from utils.tools import device_check


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.device_check", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True)


def test_a_short_check_prints_the_table_and_writes_it(tmp_path):
    out = tmp_path / "out"
    proc = _run("--device", "cpu", "--size", "tiny", "--attacks", "badnet", "--modes", "ft", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| step | ok | seconds | images/s | note |" in proc.stdout
    for step in ("attack badnet", "mode ft", "bench"):
        assert f"| {step} | yes |" in proc.stdout, proc.stdout
    assert "3 of 3 steps ok" in proc.stdout
    table = json.loads((out / "device_check.json").read_text())
    assert [r["step"] for r in table["rows"]] == ["attack badnet", "mode ft", "bench"]
    assert all(r["ok"] and r["seconds"] > 0 and r["img_per_s"] > 0 for r in table["rows"]), table["rows"]
    assert table["size"] == "tiny" and table["model"] == "smallcnn" and table["device"].startswith("cpu")
    assert (out / "device_check.md").read_text().startswith("Device check on cpu (")


def test_a_failing_step_is_a_row_and_the_exit_status(tmp_path, monkeypatch, capsys):
    """An attack that fails gives a row with ok = no and its error line; the purification that
    needed its record fails with a reason instead of running; the exit status is 1."""
    failing = tmp_path / "failing_attack.py"
    failing.write_text("import sys\nprint('training...')\nprint('error: the GPU caught fire', file=sys.stderr)\n"
                       "sys.exit(2)\n")
    monkeypatch.setattr(device_check, "attack_scripts", lambda: {"badnet": failing})
    status = device_check.main(["--device", "cpu", "--attacks", "badnet", "--modes", "fst", "--bench", "false",
                                "--work_dir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert status == 1
    assert "| attack badnet | no | " in printed and "error: the GPU caught fire |" in printed, printed
    assert "| mode fst | no | " in printed and "no attack record to purify" in printed
    assert "0 of 2 steps ok; failed: attack badnet, mode fst" in printed
    assert (tmp_path / "work" / "logs" / "attack_badnet.log").read_text().count("the GPU caught fire") == 1


def test_every_registered_attack_has_an_entry_script():
    assert set(device_check.attack_scripts()) == set(ATTACKS)


def test_the_generated_data_is_cifar10_as_the_loader_reads_it(tmp_path):
    root = device_check.write_cifar10(tmp_path, device_check.SIZES["tiny"])
    train, test = load_dataset("cifar10", root, train=True), load_dataset("cifar10", root, train=False)
    assert tuple(train.images.shape) == (100, 3, 32, 32) and tuple(test.images.shape) == (50, 3, 32, 32)
    assert sorted(set(train.labels.tolist())) == list(range(10))
    with open(root / "cifar10" / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (20, 3072)


def test_bad_input_is_one_error_line(tmp_path):
    proc = _run("--device", "cpu", "--attacks", "badnett")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "--attacks: unknown attack badnett; choose from: badnet" in errors[0], proc.stderr


def test_bad_input_is_refused_before_anything_runs(tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("keep")
    work = tmp_path / "work"
    for args, fragment in ((["--modes", "fts"], "--modes: unknown mode fts"),
                           (["--model", "resnet99"], "unknown --model 'resnet99'"),
                           (["--out", str(afile)], "is a file"),
                           (["--timeout", "-1"], "--timeout"),
                           (["--work_dir", str(tmp_path)], "is not an empty folder")):
        with pytest.raises(UserError, match=re.escape(fragment)):
            device_check.main(["--device", "cpu", "--work_dir", str(work), *args])
    assert afile.read_text() == "keep" and not work.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
