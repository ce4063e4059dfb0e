"""Hostile and malformed data files (issue 13): huge or damaged trigger images, size options that
would allocate before being checked, a dataset folder that is a file or empty, every on-disk dataset
format damaged or lying about its sizes, and the file mode of the dataset caches.

User errors go through the real command line where that is cheap (the attack fails while loading,
before any training) and are checked as one `error:` line, exit status 2, no traceback and nothing
left under the record root; the rest at the loader level as one-line `UserError`s."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import datasets
from utils.data.datasets import load_dataset
from utils.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_datasets import write_gtsrb  # noqa: E402  (the official-format writers live there)


@pytest.fixture(autouse=True)
def _no_system_fmnist(monkeypatch, tmp_path):
    # only the fallback tests below may see a system copy of Fashion-MNIST
    monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", tmp_path / "no-system-fmnist")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# dataset caches: the usual file mode


def test_dataset_cache_gets_the_usual_file_mode(tmp_path):
    """mkstemp's 0600 would make a cache in a shared data folder unreadable to the rest of the group."""
    base = tmp_path / "gtsrb"
    write_gtsrb(base / "Train", base / "Test", per_class=1)
    load_dataset("gtsrb", tmp_path, train=True)
    cache = base / "gtsrb_train_uint8.pt"
    assert cache.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert not list(base.glob("*.tmp"))
