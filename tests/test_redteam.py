"""Findings of the independent hostile trial of the issue-13 work (issue 13, classes 4 and 6).

A one-shot run (ft.py, ft_poison.py, qra.py) killed with -9 leaves its stage `.NAME.partial-<hex>`
beside the result folder. The next run on the same folder takes the stale lock over; it must also
remove that stage, which nothing could ever commit, instead of leaving it there for good."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, attack_argv
from test_cli import ATTACK, FT, PROTOTYPE, assert_unchanged, assert_user_error, ft_args, run_script, snapshot
from test_concurrency import _dead_pid, _leftovers, _write_lock
from utils.commands.driver import finish_run
from utils.record.layout import RESULT_FILE, lock_path, one_shot_stages, stage_path
from utils.record.lock import LostLock
from utils.record.store import StagedFolder


def test_taking_over_a_dead_runs_folder_removes_its_stage(tmp_path):
    final = tmp_path / "defense" / "lp_k"
    dead = stage_path(final, "19b8ce68")
    dead.mkdir(parents=True)
    (dead / "metrics.csv").write_text("epoch\n1\n")
    _write_lock(final, _dead_pid())
    # beside it, what belongs to others: the resumable stage, another result's stage, and the
    # stage of a result whose name starts like this one's
    kept = [stage_path(final), stage_path(final.with_name("lp_kx"), "aa"),
            stage_path(final.with_name("lp_k.partial-b"), "cc")]
    for folder in kept:
        folder.mkdir()
    staged = StagedFolder(final, overwrite=False, what="result", marker=RESULT_FILE)
    assert one_shot_stages(final) == [staged.stage]
    (staged.stage / RESULT_FILE).write_text("{}")
    staged.commit()
    assert (final / RESULT_FILE).is_file()
    assert sorted(_leftovers(tmp_path)) == sorted(str(p.relative_to(tmp_path)) for p in kept)


def test_a_run_that_lost_its_folder_says_so_before_writing(tmp_path):
    final = tmp_path / "defense" / "fst"
    frozen = StagedFolder(final, overwrite=False, what="result", marker=RESULT_FILE)
    lock_path(final).unlink()  # it looked dead (frozen for 10 min); the next run took over
    fresh = StagedFolder(final, overwrite=False, what="result", marker=RESULT_FILE)
    assert not frozen.stage.exists()  # removed with the takeover: it could never be committed
    with pytest.raises(LostLock, match="lost the lock"):
        finish_run(frozen, {"clean_acc": 1.0}, [{"epoch": 1}], {})
    frozen.abort()
    fresh.abort()
    assert _leftovers(tmp_path) == []


# --- class 4: an empty folder flag silently meant the working directory ---------------------------
# `attack/badnet.py --record_root ""` wrote its record as ./cifar10/badnet/... into the folder the
# command ran from (the repository root, in the trial). Now every folder flag refuses an empty value.

@pytest.mark.parametrize("script,flag", [(ATTACK, "--record_root"), (ATTACK, "--dataset_path"),
                                         (ATTACK, "--resource_root"), (FT, "--record_root"),
                                         (FT, "--dataset_path")])
def test_an_empty_folder_flag_is_refused(tmp_path, tiny_cifar10, script, flag):
    if script == ATTACK:
        args = attack_argv(tiny_cifar10, tmp_path / "records")
        args[args.index("--yaml_path") + 1] = str(PROTOTYPE)  # run from tmp_path, not the repository
    else:
        args = ft_args(tmp_path / "records", tiny_cifar10)
    args += [flag, ""]  # the later flag wins
    before = snapshot(tmp_path)
    proc = run_script(str(REPO_ROOT / script), args, cwd=tmp_path)
    assert_user_error(proc, flag, "must name a folder")
    assert_unchanged(before, tmp_path)


def test_a_sweep_with_an_empty_record_root_is_refused(tmp_path):
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "utils.sweep", "attacks", "--record_root", "", "--yaml_path",
                           str(REPO_ROOT / "config/attack/prototype/fmnist.yaml"), "--attacks", "badnet",
                           "--pratios", "0.1", "--dry_run"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert_user_error(proc, "--record_root", "must name a folder")
    assert_unchanged(before, tmp_path)


# --- class 2: names the read-only tools joined into paths -------------------------------------------
# `utils.robustness_table --attacks ../x` looked for <root>/fmnist/../x/... and `utils.plots tsne
# --modes ../x` loaded <record>/defense/../x/model.pt: a name reached outside the record layout.

@pytest.mark.parametrize("argv", [
    ["utils.robustness_table", "{root}", "--attacks", "../x"],
    ["utils.robustness_table", "{root}", "--dataset", "../../etc"],
    ["utils.robustness_table", "{root}", "--model", "a/b"],
    ["utils.robustness_table", "{root}", "--retune_tags", "../../x"],
    ["utils.plots", "tsne", "{root}", "--modes", "../x"],
    ["utils.plots", "curves", "{root}", "--modes", ".hidden"],
    ["utils.plots", "curves", "{root}", "--tag", "../../x"],
])
def test_names_given_to_the_analysis_tools_are_not_paths(tmp_path, argv):
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", *[a.format(root=tmp_path) for a in argv]], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert_user_error(proc, argv[-2], argv[-1])
    assert_unchanged(before, tmp_path)


def test_a_subset_larger_than_the_split_is_said(tmp_path, capsys):
    """--train_subset beyond the split's size trains on all of it, and says so in one note line."""
    from conftest import attack_argv, write_tiny_fmnist
    from utils.victim.train import run_attack

    data = write_tiny_fmnist(tmp_path / "data", n_train=40, n_test=20)
    run_attack("badnet", attack_argv(data, tmp_path / "records", "--yaml_path", "config/attack/prototype/fmnist.yaml",
                                     "--train_subset", str(10**15), "--test_subset", "20"))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: --train_subset")]
    assert notes == [f"note: --train_subset {10**15} is more than the 40 images of the split; using all of them"]
