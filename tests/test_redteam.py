"""Findings of the independent hostile trial of the issue-13 work (issue 13, class 6).

A one-shot run (ft.py, ft_poison.py, qra.py) killed with -9 leaves its stage `.NAME.partial-<hex>`
beside the result folder. The next run on the same folder takes the stale lock over; it must also
remove that stage, which nothing could ever commit, instead of leaving it there for good."""
from __future__ import annotations

from pathlib import Path

import pytest

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

