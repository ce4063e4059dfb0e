"""One run owns a result folder for its whole life: a lock file beside the folder.

`.NAME.lock` (layout.lock_path) is created with `O_CREAT | O_EXCL`, which is atomic on local file
systems and on NFS v3 and later (fcntl/flock locks are not reliable on NFS, and a lock file also
tells the next run *who* holds the folder). It holds JSON: host, pid, user, start time, command
and a random token. While the run lives, a daemon thread touches the file's mtime every
`HEARTBEAT_S` seconds.

A lock is stale, and the next run takes it over, when its owner is visibly gone: the same host (and
pid namespace) and a pid that no longer exists, or no heartbeat for `STALE_AFTER_S` seconds (a run
on another host, or one frozen for that long). Taking over goes through a second exclusive file
(`.NAME.lock.break`) and re-reads the lock before removing it, so two runs that both find the same
stale lock never both become owners. A run checks that it still owns its lock (the token in the
file is its own) before it makes its output the result; one that lost it writes nothing.
"""
from __future__ import annotations

import datetime
import getpass
import json
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError, os_error_message
from utils.record.layout import lock_path

#: seconds without a heartbeat after which a lock counts as left behind by a dead run
STALE_AFTER_S = 600
#: seconds between two heartbeats of a live run
HEARTBEAT_S = 30
#: seconds after which a `.lock.break` file (a takeover in progress) is itself left over
_BREAK_STALE_S = 60


def _pid_namespace() -> str:
    """Processes of other containers on the same host have pids of their own: only a lock written
    in this pid namespace can be judged by its pid."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return str(os.getuid())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process (or a pid this system cannot have: judged by mtime)
    return True


@dataclass
class Holder:
    """What a lock file says about its owner, and when it last heard from it."""

    path: Path
    info: dict
    raw: bytes
    mtime: float

    def age(self) -> float:
        return time.time() - self.mtime

    def stale(self) -> bool:
        if self.age() > STALE_AFTER_S:
            return True
        pid = self.info.get("pid")
        same_place = (self.info.get("host") == socket.gethostname()
                      and self.info.get("pidns", "") == _pid_namespace())
        return same_place and isinstance(pid, int) and not _pid_alive(pid)

    def describe(self) -> str:
        i = self.info
        if not self.raw.strip():
            return f"a run that is just starting (its lock file {self.path} is still empty)"
        if not i:
            return f"an unknown run (its lock file {self.path} is not one this toolkit writes)"
        command = str(i.get("command", "?"))
        command = command if len(command) <= 160 else command[:157] + "..."
        return (f"pid {i.get('pid', '?')} on host {i.get('host', '?')} (user {i.get('user', '?')}, "
                f"since {i.get('started', '?')}, command {command})")


def read_holder(path: Path) -> Holder | None:
    """The lock at `path`, or None when there is none. A lock file that is empty or not JSON (being
    written this instant, or damaged) is a holder without details: only its mtime judges it."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(65536)
            mtime = os.fstat(fh.fileno()).st_mtime
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw.decode("utf-8")) if raw else {}
    except (UnicodeDecodeError, ValueError):
        info = {}
    return Holder(path, info if isinstance(info, dict) else {}, raw, mtime)


def held_message(folder: Path, holder: Holder, what: str = "result") -> str:
    """The one line that tells a second run (or a sweep) who writes `folder`."""
    return (f"{what} {folder} is being written by {holder.describe()}; wait for that run to finish, or, if it is "
            f"gone, rerun after its lock goes stale ({STALE_AFTER_S // 60} min after its last heartbeat) or remove "
            f"{holder.path}")


def holder_of(folder: str | Path) -> Holder | None:
    """The live run holding `folder`, if any (a stale lock counts as none)."""
    holder = read_holder(lock_path(folder))
    return None if holder is None or holder.stale() else holder


class LockHeld(UserError):
    """FolderLock.acquire's refusal: a live run holds the folder (the message names it)."""


class LostLock(UserError):
    """FolderLock.verify's refusal: another run owns the folder now, so this one must leave the
    folder, and a stage it shares with that run, alone."""


class FolderLock:
    """Ownership of one result folder: `acquire()` or a one-line UserError naming the holder."""

    def __init__(self, folder: str | Path, what: str = "result"):
        self.folder = Path(folder)
        self.path = lock_path(self.folder)
        self.what = what
        self.token = secrets.token_hex(8)
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking and giving back ---------------------------------------------------------------

    def acquire(self) -> "FolderLock":
        info = {"host": socket.gethostname(), "pid": os.getpid(), "user": _user(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": shlex.join(sys.argv) if sys.argv else "?", "token": self.token,
                "pidns": _pid_namespace()}
        data = (json.dumps(info) + "\n").encode()
        for _ in range(20):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = read_holder(self.path)
                if holder is None:
                    continue  # released this instant: try again
                if not holder.stale():
                    raise LockHeld(held_message(self.folder, holder, self.what)) from None
                self._break(holder)
                continue
            except FileNotFoundError:
                continue  # another run removed an empty parent folder this instant: make it again
            except OSError as err:
                raise UserError(os_error_message(err, "create", self.path)) from None
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            except BaseException as err:  # a full disk, or Ctrl-C this instant: no empty lock stays behind
                self.path.unlink(missing_ok=True)
                if isinstance(err, OSError):
                    raise UserError(os_error_message(err, "write the lock file", self.path)) from None
                raise
            self.held = True
            self._thread = threading.Thread(target=self._beat, name=f"lock {self.path.name}", daemon=True)
            self._thread.start()
            return self
        raise UserError(f"could not take the lock {self.path}: other runs keep taking it; try again")

    def _break(self, holder: Holder) -> None:
        """Remove a stale lock, unless another run has already replaced it (then it is theirs)."""
        breaker = self.path.with_name(self.path.name + ".break")
        try:
            os.close(os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            try:  # a takeover in progress, or one whose run died in the middle of it
                if time.time() - breaker.stat().st_mtime > _BREAK_STALE_S:
                    breaker.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        try:
            again = read_holder(self.path)
            if again is not None and again.raw == holder.raw and again.mtime == holder.mtime and again.stale():
                why = (f"no heartbeat for {again.age() / 60:.0f} min" if again.age() > STALE_AFTER_S
                       else "its process is gone")
                print(f"note: taking over the stale lock {self.path} of {again.describe()}: {why}", file=sys.stderr)
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            breaker.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # gone or unreachable for now: the owner check at commit decides

    def owned(self) -> bool:
        """Whether the lock file still carries this run's token."""
        if not self.held:
            return False
        holder = read_holder(self.path)
        return holder is not None and holder.info.get("token") == self.token

    def verify(self) -> None:
        """A UserError unless this run still owns the folder (another run took the lock over
        because this one looked dead, or someone removed the lock file)."""
        if self.owned():
            return
        holder = read_holder(self.path)
        now = f"it now belongs to {holder.describe()}" if holder is not None else "the lock file was removed"
        raise LostLock(f"this run lost the lock on {self.what} {self.folder} ({now}); its output is not written "
                        f"and whatever another run wrote there is left alone")

    def release(self) -> None:
        """Remove the lock file if it is still this run's (idempotent)."""
        self._stop.set()
        if self.held and self.owned():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.held = False

