"""Dataset metadata and loaders that turn every supported on-disk format into uint8 tensors.

Each split is decoded once into an `ImageSet` (images uint8 N×C×H×W, labels int64). Formats that
need thousands of image decodes (GTSRB, Tiny-ImageNet) are cached next to the data as
`<name>_<split>_uint8.pt`.
"""
from __future__ import annotations

import csv
import gzip
import pickle
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from utils import compat
from utils.errors import UserError
from utils.fileio import atomic_write


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a dataset: classes, geometry, normalisation and augmentation policy."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool


@dataclass
class ImageSet:
    """A whole split in memory: `images` uint8 (N, C, H, W) contiguous, `labels` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: every registered data set; `register_dataset` adds one
DATASETS: dict[str, DatasetInfo] = {}
Loader = Callable[[DatasetInfo, Path, bool, bool], ImageSet]  # (info, root, train, download) -> ImageSet
_LOADERS: dict[str, Loader] = {}


def register_dataset(info: DatasetInfo, loader: Loader) -> DatasetInfo:
    """Make a data set known to every command: its description and a loader from files under a root."""
    if info.name in DATASETS:
        raise ValueError(f"dataset {info.name!r} registered twice")
    DATASETS[info.name] = info
    _LOADERS[info.name] = loader
    return info


# Debian's dataset-fashion-mnist package; a module constant so tests can point it elsewhere.
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

# Below this many files a progress bar is only noise.
_PROGRESS_MIN_FILES = 500
_CACHE_VERSION = 1


def dataset_info(name: str) -> DatasetInfo:
    """Return the `DatasetInfo` for `name`; UserError listing the valid names if it is unknown."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}") from None


def load_dataset(name: str, root: str | Path, train: bool, download: bool = False) -> ImageSet:
    """Load the train or test split of dataset `name` from under `root` as uint8 tensors.

    `download=True` fetches cifar10, cifar100 and fmnist into `root/<name>` when they are missing;
    gtsrb and tiny must be placed by hand.
    """
    info = dataset_info(name)
    root = Path(root)
    loader = _LOADERS[name]
    data = loader(info, root, train, download)
    _check(info, data, "train" if train else "test")
    return data


# ----------------------------------------------------------------------------------------------
# shared helpers


def _fmt_dirs(dirs: Sequence[Path]) -> str:
    seen: list[str] = []
    for d in dirs:
        if str(d) not in seen:
            seen.append(str(d))
    return ", ".join(seen)


def _unique(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def _check(info: DatasetInfo, data: ImageSet, split: str) -> None:
    images, labels = data.images, data.labels
    n = labels.shape[0]
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] != n or images.shape[1] != info.channels:
        # Only a loader bug or a tampered cache can get here, so it is not a user-facing message.
        raise RuntimeError(f"{info.name} {split}: bad image tensor {tuple(images.shape)} {images.dtype}")
    if n == 0:
        raise UserError(f"dataset '{info.name}' {split} split is empty")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= info.num_classes:
        raise UserError(
            f"dataset '{info.name}' {split} split has labels in [{lo}, {hi}] but must be in "
            f"[0, {info.num_classes - 1}]; the data files are not the official {info.name} files"
        )


def _make_set(images: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray) -> ImageSet:
    imgs = torch.as_tensor(images)
    if imgs.dtype != torch.uint8:
        imgs = imgs.to(torch.uint8)
    return ImageSet(imgs.contiguous(), torch.as_tensor(np.asarray(labels, dtype=np.int64)).clone())


def _download_torchvision(info: DatasetInfo, root: Path, class_name: str, train: bool) -> None:
    """Run torchvision's downloader into `root/<name>`, turning every failure into a UserError."""
    target = root / info.name
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:

        tv = compat.import_torchvision()  # looked up at call time (tests replace it)
        getattr(tv.datasets, class_name)(root=str(target), train=train, download=True)
    except Exception as err:  # network, disk and checksum errors all mean the same to the user
        raise UserError(
            f"could not download dataset '{info.name}' into {target}: {type(err).__name__}: {err}"
        ) from err
    finally:
        socket.setdefaulttimeout(old_timeout)


# ----------------------------------------------------------------------------------------------
# CIFAR: python pickles


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: the CIFAR batches need nothing else, and an
    arbitrary pickle found in a data folder must not be able to run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, list[int]]:
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise UserError(f"cannot read CIFAR batch {path}: {err}; the file is corrupt or not the official format") from err
    if not isinstance(batch, dict):
        raise UserError(f"CIFAR batch {path} is not a dict; the file is not the official python format")
    # Files re-pickled under Python 3 may carry str keys instead of the original bytes keys.
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise UserError(f"CIFAR batch {path} lacks the 'data' or '{label_key}' entry")
    data = np.asarray(batch["data"])
    labels = [int(x) for x in batch[label_key]]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != len(labels):
        raise UserError(
            f"CIFAR batch {path} holds data {data.shape} {data.dtype} with {len(labels)} labels; "
            f"expected N×3072 uint8 with N labels"
        )
    return data, labels


def _load_cifar(info: DatasetInfo, root: Path, train: bool, download: bool) -> ImageSet:
    if info.name == "cifar10":
        inner, tv_class, label_key = "cifar-10-batches-py", "CIFAR10", "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    else:
        inner, tv_class, label_key = "cifar-100-python", "CIFAR100", "fine_labels"
        files = ["train"] if train else ["test"]
    candidates = [root / info.name / inner, root / inner, root]

    def find() -> Path | None:
        for d in candidates:
            if all((d / f).is_file() for f in files):
                return d
        return None

    folder = find()
    if folder is None and download:
        _download_torchvision(info, root, tv_class, train)
        folder = find()
    if folder is None:
        raise UserError(
            f"dataset '{info.name}' not found: looked for {inner} in {_fmt_dirs([root / info.name, root])}; "
            f"download it with --download true (needs internet) or place the official python archive there"
        )
    parts = [_read_cifar_batch(folder / f, label_key) for f in files]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = [y for p in parts for y in p[1]]
    return _make_set(data, labels)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST: idx files

_IDX_NAMES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(folder: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes with exactly `ndim` dimensions, validating its header."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise UserError(f"cannot read idx file {path}: {err}; the file is truncated or corrupt") from err
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"idx file {path} is truncated: {len(raw)} bytes, shorter than its header")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise UserError(
            f"idx file {path} has magic number 0x{raw[:4].hex()}, expected 0x000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions); the file is corrupt or of another kind"
        )
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise UserError(
            f"idx file {path} declares shape {tuple(dims)} ({expected} bytes) but holds "
            f"{len(raw) - header} bytes of data; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_fmnist(info: DatasetInfo, root: Path, train: bool, download: bool) -> ImageSet:
    img_base, lbl_base = _IDX_NAMES[train]
    candidates = _unique([
        root / "fmnist",
        root / "fmnist" / "FashionMNIST" / "raw",
        root / "FashionMNIST" / "raw",
        root,
        FMNIST_SYSTEM_DIR,
    ])

    def find() -> tuple[Path, Path] | None:
        for d in candidates:
            img, lbl = _find_idx(d, img_base), _find_idx(d, lbl_base)
            if img is not None and lbl is not None:
                return img, lbl
        return None

    found = find()
    if found is None and download:
        _download_torchvision(info, root, "FashionMNIST", train)
        found = find()
    if found is None:
        raise UserError(
            f"dataset 'fmnist' not found: looked for {img_base}[.gz] and {lbl_base}[.gz] in "
            f"{_fmt_dirs(candidates)}; download it with --download true (needs internet) or "
            f"install it with apt-get install dataset-fashion-mnist"
        )
    img_path, lbl_path = found
    images = _read_idx(img_path, 3)
    labels = _read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels")
    if images.shape[1:] != (info.image_size, info.image_size):
        raise UserError(f"{img_path} holds {images.shape[1]}×{images.shape[2]} images, expected 28×28")
    return _make_set(images[:, None].copy(), labels)


# ----------------------------------------------------------------------------------------------
# image-folder formats (GTSRB, Tiny-ImageNet): decode once, cache as tensors


def _decode_images(paths: Sequence[Path], size: int, what: str) -> np.ndarray:
    """Decode image files to an (N, 3, size, size) uint8 array, RGB, bilinear-resized if needed."""
    from PIL import Image
    from tqdm import tqdm

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    bar = tqdm(paths, desc=f"decoding {what}", unit="img", leave=False, file=sys.stderr,
               disable=len(paths) < _PROGRESS_MIN_FILES)
    for i, path in enumerate(bar):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
        except FileNotFoundError:
            raise UserError(f"image file {path} is missing; the {what} data is incomplete") from None
        except Exception as err:  # PIL signals damaged files with OSError, ValueError, SyntaxError...
            raise UserError(f"cannot decode image {path}: {err}") from err
    return out


def _cached_decode(cache: Path, paths: Sequence[Path], labels: Sequence[int], size: int, what: str) -> ImageSet:
    """Return the decoded split from `cache` when it matches the number of source files, else
    decode `paths` and try to write the cache atomically (skipped where the folder is read-only)."""
    count = len(paths)
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            if (int(saved["version"]) == _CACHE_VERSION and int(saved["count"]) == count
                    and saved["images"].dtype == torch.uint8
                    and tuple(saved["images"].shape) == (count, 3, size, size)
                    and tuple(saved["labels"].shape) == (count,)):
                return ImageSet(saved["images"].contiguous(), saved["labels"].to(torch.int64))
        except Exception:
            pass  # a stale or damaged cache is just rebuilt
    images = _decode_images(paths, size, what)
    data = _make_set(images, labels)
    payload = {
        "version": torch.tensor(_CACHE_VERSION),
        "count": torch.tensor(count),
        "images": data.images,
        "labels": data.labels,
    }
    try:
        # through the shared atomic writer: the usual file mode (not mkstemp's 0600), so that a data
        # folder shared by a group keeps one cache for everyone
        atomic_write(cache, lambda fh: torch.save(payload, fh))
    except (OSError, RuntimeError):
        pass  # read-only or full data folder: caching is an optimisation only
    return data


def _read_gtsrb_csv(csv_path: Path) -> list[tuple[str, int]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=";")
            fields = [c.strip() for c in (reader.fieldnames or [])]
            if "Filename" not in fields or "ClassId" not in fields:
                raise UserError(f"{csv_path} lacks the Filename and ClassId columns; it is not a GTSRB annotation file")
            rows = []
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                if not row.get("Filename"):
                    continue
                rows.append((row["Filename"], int(row["ClassId"])))
    except ValueError as err:
        raise UserError(f"{csv_path} has a non-integer ClassId: {err}") from err
    except OSError as err:
        raise UserError(f"cannot read {csv_path}: {err}") from err
    return rows


def _load_gtsrb(info: DatasetInfo, root: Path, train: bool, download: bool) -> ImageSet:
    bases = _unique([root / "gtsrb", root])
    if train:
        layouts = ["Train", "GTSRB/Final_Training/Images", "Final_Training/Images"]
    else:
        layouts = ["Test", "GTSRB/Final_Test/Images", "Final_Test/Images"]
    split = "train" if train else "test"
    found = next(((b, b / l) for b in bases for l in layouts if (b / l).is_dir()), None)
    if found is None:
        how = ("gtsrb has no automatic download; get the official GTSRB archives "
               "(https://benchmark.ini.rub.de/gtsrb_dataset.html) and extract them there")
        if download:
            how = "--download does not cover it: " + how
        raise UserError(
            f"dataset 'gtsrb' not found: looked for {' or '.join(layouts)} in {_fmt_dirs(bases)}; {how}"
        )
    base, folder = found
    entries: list[tuple[Path, int]] = []
    if train:
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for csv_path in sorted(class_dir.glob("GT-*.csv")):
                entries += [(class_dir / fn, y) for fn, y in _read_gtsrb_csv(csv_path)]
        if not entries:
            raise UserError(f"no class folders with GT-*.csv annotations found in {folder}")
    else:
        # The test labels ship in a separate archive, so users unpack GT-final_test.csv in varied places.
        csv_dirs = _unique([folder, folder.parent, folder.parent.parent, base])
        csv_path = next((d / "GT-final_test.csv" for d in csv_dirs if (d / "GT-final_test.csv").is_file()), None)
        if csv_path is None:
            raise UserError(
                f"gtsrb test labels not found: looked for GT-final_test.csv in {_fmt_dirs(csv_dirs)}; "
                f"extract the official GTSRB_Final_Test_GT archive there"
            )
        entries = [(folder / fn, y) for fn, y in _read_gtsrb_csv(csv_path)]
        if not entries:
            raise UserError(f"{csv_path} lists no images")
    return _cached_decode(base / f"gtsrb_{split}_uint8.pt", [p for p, _ in entries], [y for _, y in entries],
                          info.image_size, f"gtsrb {split}")


def _load_tiny(info: DatasetInfo, root: Path, train: bool, download: bool) -> ImageSet:
    inner = "tiny-imagenet-200"
    candidates = _unique([root / "tiny" / inner, root / inner, root])
    split = "train" if train else "test"
    marker = Path("train") if train else Path("val") / "val_annotations.txt"
    folder = next((d for d in candidates if (d / "wnids.txt").is_file() and (d / marker).exists()), None)
    if folder is None:
        how = ("tiny has no automatic download; download http://cs231n.stanford.edu/tiny-imagenet-200.zip "
               "and extract it there")
        if download:
            how = "--download does not cover it: " + how
        raise UserError(
            f"dataset 'tiny' not found: looked for {inner} (wnids.txt and {marker.as_posix()}) in "
            f"{_fmt_dirs([root / 'tiny', root])}; {how}"
        )
    wnids = sorted({w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    if train:
        for wnid in wnids:
            image_dir = folder / "train" / wnid / "images"
            if not image_dir.is_dir():
                raise UserError(f"tiny train folder {image_dir} is missing; the archive is incomplete")
            files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
            paths += files
            labels += [index[wnid]] * len(files)
    else:
        ann = folder / "val" / "val_annotations.txt"
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1].strip() not in index:
                raise UserError(f"{ann} line {lineno} does not name an image and a wnid from wnids.txt")
            paths.append(folder / "val" / "images" / parts[0].strip())
            labels.append(index[parts[1].strip()])
    if not paths:
        raise UserError(f"no {split} images found in {folder}")
    return _cached_decode(folder / f"tiny_{split}_uint8.pt", paths, labels, info.image_size, f"tiny {split}")


# As BackdoorBench: only CIFAR-10 is flipped during training (GTSRB, CIFAR-100 and Tiny never
# are), and CIFAR-100 and Tiny are normalised with ImageNet statistics, since their recipe feeds
# them at 224 px to an ImageNet-pretrained model. BackdoorBench trains GTSRB without
# normalisation, so the identity transform is kept for it.
register_dataset(DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), True), _load_cifar)
register_dataset(DatasetInfo("cifar100", 100, 3, 32, IMAGENET_MEAN, IMAGENET_STD, False), _load_cifar)
register_dataset(DatasetInfo("gtsrb", 43, 3, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False), _load_gtsrb)
register_dataset(DatasetInfo("tiny", 200, 3, 64, IMAGENET_MEAN, IMAGENET_STD, False), _load_tiny)
register_dataset(DatasetInfo("fmnist", 10, 1, 28, (0.2860,), (0.3530,), False), _load_fmnist)
