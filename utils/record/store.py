"""Reading and writing records safely: atomic writes, weights-only loading, staged folders that
become visible only when complete, portable paths."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import re
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from utils.config import REPO_ROOT
from utils.errors import UserError, os_error_message
from utils.fileio import atomic_write
from utils.record.layout import FORMAT, FORMAT_VERSION, RECORD_FILE, old_path, one_shot_stages, stage_path
from utils.record.lock import FolderLock, LostLock
from utils.engine.runtime import to_cpu

# --- atomic writes --------------------------------------------------------------------------

def _atomic(path: Path, write) -> None:
    """`fileio.atomic_write` (temp file + rename, mode 0666 less the umask, shared with the dataset
    caches); an operating-system error (full disk, quota, permission, a name too long) becomes one
    line naming `path`, and the temporary file is gone."""
    try:
        atomic_write(Path(path), write)
    except OSError as err:  # atomic_write names `path`, not its temporary twin
        raise UserError(os_error_message(err, "write")) from None


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(Path(path), lambda fh: fh.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    buf = io.StringIO()
    if rows:
        fields = list(rows[0])
        for row in rows[1:]:
            fields += [k for k in row if k not in fields]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in fields})
    write_text(path, buf.getvalue())


def _csv_value(v):
    """Floats with 6 significant digits; NaN (a metric not measured that epoch) as an empty cell."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


# --- state dicts ----------------------------------------------------------------------------

def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies, without the `module.` (DataParallel) and `_orig_mod.` (torch.compile) prefixes."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:  # wrappers nest in any order: _orig_mod.module.x, module._orig_mod.x, ...
            stripped = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return to_cpu(out)


def load_state_dict_checked(model: torch.nn.Module, state: dict, source: str) -> None:
    try:
        model.load_state_dict(clean_state_dict(state))
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise UserError(f"{source}: the weights do not fit this model ({first})") from None


# --- loading --------------------------------------------------------------------------------

def load_torch_file(path: Path, what: str) -> Any:
    """`torch.load(weights_only=True)`, with every kind of damage turned into one clear line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except pickle.UnpicklingError as err:
        refused = _REFUSED_GLOBAL.search(str(err))
        if refused or "weights only load failed" in str(err).lower():
            name = f" ({refused.group(1)})" if refused else ""
            raise UserError(f"{what} {path} holds a pickled Python object{name}, not only tensors and plain data; "
                            "records are loaded as data, never as code, so it is refused: rebuild it with this "
                            "toolkit (for a record, re-run the attack with --overwrite true)") from None
        raise UserError(_corrupt(what, path, err)) from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            AttributeError, TypeError) as err:
        raise UserError(_corrupt(what, path, err)) from None


# torch's weights-only refusal names the object it would not rebuild as "GLOBAL module.name"
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _corrupt(what: str, path: Path, err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if len(first) > 160:  # cut at a word, and say so
        cut = first.rfind(" ", 0, 157)
        first = first[:cut if cut > 0 else 157] + " ..."
    return (f"{what} {path} is corrupt or truncated ({type(err).__name__}: {first}); "
            "re-run the attack with --overwrite true to rebuild it")


REQUIRED_KEYS = ("format", "version", "model_name", "num_classes", "in_channels", "image_size", "dataset",
                 "attack", "attack_target", "attack_label_trans", "pratio", "poison_indices", "trigger", "model")


def load_record(folder: Path) -> dict[str, Any]:
    """Load and validate `attack_result.pt` from a record folder."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    if not path.is_file():
        raise UserError(f"no record at {path}")
    data = load_torch_file(path, "record file")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path} is not a record written by this toolkit (no '{FORMAT}' marker)")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; re-run the attack with --overwrite true")
    if data["version"] > FORMAT_VERSION:
        raise UserError(f"{path} has record format {data['version']}; this toolkit reads up to {FORMAT_VERSION}")
    return data


class StagedFolder:
    """Build a result folder next to its final place and move it in only when complete, so a crash
    leaves no half-written record that looks whole and `--overwrite` replaces the old one only at
    the end. Without `overwrite`, an existing folder is an error raised before any work starts.

    The run owns the folder from here to `commit`/`abort`/`release` (a `FolderLock` beside it): a
    second run on the same folder stops at once with one line naming the first, and a run that lost
    its lock (it looked dead to another) writes nothing. Operating-system errors (a root that is a
    file, a name too long, no permission) become one line naming the path."""

    def __init__(self, final: Path, overwrite: bool, what: str, marker: str, resumable: bool = False):
        self.final = Path(final)
        self.what = what
        self.resumable = resumable
        self._refuse_existing(marker, overwrite)
        # folders made here are removed again by abort() if they stay empty
        self._made = [p for p in (self.final.parent, *self.final.parent.parents) if not p.exists()]
        self.lock = FolderLock(self.final, what)
        try:
            self.lock.acquire()
        except BaseException:
            self._remove_made()
            raise
        try:
            self._refuse_existing(marker, overwrite)  # again: another run may have finished meanwhile
            if resumable:
                # a fixed name, so that a killed run finds its checkpoint again (only the lock holder uses it)
                self.stage = stage_path(self.final)
                if overwrite and self.stage.exists() and not self.stage.is_dir():
                    self.stage.unlink()  # not a stage at all: --overwrite clears it
                self.stage.mkdir(exist_ok=True)
            else:
                self._remove_dead_stages()
                self.stage = self._fresh_stage()
        except BaseException as err:
            self.lock.release()
            self._remove_made()
            if isinstance(err, OSError):
                raise UserError(os_error_message(err, f"create the {what} folder", self.final)) from None
            raise

    def _refuse_existing(self, marker: str, overwrite: bool) -> None:
        if (self.final / marker).exists() and not overwrite:
            raise UserError(f"{self.what} {self.final} already exists; pass --overwrite true to replace it")

    def _remove_dead_stages(self) -> None:
        # Only the lock holder makes a one-shot stage, and this run holds the lock now: any stage
        # still here is the unfinished output of a run that was killed (SIGKILL, power loss) before
        # it could clean up. It can never be committed, so it would otherwise stay forever.
        for old in one_shot_stages(self.final):
            shutil.rmtree(old, ignore_errors=True)

    def _fresh_stage(self) -> Path:
        # not tempfile.mkdtemp: its folders are private (0700); results get the usual 0777 & ~umask
        while True:
            stage = stage_path(self.final, secrets.token_hex(4))
            try:
                stage.mkdir()
                return stage
            except FileExistsError:
                continue

    def check_owner(self) -> None:
        """A one-line error when another run has taken the folder over (see FolderLock.verify)."""
        self.lock.verify()

    def commit(self) -> None:
        """Swap the staged folder in; an old folder (with everything in it) goes only now. A run
        that no longer owns the folder refuses and leaves the other run's result alone."""
        try:
            self.lock.verify()
        except LostLock:
            if not self.resumable:  # a one-shot stage is this run's own; the resumable one is shared
                shutil.rmtree(self.stage, ignore_errors=True)
            self.lock.release()
            raise
        old = None
        try:
            if self.final.exists():
                old = old_path(self.final, self.lock.token)
                os.replace(self.final, old)
            try:
                os.replace(self.stage, self.final)
            except OSError:
                if old is not None:
                    os.replace(old, self.final)
                    old = None
                raise
        except OSError as err:
            raise UserError(os_error_message(err, f"move the finished {self.what} into", self.final)) from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.lock.release()

    def release(self) -> None:
        """Give the folder up and keep the stage (a killed attack's checkpoint, for resumption)."""
        self.lock.release()

    def abort(self) -> None:
        """Drop the stage (a shared, resumable one only while this run still owns it), give the
        folder up, and remove the empty folders this run made."""
        if not self.resumable or self.lock.owned():
            shutil.rmtree(self.stage, ignore_errors=True)
        self.lock.release()
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def portable_path(value: str) -> str:
    """A path as it may be written into a record: relative paths as given, absolute ones relative
    to the repository when inside it, else only their last component (records must not carry
    absolute paths, so that they can be moved and shared)."""
    path = Path(value)
    if not path.is_absolute():
        return value
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return path.name
