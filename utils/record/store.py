"""Reading and writing records safely: atomic writes, weights-only loading, staged folders that
become visible only when complete, portable paths."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable

import torch

from utils.config import REPO_ROOT
from utils.errors import UserError
from utils.fileio import atomic_write
from utils.record.layout import FORMAT, FORMAT_VERSION, RECORD_FILE
from utils.engine.runtime import to_cpu

# --- atomic writes --------------------------------------------------------------------------

# temp file + rename, mode 0666 less the umask: utils/fileio.py (shared with the dataset caches)

def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(Path(path), lambda fh: fh.write(data))


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
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            AttributeError, TypeError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{what} {path} is corrupt or truncated ({type(err).__name__}: {first}); "
                        "re-run the attack with --overwrite true to rebuild it") from None


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
    the end. Without `overwrite`, an existing folder is an error raised before any work starts."""

    def __init__(self, final: Path, overwrite: bool, what: str, marker: str, resumable: bool = False):
        self.final = Path(final)
        self.what = what
        if (self.final / marker).exists() and not overwrite:
            raise UserError(f"{what} {self.final} already exists; pass --overwrite true to replace it")
        # folders made here are removed again by abort() if they stay empty
        self._made = [p for p in (self.final.parent, *self.final.parent.parents) if not p.exists()]
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if resumable:
            # a fixed name, so that a killed run finds its checkpoint again
            self.stage = self.final.parent / f".{self.final.name}.partial"
            self.stage.mkdir(exist_ok=True)
        else:
            self.stage = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))

    def commit(self) -> None:
        """Swap the staged folder in; an old folder (with everything in it) goes only now."""
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, old)
        os.replace(self.stage, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
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
