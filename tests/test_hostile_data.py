"""Hostile and malformed data files (issue 13): huge or damaged trigger images, size options that
would allocate before being checked, a dataset folder that is a file or empty, every supported
on-disk dataset format damaged or lying about its sizes, and the file mode of the dataset caches.

User errors go through the real command line where that is cheap (the attack stops while loading,
before any training) and must end with one `error:` line, exit status 2, no traceback and nothing
written under the record root; the other cases are checked at the loader, as one-line UserErrors.
Every hostile file here is small: headers claim the huge sizes, nothing huge is ever allocated."""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO_ROOT, write_tiny_fmnist
from test_datasets import write_gtsrb, write_tiny
from utils.attacks import triggers
from utils.data import datasets
from utils.data.datasets import load_dataset, read_image
from utils.engine.pipeline import Pipeline
from utils.errors import UserError
from utils.record.layout import CONFIG_FILE


@pytest.fixture(autouse=True)
def _no_system_fmnist(monkeypatch, tmp_path):
    # only the fallback tests below may see a system copy of Fashion-MNIST
    monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", tmp_path / "no-system-fmnist")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# small files that claim huge sizes


def huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid PNG header (IHDR) claiming width x height grey pixels, with only a few rows of data:
    about 150 bytes on disk, however large the claim."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress((b"\x00" + b"\x80" * width) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def huge_ppm(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"P6\n20000 20000\n255\n" + b"\x00" * 64)
    return path


class _RunsShell:
    """Unpickling this calls os.system: what a hostile 'CIFAR batch' would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _HugeArray:
    """Unpickling this calls numpy.ndarray with a shape of 3 PB."""

    def __reduce__(self):
        return (np.ndarray, ((10**12, 3072), np.dtype("u1")))


class _ShapeWithoutData:
    """numpy's own reconstruction, with a state declaring 10^6 rows but 10 bytes of data."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, (10**6, 3072), np.dtype("u1"), False, b"\x00" * 10))


def _batch(data, labels) -> bytes:
    return pickle.dumps({b"batch_label": b"training batch 1 of 5", b"labels": labels, b"data": data}, protocol=2)


# BINBYTES8 (protocol 4) claiming a 1 TB bytes object, followed by 3 bytes
BINBYTES8_HUGE = b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"abc"


def _idx(dims, data: bytes = b"") -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims) + data


# ---------------------------------------------------------------------------------------------
# the command line


def _cifar_copy(tiny_cifar10: Path, where: Path, batch: bytes | None = None) -> Path:
    shutil.copytree(tiny_cifar10, where)
    if batch is not None:
        (where / "cifar10" / "cifar-10-batches-py" / "data_batch_1").write_bytes(batch)
    return where


def _cli_cases(tiny_cifar10: Path, base: Path) -> list[tuple[str, str, str, Path, list[str], list[str]]]:
    """(name, script, prototype, dataset_path, extra flags, fragments of the error line)."""
    cifar, fmnist = "config/attack/prototype/cifar10.yaml", "config/attack/prototype/fmnist.yaml"
    batch = lambda name: str(base / name / "cifar10" / "cifar-10-batches-py" / "data_batch_1")  # noqa: E731
    marker = base / "pickle-ran-code"
    good = np.zeros((60, 3072), np.uint8)
    # (the other malformed batches are checked at the loader below: the command line adds nothing)
    cases = [
        ("labels-none", _cifar_copy(tiny_cifar10, base / "labels-none", _batch(good, None)),
         "badnet", cifar, [], [batch("labels-none"), "'labels'", "not a list of integers"]),
        ("pickle-runs-code", _cifar_copy(tiny_cifar10, base / "pickle-runs-code", pickle.dumps(_RunsShell(marker))),
         "badnet", cifar, [], [batch("pickle-runs-code"), "refusing to load", "system"]),
        ("dataset-path-file", huge_png(base / "a-file.png"), "badnet", cifar, [],
         [str(base / "a-file.png"), "is a file", "folder"]),
        ("trigger-huge-png", tiny_cifar10, "blended", cifar, ["--trigger_path", str(huge_png(base / "bomb.png"))],
         [str(base / "bomb.png"), "trigger_path", "400000000 pixels", "4096x4096"]),
        ("patch-size-huge", tiny_cifar10, "badnet", cifar, ["--patch_size", "2000000000"],
         ["--patch_size", "[1, 32]", "2000000000"]),
        ("input-size-huge", tiny_cifar10, "badnet", cifar, ["--input_size", "100000"],
         ["--input_size", "[0, 4096]", "100000"]),
    ]
    idx_dir = base / "fmnist-huge-dim"
    write_tiny_fmnist(idx_dir, n_train=10, n_test=10)
    img = idx_dir / "fmnist" / "train-images-idx3-ubyte.gz"
    img.unlink()
    (idx_dir / "fmnist" / "train-images-idx3-ubyte").write_bytes(_idx((2**31, 28, 28), b"\x00" * 784))
    cases.append(("fmnist-huge-dim", idx_dir, "badnet", fmnist, [],
                  [str(idx_dir / "fmnist" / "train-images-idx3-ubyte"), "declares shape (2147483648, 28, 28)"]))
    return [(name, script, proto, path, extra, frags) for name, path, script, proto, extra, frags in cases]


def test_hostile_files_and_sizes_through_the_command_line(tiny_cifar10, tmp_path):
    cases = _cli_cases(tiny_cifar10, tmp_path / "data")

    def run(case):
        name, script, proto, data_path, extra, _ = case
        argv = [sys.executable, f"attack/{script}.py", "--yaml_path", proto, "--dataset_path", str(data_path),
                "--download", "false", "--model", "smallcnn", "--epochs", "1", "--device", "cpu", "--progress", "false",
                "--record_root", str(tmp_path / "records" / name), *extra]
        return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = list(pool.map(run, cases))
    for (name, *_, fragments), proc in zip(cases, procs):
        assert "Traceback" not in proc.stderr + proc.stdout, f"{name}:\n{proc.stderr}"
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{proc.stderr}"
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}:\n{proc.stderr}"
        for fragment in fragments:
            assert fragment in lines[0], f"{name}: {fragment!r} not in {lines[0]!r}"
        assert not (tmp_path / "records" / name).exists(), f"{name}: something was written under the record root"
    assert not (tmp_path / "data" / "pickle-ran-code").exists(), "the hostile pickle ran its command"


# ---------------------------------------------------------------------------------------------
# CIFAR pickles


def _cifar_dir(tmp_path: Path) -> Path:
    from test_datasets import write_cifar10
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    write_cifar10(folder)
    return folder


@pytest.mark.parametrize("name,payload,fragments", [
    ("labels-strings", _batch(np.zeros((4, 3072), np.uint8), ["a", "b", "c", "d"]), ["not a list of integers"]),
    ("labels-none-inside", _batch(np.zeros((2, 3072), np.uint8), [1, None]), ["not a list of integers"]),
    ("labels-bools", _batch(np.zeros((2, 3072), np.uint8), [True, False]), ["not a list of integers"]),
    ("labels-2d-array", _batch(np.zeros((2, 3072), np.uint8), np.zeros((2, 1), np.int64)), ["not a list of integers"]),
    ("data-list", _batch([[0] * 3072] * 2, [1, 2]), ["holds data a list", "N×3072 uint8"]),
    ("data-float", _batch(np.zeros((2, 3072), np.float32), [1, 2]), ["(2, 3072) float32"]),
    ("data-wrong-width", _batch(np.zeros((2, 100), np.uint8), [1, 2]), ["(2, 100) uint8"]),
    ("data-none", _batch(None, [1, 2]), ["holds data a NoneType"]),
    ("shape-without-data", _batch(_ShapeWithoutData(), [0]), ["buffer size does not match"]),
    ("huge-array-call", _batch(_HugeArray(), [0]), ["refusing to call numpy.ndarray directly"]),
    ("binbytes8-1tb", BINBYTES8_HUGE, ["corrupt or not the official python format"]),
    ("not-a-dict", pickle.dumps([1, 2, 3]), ["is not a dict"]),
    ("no-labels", pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}), ["lacks the 'data' or 'labels'"]),
    ("empty-file", b"", ["corrupt or not the official python format"]),
    ("truncated", _batch(np.zeros((4, 3072), np.uint8), [1, 2, 3, 4])[:5000], ["corrupt"]),
])
def test_malformed_cifar_batch_is_one_line(tmp_path, name, payload, fragments):
    path = _cifar_dir(tmp_path) / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", tmp_path, train=True)
    _one_line(err, str(path), *fragments)


def test_cifar_pickle_running_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = _cifar_dir(tmp_path) / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_RunsShell(marker)]}))
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", tmp_path, train=False)
    _one_line(err, str(path), "refusing to load", "system")
    assert not marker.exists()


def test_cifar_batch_larger_than_any_official_one_is_not_read(tmp_path, monkeypatch):
    path = _cifar_dir(tmp_path) / "data_batch_1"
    monkeypatch.setattr(datasets, "CIFAR_MAX_FILE_BYTES", path.stat().st_size - 1)
    with pytest.raises(UserError) as err:
        load_dataset("cifar10", tmp_path, train=True)
    _one_line(err, str(path), "more than any official batch")


def test_cifar_numpy_labels_still_load(tmp_path):
    """Batches re-pickled from numpy (labels an int array, or a list of numpy integers) are fine."""
    folder = _cifar_dir(tmp_path)
    data = np.full((3, 3072), 7, np.uint8)
    (folder / "test_batch").write_bytes(_batch(data, np.array([1, 2, 3])))
    assert load_dataset("cifar10", tmp_path, train=False).labels.tolist() == [1, 2, 3]
    (folder / "test_batch").write_bytes(_batch(data, [np.int64(4), np.int64(5), np.int64(6)]))
    assert load_dataset("cifar10", tmp_path, train=False).labels.tolist() == [4, 5, 6]


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST idx files


def _fmnist(tmp_path: Path) -> Path:
    write_tiny_fmnist(tmp_path, n_train=10, n_test=10)
    return tmp_path / "fmnist"


@pytest.mark.parametrize("name,content,fragments", [
    ("huge-count-raw", _idx((2**31, 28, 28), b"\x00" * 784), ["declares shape (2147483648, 28, 28)", "MB at most"]),
    ("huge-count-gz", gzip.compress(_idx((2**31, 28, 28), b"\x00" * 784)), ["declares shape (2147483648, 28, 28)"]),
    ("huge-sides", _idx((10, 2**20, 2**20)), ["declares 1048576x1048576 images, expected 28x28"]),
    ("gz-inflates-past-header", gzip.compress(_idx((10, 28, 28), bytes(16 * 2**20))), ["holds more bytes"]),
    ("gz-truncated", gzip.compress(_idx((10, 28, 28), bytes(7840)))[:-30], ["cannot read idx file", "truncated"]),
    ("gz-garbage", b"\x1f\x8b" + b"\xff" * 64, ["cannot read idx file"]),
    ("raw-short", _idx((10, 28, 28), b"\x00" * 100), ["holds 100 bytes of data"]),
    ("header-short", b"\x00\x00\x08\x03\x00", ["shorter than its header"]),
    ("wrong-magic", _idx((10, 28), bytes(280)), ["magic number 0x00000802"]),
], ids=lambda value: value if isinstance(value, str) else "")  # stable ids: gzip bytes hold a timestamp
def test_malformed_idx_file_is_one_line(tmp_path, name, content, fragments):
    folder = _fmnist(tmp_path)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    path = folder / ("t10k-images-idx3-ubyte.gz" if content[:2] == b"\x1f\x8b" else "t10k-images-idx3-ubyte")
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_dataset("fmnist", tmp_path, train=False)
    _one_line(err, str(path), *fragments)


# ---------------------------------------------------------------------------------------------
# --dataset_path a file, an empty folder, and the system copy of Fashion-MNIST


@pytest.mark.parametrize("name", ["cifar10", "fmnist", "gtsrb", "tiny", "cifar100"])
def test_dataset_path_that_is_a_file_is_one_line(tmp_path, monkeypatch, name):
    # even with a system copy of Fashion-MNIST to fall back to
    monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", _fmnist(tmp_path / "system"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(UserError) as err:
        load_dataset(name, a_file, train=True)
    _one_line(err, str(a_file), "is a file")


def test_fmnist_fallback_is_announced_and_recorded(tmp_path, monkeypatch, capsys):
    """An empty --dataset_path: the system copy is used, said in one `note:` line (once for both
    splits), and the record's config.yaml names the folder actually read."""
    from conftest import attack_argv
    from utils.victim.train import run_attack

    system = tmp_path / "system"
    _fmnist(system)
    system = system / "fmnist"
    monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", system)
    monkeypatch.setattr(datasets, "_NOTED", set())
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = attack_argv(empty, tmp_path / "records", "--yaml_path", "config/attack/prototype/fmnist.yaml",
                       "--train_subset", "40", "--test_subset", "20")
    folder = run_attack("badnet", argv)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: dataset")]
    assert notes == [f"note: dataset 'fmnist' not found under {empty}; reading the system copy in {system}"]
    assert yaml.safe_load((folder / CONFIG_FILE).read_text())["dataset_path"] == str(system)
    # and so does a purification of that record, given the same empty folder
    from utils.commands import finetune
    finetune.main(["--dataset", "fmnist", "--dataset_path", str(empty), "--model", "smallcnn",
                   "--record_root", str(tmp_path / "records"), "--attack", "badnet", "--device", "cpu",
                   "--ft_mode", "lp", "--epochs", "1", "--split_ratio", "0.5", "--progress", "false"])
    tuned = yaml.safe_load((folder / "defense" / "lp" / CONFIG_FILE).read_text())
    assert tuned["dataset_path"] == str(system)


def test_loader_reports_the_folder_it_read(tmp_path, monkeypatch, capsys):
    system = _fmnist(tmp_path / "system")
    monkeypatch.setattr(datasets, "FMNIST_SYSTEM_DIR", system)
    monkeypatch.setattr(datasets, "_NOTED", set())
    _fmnist(tmp_path / "own")
    assert load_dataset("fmnist", tmp_path / "own", train=False).root == tmp_path / "own"
    assert capsys.readouterr().err == ""
    for missing in (tmp_path / "empty", tmp_path / "does-not-exist"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert load_dataset("fmnist", missing, train=False).root == system
        assert capsys.readouterr().err.startswith(f"note: dataset 'fmnist' not found under {missing}")
    # given the system folder itself, nothing is a fallback
    assert load_dataset("fmnist", system, train=False).root == system
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# GTSRB (ppm + csv) and Tiny-ImageNet folders


def _gtsrb(tmp_path: Path) -> Path:
    base = tmp_path / "gtsrb"
    write_gtsrb(base / "Train", base / "Test", per_class=1)
    return base


def test_gtsrb_malformed_annotations_are_one_line(tmp_path):
    base = _gtsrb(tmp_path)
    csv_path = base / "Test" / "GT-final_test.csv"
    good = csv_path.read_text()
    header, first = good.splitlines()[:2]
    for content, fragments in [
        (b"Filename;ClassId\r\n\xff\xfe\xfa;1\r\n", ["not UTF-8 text"]),
        ((header + "\r\n" + "x" * 200_000 + "\r\n").encode(), ["not a readable GTSRB annotation file"]),
        ((header + "\r\n../../escape.ppm;32;32;5;5;27;27;1\r\n").encode(), ["'../../escape.ppm'", "not a plain file name"]),
        ((header + "\r\n00000.ppm;32;32;5;5;27;27;seven\r\n").encode(), ["line 2", "'seven' is not an integer"]),
    ]:
        csv_path.write_bytes(content)
        with pytest.raises(UserError) as err:
            load_dataset("gtsrb", tmp_path, train=False)
        _one_line(err, str(csv_path), *fragments)
    # a row with more cells than the header is read, its extra cells ignored
    csv_path.write_text(good.replace(first, first + ";extra;cells"), newline="")
    assert len(load_dataset("gtsrb", tmp_path, train=False)) == 3


def test_gtsrb_image_claiming_a_huge_size_is_refused_before_decoding(tmp_path):
    base = _gtsrb(tmp_path)
    ppm = huge_ppm(base / "Test" / "00001.ppm")
    with pytest.raises(UserError) as err:
        load_dataset("gtsrb", tmp_path, train=False)
    _one_line(err, str(ppm), "400000000 pixels", "4096x4096")
    assert not (base / "gtsrb_test_uint8.pt").exists()


def test_tiny_malformed_files_are_one_line(tmp_path):
    folder = tmp_path / "tiny" / "tiny-imagenet-200"
    write_tiny(folder)
    wnids = folder / "wnids.txt"
    good = wnids.read_text()
    wnids.write_bytes(b"n0\xff\xfe\n")
    with pytest.raises(UserError) as err:
        load_dataset("tiny", tmp_path, train=False)
    _one_line(err, str(wnids), "not UTF-8 text")
    wnids.write_text("\n")
    with pytest.raises(UserError) as err:
        load_dataset("tiny", tmp_path, train=False)
    _one_line(err, str(wnids), "lists no class")
    wnids.write_text(good)

    ann = folder / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "../../../escape.JPEG\tn01111111\t0\t0\t1\t1\n")
    with pytest.raises(UserError) as err:
        load_dataset("tiny", tmp_path, train=False)
    _one_line(err, str(ann), "line 4", "not a plain file name")

    # a train "JPEG" that is a PNG header claiming 20000 x 20000 pixels
    bomb = huge_png(folder / "train" / "n01111111" / "images" / "n01111111_0.JPEG")
    with pytest.raises(UserError) as err:
        load_dataset("tiny", tmp_path, train=True)
    _one_line(err, str(bomb), "400000000 pixels")


# ---------------------------------------------------------------------------------------------
# trigger images and size options


@pytest.mark.parametrize("claim", [(20000, 20000), (10000, 10000), (5000, 4000)])
def test_trigger_image_claiming_a_huge_size_is_refused(tmp_path, claim):
    """Past twice PIL's limit it raises, past the limit it warns, below it only our limit applies."""
    path = huge_png(tmp_path / "key.png", *claim)
    with pytest.raises(UserError) as err:
        triggers.blend_key(3, 32, str(path))
    _one_line(err, str(path), "trigger_path", "pixels", "4096x4096")


def test_trigger_image_damaged_or_not_a_file(tmp_path):
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(UserError) as err:
        triggers.blend_key(1, 28, str(truncated))
    _one_line(err, str(truncated), "cannot decode")
    with pytest.raises(UserError) as err:
        triggers.blend_key(3, 32, str(tmp_path))
    _one_line(err, str(tmp_path), "is a folder")
    ok = tmp_path / "ok.png"
    Image.new("RGB", (4096, 2), (10, 20, 30)).save(ok)  # at the limit's edge in one direction: fine
    assert read_image(ok, "RGB", 8, "x").shape == (8, 8, 3)


def test_badnet_patch_is_checked_before_allocating():
    with pytest.raises(UserError) as err:
        triggers.badnet_trigger("square", 3, 32, 2_000_000_000)
    _one_line(err, "patch_size 2000000000", "does not fit 32 px")
    with pytest.raises(UserError) as err:
        triggers.badnet_trigger("grid", 1, 28, 30)
    _one_line(err, "patch_size 30", "does not fit 28 px")


def test_pipeline_refuses_a_huge_input_size():
    """A record carrying input_size 100000 must not reach the resize of the first batch."""
    import torch
    info = datasets.dataset_info("cifar10")
    with pytest.raises(UserError) as err:
        Pipeline.for_dataset(info, torch.device("cpu"), 100_000)
    _one_line(err, "input_size", "4096")
    assert Pipeline.for_dataset(info, torch.device("cpu"), 224).input_size == 224


# ---------------------------------------------------------------------------------------------
# dataset caches: the usual file mode


def test_dataset_cache_gets_the_usual_file_mode(tmp_path):
    """mkstemp's 0600 would make a cache in a shared data folder unreadable to the rest of the group."""
    base = _gtsrb(tmp_path)
    load_dataset("gtsrb", tmp_path, train=True)
    cache = base / "gtsrb_train_uint8.pt"
    assert cache.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert not [p for p in base.iterdir() if p.name.endswith(".tmp")]


def test_ssba_batch_size_is_bounded():
    """SSBA draws a whole batch of indices at once: 10^12 must be refused, not allocated."""
    from utils.attacks import ssba
    cfg = {o.name: o.default for o in ssba.SSBA_OPTIONS}
    cfg["ssba_batch_size"] = 10**12
    with pytest.raises(UserError) as err:
        ssba.check_options(cfg, 32)
    _one_line(err, "ssba_batch_size", "4096")
