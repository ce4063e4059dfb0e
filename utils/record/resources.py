"""Attack resources (surrogate models, PGD images, trained encoders, universal patterns) as a
first-class, cached and resumable step.

A resource is identified by a *key*: a JSON-able dict of everything that determines its content
(dataset, image size, seed, hyper-parameters, the identity of the model it was computed against,
...). It lives in `<resource_root>/<kind>/<dataset>-<size>px-seed<seed>-<digest>/`:

- `resource.pt`: the tensors (loaded with `weights_only=True`);
- `meta.json`: the full key, the SHA-256 of `resource.pt`, how long it took and a short `info`
  dict (e.g. bit accuracy, PSNR) that the attack reports;
- `partial.pt` while it is being built: the builder's own progress, so that a killed run resumes
  where it stopped. It is tagged with the key and ignored if the key differs.

A cache is reused only when its stored key equals the requested one and its checksum matches, so a
cache made for another dataset, image size, seed or setting is never picked up; a corrupt one is
rebuilt with a warning.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from utils.config import Option, folder_path
from utils.errors import UserError, os_error_message
from utils.record.lock import FolderLock, LockHeld
from utils.record.store import load_torch_file, save_torch, write_json

RESOURCE_OPTIONS = [
    Option("resource_root", str, "record/resources", "cache folder for generated attack resources",
           check=folder_path),
]

#: seconds between two looks at a resource that another run is building
WAIT_S = 5.0

RESOURCE_FILE = "resource.pt"
META_FILE = "meta.json"
PARTIAL_FILE = "partial.pt"


def precision_key(amp: torch.dtype | None) -> dict[str, str]:
    """The autocast dtype a resource was computed under, for its key: a cache made in bf16 must not
    serve a full-precision (`--amp none`) run. Full precision adds nothing, so the keys of caches
    made before this entry existed (all in fp32) stay valid."""
    return {} if amp is None else {"amp": str(amp).replace("torch.", "")}


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_digest(t: torch.Tensor | None) -> str:
    """A short, content-based identity of a tensor (e.g. a subset's indices); 'all' for None."""
    if t is None:
        return "all"
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Content identity of a model's weights (names, shapes and values)."""
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(str(tuple(value.shape)).encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Progress:
    """A builder's handle on its own resumable state."""

    path: Path
    key_digest: str

    def load(self) -> Any | None:
        if not self.path.exists():
            return None
        try:
            saved = load_torch_file(self.path, "partial resource")
        except UserError as err:
            print(f"warning: ignoring unreadable {self.path}: {err}", file=sys.stderr)
            return None
        if not isinstance(saved, dict) or saved.get("key") != self.key_digest:
            return None
        return saved.get("state")

    def save(self, state: Any) -> None:
        save_torch(self.path, {"key": self.key_digest, "state": state})


@dataclass
class Resource:
    kind: str
    key: dict[str, Any]
    root: Path
    info: dict[str, Any] = field(default_factory=dict)
    _warned: set = field(default_factory=set, repr=False, compare=False)

    @property
    def key_digest(self) -> str:
        return digest({"kind": self.kind, **self.key})

    @property
    def folder(self) -> Path:
        k = self.key
        label = f"{k.get('dataset', 'data')}-{k.get('image_size', 0)}px-seed{k.get('seed', 0)}"
        return Path(self.root) / self.kind / f"{label}-{self.key_digest[:12]}"

    def _warn(self, message: str) -> None:
        """A cache problem, said once per resource: `get` looks at the cache again after taking the
        lock, and the same broken file must not be reported twice."""
        if message not in self._warned:
            self._warned.add(message)
            print(f"warning: {message}", file=sys.stderr)

    def _load_cached(self) -> dict[str, Any] | None:
        meta_path, data_path = self.folder / META_FILE, self.folder / RESOURCE_FILE
        if not meta_path.exists() or not data_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            self._warn(f"{meta_path} is unreadable or not a JSON object; rebuilding the {self.kind} resource")
            return None
        if meta.get("key") != json.loads(json.dumps({"kind": self.kind, **self.key}, default=str)):
            self._warn(f"{self.folder} holds a {self.kind} resource for other settings; rebuilding it")
            return None
        if meta.get("sha256") != file_sha256(data_path):
            self._warn(f"{data_path} does not match its checksum (corrupt or edited); rebuilding it")
            return None
        try:
            payload = load_torch_file(data_path, f"{self.kind} resource")
        except UserError as err:
            self._warn(f"{err}; rebuilding it")
            return None
        self.info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
        return payload

    def get(self, build: Callable[[Progress], tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
        """The cached payload, or `build(progress)` -> (payload, info) run, stored and returned.
        `build` may call `progress.save(state)` at safe points and `progress.load()` at its start."""
        cached = self._load_cached()
        if cached is not None:
            print(f"{self.kind}: using the cache in {self.folder}", flush=True)
            return cached
        folder = self.folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(os_error_message(err, f"create the {self.kind} cache folder (--resource_root)", folder)) from None
        lock = self._lock_for_building()
        try:
            cached = self._load_cached()  # built by the run this one waited for
            if cached is not None:
                print(f"{self.kind}: using the cache in {self.folder}", flush=True)
                return cached
            return self._build(build)
        finally:
            lock.release()

    def _lock_for_building(self) -> FolderLock:
        """Own the cache folder while building it: two runs needing the same resource (two attacks of
        one sweep, two sweeps on one root) would otherwise build it twice into one `partial.pt`. The
        second waits for the first (a stale lock is taken over, see utils/record/lock.py)."""
        waiting = False
        while True:
            try:
                return FolderLock(self.folder, f"{self.kind} resource").acquire()
            except LockHeld as err:
                if not waiting:
                    print(f"{self.kind}: waiting: {err}", file=sys.stderr, flush=True)
                    waiting = True
                time.sleep(WAIT_S)

    def _build(self, build) -> dict[str, Any]:
        folder = self.folder
        progress = Progress(folder / PARTIAL_FILE, self.key_digest)
        resumed = progress.path.exists()
        print(f"{self.kind}: {'resuming' if resumed else 'building'} in {folder}", flush=True)
        start = time.perf_counter()
        payload, info = build(progress)
        data_path = folder / RESOURCE_FILE
        save_torch(data_path, payload)
        self.info = dict(info)
        write_json(folder / META_FILE, {
            "kind": self.kind, "key": {"kind": self.kind, **self.key}, "sha256": file_sha256(data_path),
            "seconds": round(time.perf_counter() - start, 2), "info": self.info})
        progress.path.unlink(missing_ok=True)
        print(f"{self.kind}: done in {time.perf_counter() - start:.0f} s"
              + (f" ({', '.join(f'{k} {v}' for k, v in self.info.items())})" if self.info else ""), flush=True)
        return payload
