"""Tests for utils.data.datasets: every loader is fed tiny files written in the real on-disk formats."""
from __future__ import annotations

import gzip
import os
import pickle
import socket
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import datasets
from utils.data.datasets import DATASETS, ImageSet, dataset_info, load_dataset
from utils.engine.pipeline import Pipeline
from utils.errors import UserError

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_system_fmnist(monkeypatch, tmp_path):
    # The machine may have Debian's Fashion-MNIST installed; tests must only see their own files.
    monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", tmp_path / "no-system-fmnist")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# writers for the official formats


def write_cifar10(folder: Path, rows: int = 4, seed: int = 0) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    """Write data_batch_1..5 and test_batch; return (train data, train labels, test data, test labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, rows)]
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
                 b"filenames": [b"f.png"] * rows}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
    test_y = [int(v) for v in rng.integers(0, 10, rows)]
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": test_y, b"data": test_x}, protocol=2))
    return np.concatenate(train_x), train_y, test_x, test_y


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def write_fmnist(folder: Path, gz: bool, n_train: int = 6, n_test: int = 4, seed: int = 0) -> dict:
    rng = _rng(seed)
    out = {}
    suffix = ".gz" if gz else ""
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", y)
        out[split] = (x, y)
    return out


def _ppm(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format="PPM")


GT_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\r\n"


def write_gtsrb(train_dir: Path, test_dir: Path, test_csv_dir: Path | None = None,
                classes=(0, 5, 42), per_class: int = 2, size=(32, 32), seed: int = 0) -> dict:
    """Write GTSRB class folders with GT-000NN.csv and a test folder with GT-final_test.csv."""
    rng = _rng(seed)
    w, h = size
    train_x, train_y = [], []
    for c in classes:
        class_dir = train_dir / f"{c:05d}"
        lines = [GT_HEADER]
        for k in range(per_class):
            px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            name = f"{k:05d}_{0:05d}.ppm"
            _ppm(class_dir / name, px)
            lines.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{c}\r\n")
            train_x.append(px)
            train_y.append(c)
        (class_dir / f"GT-{c:05d}.csv").write_text("".join(lines), newline="")
    test_x, test_y = [], []
    lines = [GT_HEADER]
    for k, c in enumerate(classes[::-1]):
        px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"{k:05d}.ppm"
        _ppm(test_dir / name, px)
        lines.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{c}\r\n")
        test_x.append(px)
        test_y.append(c)
    csv_dir = test_csv_dir or test_dir
    csv_dir.mkdir(parents=True, exist_ok=True)
    (csv_dir / "GT-final_test.csv").write_text("".join(lines), newline="")
    return {"train": (np.stack(train_x), train_y), "test": (np.stack(test_x), test_y)}


def write_tiny(folder: Path, wnids=("n09999999", "n01111111"), per_class: int = 2) -> dict:
    """Write a tiny-imagenet-200 folder; wnids.txt deliberately unsorted. Images are flat colours
    so JPEG round-trips almost exactly."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    order = sorted(wnids)
    train = []
    for wi, wnid in enumerate(wnids):
        for k in range(per_class):
            colour = (40 * wi + 20, 10 * k + 50, 200)
            path = folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), colour).save(path, format="JPEG", quality=95)
            train.append((order.index(wnid), colour))
        # the real archive also has a boxes file beside images/
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
    ann = []
    val = []
    for k, wnid in enumerate([wnids[1], wnids[0], wnids[1]]):
        name = f"val_{k}.JPEG"
        if k == 2:  # greyscale JPEGs exist in the real data and must come back as RGB
            Image.new("L", (64, 64), 77).save(folder / "val" / "images" / name, format="JPEG", quality=95)
            colour = (77, 77, 77)
        else:
            colour = (100, 30 * k, 5)
            Image.new("RGB", (64, 64), colour).save(folder / "val" / "images" / name, format="JPEG", quality=95)
        ann.append(f"{name}\t{wnid}\t0\t0\t63\t63")
        val.append((order.index(wnid), colour))
    (folder / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return {"train": train, "test": val}


# ---------------------------------------------------------------------------------------------
# metadata


def test_dataset_info_table():
    assert set(DATASETS) == {"cifar10", "cifar100", "gtsrb", "tiny", "fmnist"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert len(info.mean) == len(info.std) == info.channels
    # BackdoorBench flips CIFAR-10 only, and normalises CIFAR-100 and Tiny with ImageNet statistics
    assert {n for n, i in DATASETS.items() if i.flip} == {"cifar10"}
    for name in ("cifar100", "tiny"):
        assert dataset_info(name).mean == (0.485, 0.456, 0.406)
        assert dataset_info(name).std == (0.229, 0.224, 0.225)
    assert dataset_info("fmnist").channels == 1 and dataset_info("fmnist").image_size == 28
    assert dataset_info("tiny").image_size == 64 and dataset_info("tiny").num_classes == 200
    assert dataset_info("gtsrb").mean == (0.0, 0.0, 0.0) and dataset_info("gtsrb").num_classes == 43


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_training_batches_are_mirrored_for_cifar10_only(name):
    """Without the crop, a training batch differs from the evaluation batch only by flips."""
    info = dataset_info(name)
    pipe = Pipeline.for_dataset(info, torch.device("cpu"))
    pipe.pad = 0
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, info.channels, info.image_size, info.image_size), generator=gen, dtype=torch.uint8)
    flipped = (pipe.train_batch(x, gen) != pipe.eval_batch(x)).flatten(1).any(1)
    assert bool(flipped.any()) == (name == "cifar10")


def test_unknown_dataset_lists_names(tmp_path):
    with pytest.raises(UserError) as e:
        dataset_info("mnist")
    for name in DATASETS:
        assert name in str(e.value)
    with pytest.raises(UserError, match="cifar10"):
        load_dataset("imagenet", tmp_path, train=True)


# ---------------------------------------------------------------------------------------------
# CIFAR


def _check_set(s: ImageSet, n: int, c: int, hw: int):
    assert isinstance(s, ImageSet)
    assert s.images.shape == (n, c, hw, hw)
    assert s.images.dtype == torch.uint8 and s.images.is_contiguous()
    assert s.labels.shape == (n,) and s.labels.dtype == torch.int64
    assert len(s) == n


@pytest.mark.parametrize("layout", ["named", "inner_under_root", "root_is_inner"])
def test_cifar10_roundtrip(tmp_path, layout):
    inner = {"named": tmp_path / "cifar10" / "cifar-10-batches-py",
             "inner_under_root": tmp_path / "cifar-10-batches-py",
             "root_is_inner": tmp_path / "cifar-10-batches-py"}[layout]
    tx, ty, vx, vy = write_cifar10(inner)
    root = inner if layout == "root_is_inner" else tmp_path
    train = load_dataset("cifar10", root, train=True)
    _check_set(train, 20, 3, 32)
    assert torch.equal(train.images, torch.from_numpy(tx.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == ty
    test = load_dataset("cifar10", str(root), train=False)
    _check_set(test, 4, 3, 32)
    assert torch.equal(test.images, torch.from_numpy(vx.reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == vy


def test_cifar10_channel_major_rows(tmp_path):
    # Row layout is 1024 red, then 1024 green, then 1024 blue values.
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar10(folder)
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": [3], b"data": row[None]}, protocol=2))
    s = load_dataset("cifar10", tmp_path, train=False)
    assert s.images[0, :, 7, 9].tolist() == [10, 20, 30]


def test_cifar_numpy1_module_names(tmp_path):
    # The official batches were pickled with numpy 1, which names numpy.core.multiarray.
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar10(folder)
    x = _rng(3).integers(0, 256, (2, 3072), dtype=np.uint8)
    raw = pickle.dumps({b"labels": [1, 2], b"data": x}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    (folder / "test_batch").write_bytes(raw)
    s = load_dataset("cifar10", tmp_path, train=False)
    assert torch.equal(s.images, torch.from_numpy(x.reshape(-1, 3, 32, 32)))


def test_cifar100_roundtrip(tmp_path):
    folder = tmp_path / "cifar100" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = _rng(1)
    data = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [f // 5 for f in fine]
        (folder / split).write_bytes(pickle.dumps(
            {b"filenames": [b"x"] * n, b"fine_labels": fine, b"coarse_labels": coarse, b"data": x}, protocol=2))
        data[split] = (x, fine)
    for split in ("train", "test"):
        s = load_dataset("cifar100", tmp_path, train=split == "train")
        x, fine = data[split]
        _check_set(s, len(fine), 3, 32)
        assert torch.equal(s.images, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
        assert s.labels.tolist() == fine


def test_cifar_missing_names_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", "data/", train=True)
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data/cifar10, data;" in msg and "--download true" in msg
    assert str(tmp_path) not in msg  # relative paths stay relative
    with pytest.raises(UserError, match="cifar-100-python in data/cifar100, data"):
        load_dataset("cifar100", "data", train=False)


def test_cifar_label_out_of_range(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar10(folder)
    x = np.zeros((2, 3072), np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": [0, 10], b"data": x}, protocol=2))
    with pytest.raises(UserError, match="labels"):
        load_dataset("cifar10", tmp_path, train=False)


def test_cifar_refuses_foreign_pickle(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": [0], b"data": os.getcwd}))
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", tmp_path, train=False)
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": [0]}, protocol=2)[:-5])
    with pytest.raises(UserError, match="test_batch"):
        load_dataset("cifar10", tmp_path, train=False)


def test_cifar_download_uses_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            calls.append((root, train, download, socket.getdefaulttimeout()))
            write_cifar10(Path(root) / "cifar-10-batches-py")

    fake_tv = types.SimpleNamespace(datasets=types.SimpleNamespace(CIFAR10=FakeCIFAR10))
    monkeypatch.setattr("utils.compat.import_torchvision", lambda: fake_tv)
    before = socket.getdefaulttimeout()
    s = load_dataset("cifar10", tmp_path, train=False, download=True)
    assert len(s) == 4
    assert calls == [(str(tmp_path / "cifar10"), False, True, 20)]
    assert socket.getdefaulttimeout() == before
    # second load finds the files and does not download again
    load_dataset("cifar10", tmp_path, train=False, download=True)
    assert len(calls) == 1


def test_download_failure_is_user_error(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, **kwargs):
            raise OSError("Network is unreachable")

    fake_tv = types.SimpleNamespace(datasets=types.SimpleNamespace(CIFAR100=Offline, FashionMNIST=Offline))
    monkeypatch.setattr("utils.compat.import_torchvision", lambda: fake_tv)
    with pytest.raises(UserError, match="could not download dataset 'cifar100'.*unreachable"):
        load_dataset("cifar100", tmp_path, train=True, download=True)
    with pytest.raises(UserError, match="could not download dataset 'fmnist'"):
        load_dataset("fmnist", tmp_path, train=True, download=True)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.parametrize("sub,gz", [("fmnist", True), ("fmnist", False), ("fmnist/FashionMNIST/raw", True),
                                    ("FashionMNIST/raw", False)])
def test_fmnist_roundtrip(tmp_path, sub, gz):
    data = write_fmnist(tmp_path / sub, gz=gz)
    for split in ("train", "test"):
        s = load_dataset("fmnist", tmp_path, train=split == "train")
        x, y = data[split]
        _check_set(s, len(y), 1, 28)
        assert torch.equal(s.images[:, 0], torch.from_numpy(x))
        assert s.labels.tolist() == y.tolist()


def test_fmnist_system_dir_is_last_resort(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_fmnist(system, gz=True, n_test=3, seed=1)
    monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", system)
    assert len(load_dataset("fmnist", tmp_path / "data", train=False)) == 3
    write_fmnist(tmp_path / "data" / "fmnist", gz=False, n_test=5, seed=2)
    assert len(load_dataset("fmnist", tmp_path / "data", train=False)) == 5


def test_fmnist_missing_mentions_apt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_dataset("fmnist", "data", train=True)
    msg = str(e.value)
    for folder in ("data/fmnist", "data/fmnist/FashionMNIST/raw", "data/FashionMNIST/raw"):
        assert folder in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte" in msg


@pytest.mark.parametrize("gz", [False, True])
def test_fmnist_truncated_idx(tmp_path, gz):
    folder = tmp_path / "fmnist"
    write_fmnist(folder, gz=gz)
    path = folder / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(UserError, match="truncated"):
        load_dataset("fmnist", tmp_path, train=False)
    path.write_bytes(raw[:10])
    with pytest.raises(UserError, match="t10k-images"):
        load_dataset("fmnist", tmp_path, train=False)


def test_fmnist_bad_magic_and_count_mismatch(tmp_path):
    folder = tmp_path / "fmnist"
    write_fmnist(folder, gz=False)
    # labels file put where the images file should be: wrong dimension count in the magic
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(UserError, match="magic"):
        load_dataset("fmnist", tmp_path, train=False)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(UserError, match="3 images but .* 4 labels"):
        load_dataset("fmnist", tmp_path, train=False)


@pytest.mark.skipif(not (REAL_FMNIST / "train-labels-idx1-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", REAL_FMNIST)
    s = load_dataset("fmnist", tmp_path, train=False)
    _check_set(s, 10000, 1, 28)
    assert torch.bincount(s.labels, minlength=10).tolist() == [1000] * 10


# ---------------------------------------------------------------------------------------------
# GTSRB


def _fail_decode(*args, **kwargs):
    raise AssertionError("decoder called although a valid cache exists")


def test_gtsrb_roundtrip_and_cache(tmp_path, monkeypatch):
    base = tmp_path / "gtsrb"
    data = write_gtsrb(base / "Train", base / "Test")
    for split in ("train", "test"):
        s = load_dataset("gtsrb", tmp_path, train=split == "train")
        x, y = data[split]
        _check_set(s, len(y), 3, 32)
        assert torch.equal(s.images, torch.from_numpy(x).permute(0, 3, 1, 2))
        assert s.labels.tolist() == y
        assert (base / f"gtsrb_{split}_uint8.pt").is_file()
    assert not list(base.glob("*.tmp"))

    # Second load must come from the cache: the decoder is disabled and the images deleted.
    monkeypatch.setattr(datasets, "_decode_images", _fail_decode)
    for ppm in base.rglob("*.ppm"):
        ppm.unlink()
    again = load_dataset("gtsrb", tmp_path, train=True)
    assert torch.equal(again.images, torch.from_numpy(data["train"][0]).permute(0, 3, 1, 2))
    assert again.labels.tolist() == data["train"][1]

    # A changed number of source files invalidates the cache.
    csv = base / "Train" / "00005" / "GT-00005.csv"
    csv.write_text(csv.read_text() + "00009_00000.ppm;32;32;5;5;27;27;5\n")
    with pytest.raises(AssertionError, match="decoder called"):
        load_dataset("gtsrb", tmp_path, train=True)


def test_gtsrb_resizes_to_32(tmp_path):
    base = tmp_path / "gtsrb"
    write_gtsrb(base / "Train", base / "Test", classes=(1, 2), per_class=1, size=(47, 39))
    s = load_dataset("gtsrb", base, train=False)  # root pointing at the gtsrb folder itself
    _check_set(s, 2, 3, 32)
    assert s.labels.tolist() == [2, 1]


def test_gtsrb_official_layout(tmp_path):
    gt = tmp_path / "GTSRB"
    # GT-final_test.csv beside the Images folder, as unpacked from the separate GT archive
    data = write_gtsrb(gt / "Final_Training" / "Images", gt / "Final_Test" / "Images",
                       test_csv_dir=gt / "Final_Test")
    train = load_dataset("gtsrb", tmp_path, train=True)
    test = load_dataset("gtsrb", tmp_path, train=False)
    assert train.labels.tolist() == data["train"][1]
    assert test.labels.tolist() == data["test"][1]
    assert torch.equal(test.images, torch.from_numpy(data["test"][0]).permute(0, 3, 1, 2))
    assert (tmp_path / "gtsrb_train_uint8.pt").is_file()


def test_gtsrb_unwritable_folder_skips_cache(tmp_path, monkeypatch):
    base = tmp_path / "gtsrb"
    write_gtsrb(base / "Train", base / "Test", per_class=1)

    def no_write(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", no_write)
    s = load_dataset("gtsrb", tmp_path, train=True)
    assert len(s) == 3
    assert not list(base.glob("*.pt"))


def test_gtsrb_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_dataset("gtsrb", "data", train=True, download=True)
    msg = str(e.value)
    assert "data/gtsrb, data" in msg and "Train" in msg and "GTSRB/Final_Training/Images" in msg
    assert "no automatic download" in msg

    base = tmp_path / "data" / "gtsrb"
    write_gtsrb(base / "Train", base / "Test", per_class=1)
    (base / "Test" / "GT-final_test.csv").unlink()
    with pytest.raises(UserError, match="GT-final_test.csv in data/gtsrb/Test"):
        load_dataset("gtsrb", "data", train=False)

    (base / "Train" / "00000" / "00000_00000.ppm").unlink()
    with pytest.raises(UserError, match="00000_00000.ppm is missing"):
        load_dataset("gtsrb", "data", train=True)

    (base / "Train" / "00000" / "00000_00000.ppm").write_bytes(b"P6 garbage")
    with pytest.raises(UserError, match="cannot decode"):
        load_dataset("gtsrb", "data", train=True)


def test_gtsrb_label_out_of_range(tmp_path):
    base = tmp_path / "gtsrb"
    write_gtsrb(base / "Train", base / "Test", classes=(3, 43), per_class=1)
    with pytest.raises(UserError, match=r"\[0, 42\]"):
        load_dataset("gtsrb", tmp_path, train=True)


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet


def _assert_colours(s: ImageSet, expected):
    assert s.labels.tolist() == [label for label, _ in expected]
    for img, (_, colour) in zip(s.images, expected):
        mean = img.float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor(colour, dtype=torch.float32), atol=3), (mean, colour)


@pytest.mark.parametrize("layout", ["named", "inner_under_root", "root_is_inner"])
def test_tiny_roundtrip_and_cache(tmp_path, monkeypatch, layout):
    folder = tmp_path / ("tiny" if layout == "named" else "") / "tiny-imagenet-200"
    data = write_tiny(folder)
    root = folder if layout == "root_is_inner" else tmp_path
    train = load_dataset("tiny", root, train=True)
    _check_set(train, 4, 3, 64)
    # class order is the sorted wnids, whatever order wnids.txt lists them in
    _assert_colours(train, sorted(data["train"], key=lambda t: t[0]))
    test = load_dataset("tiny", root, train=False)
    _check_set(test, 3, 3, 64)
    _assert_colours(test, data["test"])
    assert (folder / "tiny_train_uint8.pt").is_file() and (folder / "tiny_test_uint8.pt").is_file()

    monkeypatch.setattr(datasets, "_decode_images", _fail_decode)
    assert torch.equal(load_dataset("tiny", root, train=True).images, train.images)
    assert torch.equal(load_dataset("tiny", root, train=False).images, test.images)


def test_tiny_resizes_odd_images(tmp_path):
    folder = tmp_path / "tiny" / "tiny-imagenet-200"
    write_tiny(folder)
    Image.new("RGB", (50, 70), (1, 2, 3)).save(folder / "val" / "images" / "val_0.JPEG", format="JPEG")
    _check_set(load_dataset("tiny", tmp_path, train=False), 3, 3, 64)


def test_tiny_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_dataset("tiny", "data", train=False)
    msg = str(e.value)
    assert "tiny-imagenet-200" in msg and "data/tiny, data" in msg and "no automatic download" in msg

    folder = tmp_path / "data" / "tiny" / "tiny-imagenet-200"
    write_tiny(folder)
    ann = folder / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_9.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match="line 4"):
        load_dataset("tiny", "data", train=False)
