"""Runs that meet on the same output, and the operating system saying no (issue 13, classes 1, 5, 6).

A run owns its record or result folder through `.NAME.lock` (utils/record/lock.py): a second run
refuses with one line naming the holder, a stale lock (dead pid, or no heartbeat for 10 min) is
taken over, and a run that lost its lock writes nothing. Operating-system errors end in one
`error:` line naming the path; interrupted and refused runs leave no stage behind.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import RECORD_REL, REPO_ROOT, attack_argv, copy_record
from test_cli import ATTACK, FT, assert_unchanged, assert_user_error, ft_args, run_script, snapshot
from utils.errors import UserError, run_cli
from utils.record import lock as locks
from utils.record import resources
from utils.record.layout import CHECKPOINT_FILE, RECORD_FILE, RESULT_FILE, lock_path, stage_path
from utils.record.lock import FolderLock, LostLock
from utils.record.resources import META_FILE, RESOURCE_FILE, Resource
from utils.record.store import StagedFolder, load_torch_file, write_json
from utils.tools import sweep


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


def _write_lock(folder: Path, pid: int, host: str | None = None, age_s: float = 0.0, **extra) -> Path:
    """A lock as another run would have left it: its pid, host, and a heartbeat `age_s` seconds ago."""
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"host": host or socket.gethostname(), "pid": pid, "user": "someone", "started": "2026-01-01T00:00:00+00:00",
            "command": "attack/badnet.py --epochs 100", "token": "t" * 16, "pidns": locks._pid_namespace(), **extra}
    path.write_text(json.dumps(info))
    if age_s:
        then = time.time() - age_s
        os.utime(path, (then, then))
    return path


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".partial" in p.name or ".old-" in p.name or p.name.endswith((".lock", ".lock.break")))


# --- the lock itself ----------------------------------------------------------------------------

def test_second_lock_refuses_naming_the_holder(tmp_path):
    folder = tmp_path / "rec" / "result"
    first = FolderLock(folder, "record").acquire()
    info = json.loads(lock_path(folder).read_text())
    assert {"host", "pid", "user", "started", "command", "token"} <= set(info) and info["pid"] == os.getpid()
    with pytest.raises(UserError) as refused:
        FolderLock(folder, "record").acquire()
    line = str(refused.value)
    assert "\n" not in line and f"pid {os.getpid()}" in line and socket.gethostname() in line
    assert str(lock_path(folder)) in line and "stale" in line
    first.release()
    assert not lock_path(folder).exists()
    FolderLock(folder).acquire().release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "result"
    _write_lock(folder, _dead_pid())
    mine = FolderLock(folder).acquire()
    assert mine.owned() and "taking over the stale lock" in capsys.readouterr().err
    mine.release()


def test_lock_without_heartbeat_is_stale_even_on_another_host(tmp_path):
    folder = tmp_path / "result"
    _write_lock(folder, os.getpid(), host="elsewhere", age_s=locks.STALE_AFTER_S - 30)
    with pytest.raises(UserError, match="elsewhere"):
        FolderLock(folder).acquire()  # another host, recent heartbeat: alive as far as anyone can tell
    _write_lock(folder, os.getpid(), host="elsewhere", age_s=locks.STALE_AFTER_S + 30)
    FolderLock(folder).acquire().release()


def test_empty_lock_file_counts_as_a_run_starting(tmp_path):
    folder = tmp_path / "result"
    lock_path(folder).write_bytes(b"")
    with pytest.raises(UserError, match="just starting"):
        FolderLock(folder).acquire()
    lock_path(folder).write_text("[1, 2]")  # damaged: judged by its age only, like an empty one
    with pytest.raises(UserError, match="unknown run"):
        FolderLock(folder).acquire()
    then = time.time() - locks.STALE_AFTER_S - 1
    os.utime(lock_path(folder), (then, then))
    FolderLock(folder).acquire().release()


def test_racing_takeovers_leave_exactly_one_owner(tmp_path):
    folder = tmp_path / "result"
    _write_lock(folder, _dead_pid())
    won, lost = [], []
    start = threading.Barrier(8)

    def contender():
        start.wait()
        try:
            won.append(FolderLock(folder).acquire())
        except UserError:
            lost.append(1)

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7 and won[0].owned()
    won[0].release()
    assert _leftovers(tmp_path) == []


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    folder = tmp_path / "result"
    mine = FolderLock(folder).acquire()
    then = time.time() - 1000
    os.utime(lock_path(folder), (then, then))
    time.sleep(0.3)
    assert time.time() - lock_path(folder).stat().st_mtime < 5
    mine.release()


def test_lost_lock_at_commit_leaves_the_other_runs_result(tmp_path):
    final = tmp_path / "defense" / "fst"
    slow = StagedFolder(final, overwrite=False, what="result", marker=RESULT_FILE)
    (slow.stage / RESULT_FILE).write_text("slow")
    lock_path(final).unlink()  # the slow run looked dead; someone removed its lock
    fast = StagedFolder(final, overwrite=False, what="result", marker=RESULT_FILE)
    (fast.stage / RESULT_FILE).write_text("fast")
    fast.commit()
    with pytest.raises(LostLock, match="lost the lock"):
        slow.commit()
    slow.abort()  # what driver.aborting does next
    assert (final / RESULT_FILE).read_text() == "fast"
    assert _leftovers(tmp_path) == []


def test_lost_lock_keeps_the_shared_resumable_stage(tmp_path):
    final = tmp_path / "rec"
    old = StagedFolder(final, overwrite=False, what="record", marker=RECORD_FILE, resumable=True)
    lock_path(final).unlink()
    new = StagedFolder(final, overwrite=False, what="record", marker=RECORD_FILE, resumable=True)
    (new.stage / CHECKPOINT_FILE).write_bytes(b"the new owner's epoch")
    with pytest.raises(LostLock):
        old.check_owner()
    old.abort()
    assert (new.stage / CHECKPOINT_FILE).read_bytes() == b"the new owner's epoch"
    assert new.lock.owned()
    new.abort()


def test_staged_and_committed_folders_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        final = tmp_path / "a" / "fst"
        staged = StagedFolder(final, overwrite=False, what="result", marker=RESULT_FILE)
        assert staged.stage.stat().st_mode & 0o777 == 0o755
        write_json(staged.stage / RESULT_FILE, {})
        staged.commit()
    finally:
        os.umask(old)
    assert final.stat().st_mode & 0o777 == 0o755
    assert (final / RESULT_FILE).stat().st_mode & 0o777 == 0o644


# --- the operating system saying no --------------------------------------------------------------

def test_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError) as info:
        write_json(tmp_path / "out" / RESULT_FILE, {"a": 1})
    assert str(tmp_path / "out" / RESULT_FILE) in str(info.value) and "No space left" in str(info.value)
    assert list((tmp_path / "out").iterdir()) == []  # the temporary file is gone


def test_run_cli_turns_a_stray_os_error_into_one_line(capsys):
    def boom():
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/some/where")

    with pytest.raises(SystemExit) as stop:
        run_cli(boom)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.splitlines() == ["error: /some/where: Permission denied"]


def test_run_cli_stops_on_sigterm_but_keeps_an_ignored_sighup(capsys):
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        def main():
            os.kill(os.getpid(), signal.SIGHUP)
            print("still running")
            os.kill(os.getpid(), signal.SIGTERM)
            print("never printed")

        with pytest.raises(SystemExit) as stop:
            run_cli(main)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # given back as found
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)
    captured = capsys.readouterr()
    assert stop.value.code == 130 and captured.out == "still running\n" and captured.err == "interrupted\n"


def test_root_that_is_a_file_is_one_line(tmp_path):
    root = tmp_path / "root"
    root.write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder"):
        StagedFolder(root / "cifar10" / "badnet" / "x", overwrite=False, what="record", marker=RECORD_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_pickle_refusal_is_complete_and_short(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(UserError) as info:
        load_torch_file(path, "record file")
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 400
    assert "(print)" in message and message.endswith("--overwrite true)")


def test_damage_message_is_cut_at_a_word(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"PK\x03\x04" + b"x" * 100)  # a zip header and nothing else
    with pytest.raises(UserError) as info:
        load_torch_file(path, "record file")
    message = str(info.value)
    assert "\n" not in message and len(message) < 400 and message.endswith("to rebuild it")


def test_overwrite_clears_a_stage_that_is_a_file(tmp_path):
    final = tmp_path / "rec"
    stage_path(final).write_text("not a stage")
    with pytest.raises(UserError, match="is a file, not a folder"):
        StagedFolder(final, overwrite=False, what="record", marker=RECORD_FILE, resumable=True)
    assert not lock_path(final).exists()
    staged = StagedFolder(final, overwrite=True, what="record", marker=RECORD_FILE, resumable=True)
    assert staged.stage.is_dir()
    staged.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_resource_meta_that_is_not_an_object_is_rebuilt(tmp_path, capsys):
    resource = Resource("surrogate", {"dataset": "cifar10", "seed": 0}, tmp_path)
    resource.get(lambda progress: ({"w": torch.ones(2)}, {"acc": 1.0}))
    (resource.folder / META_FILE).write_text("[1, 2]")
    again = Resource("surrogate", {"dataset": "cifar10", "seed": 0}, tmp_path)
    payload = again.get(lambda progress: ({"w": torch.zeros(2)}, {}))
    assert "not a JSON object" in capsys.readouterr().err and torch.equal(payload["w"], torch.zeros(2))
    assert json.loads((resource.folder / META_FILE).read_text())["kind"] == "surrogate"
    assert (resource.folder / RESOURCE_FILE).exists()


def test_resource_built_by_another_run_is_waited_for_not_built_twice(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(resources, "WAIT_S", 0.05)
    key = {"dataset": "cifar10", "seed": 0}
    first = Resource("surrogate", key, tmp_path)
    first.folder.mkdir(parents=True)
    holding = FolderLock(first.folder).acquire()  # the other run, building

    def other_run_finishes():
        time.sleep(0.3)
        first._build(lambda progress: ({"w": torch.ones(1)}, {}))
        holding.release()

    finisher = threading.Thread(target=other_run_finishes)
    finisher.start()
    built = []
    payload = Resource("surrogate", key, tmp_path).get(lambda progress: built.append(1) or ({"w": torch.zeros(1)}, {}))
    finisher.join()
    assert built == [] and torch.equal(payload["w"], torch.ones(1))
    assert "waiting" in capsys.readouterr().err
    assert not lock_path(first.folder).exists()


def test_resource_root_that_is_a_file_is_one_line(tmp_path):
    root = tmp_path / "resources"
    root.write_text("")
    with pytest.raises(UserError, match="--resource_root.*is a file, not a folder"):
        Resource("surrogate", {"dataset": "cifar10"}, root).get(lambda progress: ({}, {}))


# --- sweeps --------------------------------------------------------------------------------------

def test_sweep_reports_a_held_job_without_touching_its_log(tmp_path):
    out = tmp_path / "rec" / "defense" / "fst"
    log = tmp_path / "logs" / "job.log"
    log.parent.mkdir()
    log.write_text("the other sweep's log\n")
    _write_lock(out, os.getpid())
    job = sweep.Job("job", [sys.executable, "-c", "raise SystemExit(3)"], [str(out / RESULT_FILE)], str(log))
    lines = []
    [outcome] = sweep.run_local([job], [("cpu", {})], echo=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert outcome.status == "held" and f"pid {os.getpid()}" in outcome.detail and str(lock_path(out)) in outcome.detail
    assert log.read_text() == "the other sweep's log\n"
    assert sweep.report([outcome], 1.0, echo=lines.append) == 1 and any("HELD job" in ln for ln in lines)


def test_second_sweep_does_not_start_a_job_the_first_runs(tmp_path):
    """The first sweep claims the job before its script has started (and locked its output): the
    second sweep must neither start it nor truncate its log."""
    out = tmp_path / "rec" / "defense" / "fst"
    log = tmp_path / "logs" / "job.log"
    job = sweep.Job("job", [sys.executable, "-c", "raise SystemExit(3)"], [str(out / RESULT_FILE)], str(log))
    first = FolderLock(log, "job log").acquire()  # the first sweep, between its claim and the job's own lock
    log.write_text("$ the first sweep's job\n")
    [outcome] = sweep.run_local([job], [("cpu", {})], echo=lambda *a, **k: None)
    assert outcome.status == "held" and "job log" in outcome.detail and f"pid {os.getpid()}" in outcome.detail
    assert log.read_text() == "$ the first sweep's job\n"
    first.release()
    [outcome] = sweep.run_local([job], [("cpu", {})], echo=lambda *a, **k: None)
    assert outcome.status == "failed" and _leftovers(tmp_path) == []


# --- through the command line --------------------------------------------------------------------

def test_attack_on_a_record_another_run_writes_refuses(tmp_path, tiny_cifar10, badnet_record):
    root = tmp_path / "records"
    folder = copy_record(badnet_record, root)
    stage = stage_path(folder)
    stage.mkdir()
    (stage / CHECKPOINT_FILE).write_bytes(b"the other run's epoch 3")
    _write_lock(folder, os.getpid())  # the other run: this test process, alive
    before = snapshot(root)
    proc = run_script(ATTACK, attack_argv(tiny_cifar10, root, "--overwrite", "true"))
    line = assert_user_error(proc, str(folder), f"pid {os.getpid()}", socket.gethostname(), str(lock_path(folder)))
    assert "someone" in line and "attack/badnet.py --epochs 100" in line
    after = snapshot(root)
    assert after == before, "the other run's record, stage or lock changed"


def test_stale_lock_and_bogus_checkpoint_do_not_block_the_record(tmp_path, tiny_cifar10):
    """A run killed with -9 left its lock, and its stage holds a file that loads but is no
    checkpoint: the next run takes over, ignores it with one note and writes the record (0755)."""
    root = tmp_path / "records"
    folder = root / RECORD_REL
    stage = stage_path(folder)
    stage.mkdir(parents=True)
    torch.save(torch.arange(3), stage / CHECKPOINT_FILE)
    _write_lock(folder, _dead_pid())
    proc = subprocess.run([sys.executable, ATTACK, *attack_argv(tiny_cifar10, root, "--overwrite", "true")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    assert "taking over the stale lock" in proc.stderr and "is not a checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (folder / RECORD_FILE).is_file() and _leftovers(root) == []
    assert folder.stat().st_mode & 0o777 == 0o755


def test_attack_with_record_root_a_file_is_one_line(tmp_path, tiny_cifar10):
    root = tmp_path / "records"
    root.write_text("oops")
    proc = run_script(ATTACK, attack_argv(tiny_cifar10, root))
    assert_user_error(proc, str(root), "is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records"]


def test_ft_on_a_result_another_run_writes_refuses(tmp_path, tiny_cifar10, badnet_record):
    root = tmp_path / "records"
    folder = copy_record(badnet_record, root)
    _write_lock(folder / "defense" / "fst", os.getpid())
    before = snapshot(root)
    proc = run_script(FT, ft_args(root, tiny_cifar10, "--ft_mode", "ft,fst"))
    assert_user_error(proc, str(folder / "defense" / "fst"), f"pid {os.getpid()}")
    assert_unchanged(before, root)  # nor a stage for ft, nor a lock left


def test_ft_with_a_tag_too_long_is_one_line(tmp_path, tiny_cifar10, badnet_record):
    root = tmp_path / "records"
    copy_record(badnet_record, root)
    before = snapshot(root)
    proc = run_script(FT, ft_args(root, tiny_cifar10, "--tag", "x" * 300))
    assert_user_error(proc, "--tag may hold only up to 64")
    assert_unchanged(before, root)
    assert not (root / RECORD_REL / "defense").exists(), "an empty defense/ folder was left behind"


def test_attack_with_a_record_root_name_too_long_is_one_line(tmp_path, tiny_cifar10):
    """ENAMETOOLONG from the file system itself (a folder name of 300 characters)."""
    root = tmp_path / ("y" * 300)
    proc = run_script(ATTACK, attack_argv(tiny_cifar10, root))
    assert_user_error(proc, "too long")
    assert not any(tmp_path.iterdir()), "something was left behind"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_ft_leaves_no_stage_nor_lock(tmp_path, tiny_cifar10, badnet_record, sig):
    root = tmp_path / "records"
    folder = copy_record(badnet_record, root)
    before = snapshot(root)
    # as from a terminal: SIGINT at its default in the child. A suite started in the background (`cmd &`
    # in a script) runs with SIGINT ignored, an ignored signal stays ignored in children, and Python then
    # installs no KeyboardInterrupt handler: the run would rightly ignore the signal and finish its epochs.
    proc = subprocess.Popen([sys.executable, FT, *map(str, ft_args(root, tiny_cifar10, "--ft_mode", "ft", "--epochs", 500))],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not lock_path(folder / "defense" / "ft").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the work
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    assert_unchanged(before, root)
    assert _leftovers(root) == [] and not (folder / "defense").exists()


def test_two_ft_runs_on_the_same_mode_never_replace_each_other(tmp_path, tiny_cifar10, badnet_record):
    """Started together: one writes the result, the other stops with one line (the lock's, or
    'already exists' when the first finished before the second looked), and nothing is replaced."""
    root = tmp_path / "records"
    folder = copy_record(badnet_record, root)
    argv = [sys.executable, FT, *map(str, ft_args(root, tiny_cifar10, "--ft_mode", "ft", "--epochs", 3))]
    procs = [subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: os.umask(0o022)) for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err) for p, _, err in results]
    loser = next(err for p, _, err in results if p.returncode == 2)
    lines = [ln for ln in loser.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and ("is being written by pid" in lines[0] or "already exists" in lines[0]), loser
    result = folder / "defense" / "ft"
    assert (result / RESULT_FILE).is_file() and result.stat().st_mode & 0o777 == 0o755
    assert _leftovers(root) == []
