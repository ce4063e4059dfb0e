"""Shared fixtures: tiny datasets written in the real on-disk formats, and one attack record.

Everything is session-scoped and lives under pytest's tmp folder, so the repository's own `data/`
and `record/` folders are never touched.
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread, here and (through the environment) in the entry scripts the tests start.
# On a small machine shared with other jobs, two OpenMP threads per process were measured to stall
# now and then (a 300-image epoch taking 20 s instead of 0.6 s); one thread is steady. An
# OMP_NUM_THREADS set by the caller is respected, and `engine.configure_threads` leaves it alone.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]

CIFAR_TRAIN_PER_BATCH = 60  # 5 batches -> 300 training images, 6 per class per batch
CIFAR_TEST = 100
NUM_CLASSES = 10

# The attack every test reuses: BadNet on the tiny CIFAR-10, smallcnn, one epoch, on the CPU.
RECORD_REL = Path("cifar10") / "badnet" / "pratio_0.1-target_0-archi_smallcnn"


def _class_images(labels: np.ndarray, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, C, size, size): a class-dependent colour per channel plus a class-dependent
    horizontal/vertical gradient and noise, so that a small CNN separates the classes quickly."""
    palette = np.random.default_rng(1234).integers(30, 226, (NUM_CLASSES, channels)).astype(np.float32)
    ramp = np.linspace(-40, 40, size, dtype=np.float32)
    out = np.empty((len(labels), channels, size, size), dtype=np.uint8)
    for i, y in enumerate(labels):
        base = palette[y][:, None, None] + np.zeros((channels, size, size), np.float32)
        if y % 2:
            base += ramp[None, :, None]  # vertical gradient for odd classes
        else:
            base += ramp[None, None, :]  # horizontal gradient for even classes
        noisy = base + rng.normal(0, 12, base.shape)
        out[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return out


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(n) % NUM_CLASSES
    rng.shuffle(labels)
    return labels


def write_tiny_cifar10(root: Path, seed: int = 0) -> Path:
    """`root/cifar10/cifar-10-batches-py/{data_batch_1..5,test_batch}` as the official python pickles."""
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = [(f"data_batch_{i}", CIFAR_TRAIN_PER_BATCH, f"training batch {i} of 5") for i in range(1, 6)]
    splits.append(("test_batch", CIFAR_TEST, "testing batch 1 of 1"))
    for name, n, batch_label in splits:
        labels = _balanced_labels(n, rng)
        images = _class_images(labels, 3, 32, rng)
        batch = {
            b"batch_label": batch_label.encode(),
            b"labels": [int(y) for y in labels],
            b"data": images.reshape(n, 3 * 32 * 32),  # channel-major rows: 1024 R, 1024 G, 1024 B
            b"filenames": [f"img_{name}_{i}.png".encode() for i in range(n)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_tiny_fmnist(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """`root/fmnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` in the official idx format."""
    folder = root / "fmnist"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = _balanced_labels(n, rng)
        images = _class_images(labels, 1, 28, rng)[:, 0]
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def tiny_cifar10(tmp_path_factory) -> Path:
    """A `--dataset_path` folder holding a tiny, learnable CIFAR-10 (300 train / 100 test images)."""
    return write_tiny_cifar10(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory) -> Path:
    """A `--dataset_path` folder holding a tiny Fashion-MNIST (200 train / 100 test images)."""
    return write_tiny_fmnist(tmp_path_factory.mktemp("tiny-fmnist"))


def run_in_process(main, argv, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of an entry point run in this process as `python -m` runs it
    (through run_cli), for error cases that need no subprocess."""
    from utils.errors import run_cli

    capsys.readouterr()
    try:
        run_cli(lambda: main([str(a) for a in argv]))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def flip_middle_byte(path: Path) -> None:
    """Damage a file in place (one byte inverted), as a disk or copy error would."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def attack_argv(data_root: Path, record_root: Path, *extra: str) -> list[str]:
    """Flags for a fast BadNet run on the tiny CIFAR-10 (smallcnn, one epoch, CPU)."""
    return ["--yaml_path", "config/attack/prototype/cifar10.yaml", "--dataset_path", str(data_root),
            "--download", "false", "--model", "smallcnn", "--epochs", "1", "--device", "cpu",
            "--record_root", str(record_root), "--progress", "false", "--batch_size", "32", *extra]


@pytest.fixture(scope="session")
def badnet_record(tiny_cifar10, tmp_path_factory) -> Path:
    """The record folder of one BadNet run on the tiny CIFAR-10 (run once per session). Treat it as
    read-only: tests that write into a record work on a copy (`copy_record`)."""
    from utils.victim.train import run_attack

    root = tmp_path_factory.mktemp("session-record")
    folder = run_attack("badnet", attack_argv(tiny_cifar10, root))
    assert folder == root / RECORD_REL
    return folder


def copy_record(record_folder: Path, new_root: Path, rel: Path = RECORD_REL) -> Path:
    """Copy a record folder to `new_root/rel` (same layout, so ft.py finds it); returns the copy."""
    target = new_root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(record_folder, target)
    return target
