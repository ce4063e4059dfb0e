"""What a user reads when the output does not go to a terminal (a log file, a pipe, a CI job): no
progress bar, one line per epoch, in the order things happened; and the "no record" message that
points to records kept in a sub-folder of the root (the quickstart's record/quickstart/)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, RECORD_REL, copy_record

from utils.config import parse_progress
from utils.errors import UserError
from utils.record.layout import find_record


# as a user's shell has it: Python's default buffering (this machine's environment sets
# PYTHONUNBUFFERED, which would hide a block-buffered stdout)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def _tiny_attack(data_root: Path, record_root: Path) -> list[str]:
    """conftest's tiny BadNet run, but with `--progress` left at its default (auto)."""
    return [sys.executable, "attack/badnet.py", "--yaml_path", "config/attack/prototype/cifar10.yaml",
            "--dataset_path", str(data_root), "--download", "false", "--model", "smallcnn", "--epochs", "2",
            "--device", "cpu", "--record_root", str(record_root), "--batch_size", "32"]


def _clean(text: str) -> None:
    assert "\r" not in text, "a progress bar (carriage return) reached the log"
    assert "\x1b" not in text, "terminal escape codes reached the log"


def test_attack_logged_to_files_reads_cleanly_in_order(tiny_cifar10, tmp_path):
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.run(_tiny_attack(tiny_cifar10, tmp_path / "record"), cwd=REPO_ROOT, stdout=fo, stderr=fe, env=ENV)
    stdout, stderr = out.read_text(), err.read_text()
    assert proc.returncode == 0, stderr
    _clean(stdout)
    _clean(stderr)
    lines = stdout.splitlines()
    epochs = [i for i, line in enumerate(lines) if line.startswith("epoch ")]
    written = [i for i, line in enumerate(lines) if line.startswith("record written to")]
    assert len(epochs) == 2 and [lines[i].split()[1] for i in epochs] == ["1", "2"], stdout
    assert len(written) == 1 and epochs[-1] < written[0], stdout


def test_purification_through_a_pipe_prints_one_line_per_epoch(badnet_record, tiny_cifar10, tmp_path):
    root = tmp_path / "record"
    copy_record(badnet_record, root)
    proc = subprocess.run([sys.executable, "fine_tune/ft.py", "--record_root", str(root), "--dataset_path",
                           str(tiny_cifar10), "--dataset", "cifar10", "--attack", "badnet", "--model", "smallcnn",
                           "--device", "cpu", "--epochs", "2", "--ft_mode", "ft"],
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    _clean(proc.stdout)
    _clean(proc.stderr)
    lines = proc.stdout.splitlines()
    epochs = [i for i, line in enumerate(lines) if line.startswith("[ft] epoch")]
    done = [i for i, line in enumerate(lines) if line.startswith("ft: C-Acc")]
    assert len(epochs) == 2 and len(done) == 1 and epochs[-1] < done[0], proc.stdout


def test_stdout_and_stderr_interleave_in_time_order_when_sharing_a_file(tmp_path):
    """Python block-buffers a redirected stdout; run_cli makes it line-buffered, so a stderr line
    written between two stdout lines stays between them in a `> log 2>&1` file."""
    code = ("import sys; from utils.errors import run_cli\n"
            "def main():\n"
            "    print('first (stdout)')\n"
            "    print('second (stderr)', file=sys.stderr)\n"
            "    print('third (stdout)')\n"
            "run_cli(main)\n")
    log = tmp_path / "both.log"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    assert proc.returncode == 0
    assert log.read_text().splitlines() == ["first (stdout)", "second (stderr)", "third (stdout)"]


def test_progress_auto_is_off_without_a_terminal_and_explicit_values_win():
    # under pytest stdout is captured, so `auto` resolves to no bars
    assert parse_progress("auto") is False and parse_progress("AUTO") is False
    assert parse_progress("true") is True and parse_progress(False) is False


# --- the "no record" message ------------------------------------------------------------------------

def test_missing_record_names_the_subfolder_that_holds_it(badnet_record, tmp_path):
    """After the quickstart the record sits in record/quickstart/, not record/: the error says so
    and gives the --record_root that finds it."""
    root = tmp_path / "record"
    copy_record(badnet_record, root / "quickstart")
    try:
        find_record(root, "cifar10", "badnet", 0.1, 0, "smallcnn")
    except UserError as err:
        message = str(err)
    else:
        raise AssertionError("no error for a missing record")
    assert f"this record exists under {root / 'quickstart'}: add --record_root {root / 'quickstart'}" in message
    assert "\n" not in message


def test_missing_record_lists_other_records_of_subfolders(badnet_record, tmp_path):
    root = tmp_path / "record"
    copy_record(badnet_record, root / "seed_1")
    try:
        find_record(root, "cifar10", "badnet", 0.05, 0, "smallcnn")
    except UserError as err:
        message = str(err)
    else:
        raise AssertionError("no error for a missing record")
    assert str(Path("seed_1") / RECORD_REL) in message and f"--record_root {root / 'seed_1'}" in message


def test_ft_py_missing_record_is_one_error_line_with_the_hint(badnet_record, tiny_cifar10, tmp_path):
    root = tmp_path / "record"
    copy_record(badnet_record, root / "quickstart")
    before = sorted(str(p) for p in root.rglob("*"))
    proc = subprocess.run([sys.executable, "fine_tune/ft.py", "--record_root", str(root), "--dataset_path",
                           str(tiny_cifar10), "--dataset", "cifar10", "--attack", "badnet", "--model", "smallcnn",
                           "--device", "cpu", "--epochs", "1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--record_root {root / 'quickstart'}" in errors[0], proc.stderr
    assert sorted(str(p) for p in root.rglob("*")) == before
