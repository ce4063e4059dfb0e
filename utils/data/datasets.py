"""Dataset metadata and loaders that turn every supported on-disk format into uint8 tensors.

Each split is decoded once into an `ImageSet` (images uint8 N×C×H×W, labels int64). Formats that
need thousands of image decodes (GTSRB, Tiny-ImageNet) are cached next to the data as
`<name>_<split>_uint8.pt`.
"""
from __future__ import annotations

import csv
import gzip
import io
import pickle
import re
import socket
import sys
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from utils import compat
from utils.errors import UserError, interactive
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
    """A whole split in memory: `images` uint8 (N, C, H, W) contiguous, `labels` int64 (N,).
    `root` is the dataset folder the loader read it from (as a `dataset_path` would name it):
    the folder it was given, or the system copy it fell back to; None for sets made in memory."""

    images: torch.Tensor
    labels: torch.Tensor
    root: Path | None = field(default=None, compare=False)

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
    if root.exists() and not root.is_dir():
        raise UserError(f"dataset_path {root} is a file; it must be the folder that holds the datasets")
    loader = _LOADERS[name]
    data = loader(info, root, train, download)
    _check(info, data, "train" if train else "test")
    return data if data.root is not None else replace(data, root=root)


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


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    """One `note:` line on stderr per message and process (the train and test splits share theirs)."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


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


#: largest CIFAR batch file read (the official CIFAR-100 `train`, the biggest, is 158 MB); the whole
#: file is read before unpickling, so this bounds the memory a batch can take
CIFAR_MAX_FILE_BYTES = 512 * 2**20

class _NdarrayMarker:
    """What the pickle gets for `numpy.ndarray`: a stand-in that `_reconstruct_array` recognises and
    that refuses to be called (`ndarray(shape)` would allocate whatever shape the file asks for)."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refusing to call numpy.ndarray directly (numpy's own pickles never do)")


_NDARRAY = _NdarrayMarker()


def _reconstruct_array(subtype, shape, dtype):
    """numpy's `_reconstruct`, accepting only the empty array numpy's own pickles start from; the
    array's real shape and data come afterwards through `__setstate__`, which checks that the data
    holds exactly as many bytes as the shape declares."""
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise pickle.UnpicklingError("an array is rebuilt in a way numpy's own pickles never use")
    return np.ndarray.__new__(np.ndarray, (0,), dtype)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays: the CIFAR batches (dicts of lists, bytes and arrays)
    need nothing else, and an arbitrary pickle found in a data folder must not be able to run code
    (a `__reduce__` calling os.system is refused here, by name). `numpy.ndarray` itself is never
    handed out, since calling it with a huge shape allocates that much memory; arrays come only
    through `_reconstruct_array` or `_frombuffer` (a view of bytes already read, reshaped)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _reconstruct_array
        if (module, name) == ("numpy", "ndarray"):
            return _NDARRAY
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch as (data N×3072 uint8, labels N int64), every kind of damage one UserError."""
    try:
        size = path.stat().st_size
        if size > CIFAR_MAX_FILE_BYTES:
            raise UserError(f"CIFAR batch {path} is {size / 2**20:.0f} MB, more than any official batch "
                            f"({CIFAR_MAX_FILE_BYTES // 2**20} MB at most); it is not the official python format")
        with open(path, "rb") as f:
            raw = f.read(size + 1)  # read(n) reserves n bytes up front: the size just checked, not the limit
    except OSError as err:
        raise UserError(f"cannot read CIFAR batch {path}: {err.strerror or err}") from None
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001  any failure of the restricted unpickler means a bad file;
        # MemoryError included: an opcode can claim a length of terabytes that the pickle module
        # tries to allocate before finding the data missing
        what = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(f"cannot read CIFAR batch {path}: {what}; the file is corrupt or not the official "
                        f"python format") from None
    if not isinstance(batch, dict):
        raise UserError(f"CIFAR batch {path} is not a dict; the file is not the official python format")
    # Files re-pickled under Python 3 may carry str keys instead of the original bytes keys.
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise UserError(f"CIFAR batch {path} lacks the 'data' or '{label_key}' entry")
    data, labels = batch["data"], batch[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = f"{data.shape} {data.dtype}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise UserError(f"CIFAR batch {path} holds data {shape}; expected an N×3072 uint8 array")
    if isinstance(labels, np.ndarray):
        label_list = labels.ravel().tolist() if labels.ndim == 1 else None
    else:
        label_list = list(labels) if isinstance(labels, (list, tuple)) else None
    if label_list is None or not all(isinstance(y, (int, np.integer)) and not isinstance(y, (bool, np.bool_))
                                     for y in label_list):
        raise UserError(f"CIFAR batch {path}: '{label_key}' is {type(labels).__name__}, not a list of integers")
    if len(label_list) != data.shape[0]:
        raise UserError(f"CIFAR batch {path} holds {data.shape[0]} images but {len(label_list)} labels")
    if label_list and not (-2**63 <= min(label_list) and max(label_list) < 2**63):
        raise UserError(f"CIFAR batch {path}: '{label_key}' holds integers beyond 64 bits")
    return data, np.asarray(label_list, dtype=np.int64)


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
    labels = np.concatenate([p[1] for p in parts])
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


#: largest idx payload read (the official Fashion-MNIST training images hold 47 MB)
IDX_MAX_BYTES = 512 * 2**20
_CHUNK = 1 << 20


def _read_idx(path: Path, ndim: int, inner: tuple[int, ...] = ()) -> np.ndarray:
    """Parse an idx file of unsigned bytes with exactly `ndim` dimensions (the last ones `inner`,
    when given), raw or gzip-compressed. The header is validated before the data is read, and the
    data is read in chunks up to the size the header declares, so a header claiming a huge shape,
    or a small .gz that inflates to gigabytes, is refused without allocating it."""
    header_len = 4 + 4 * ndim
    try:
        with open(path, "rb") as probe:
            gz = probe.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = f.read(header_len)
            if len(header) < header_len:
                raise UserError(f"idx file {path} is truncated: {len(header)} bytes, shorter than its header")
            if header[:3] != b"\x00\x00\x08" or header[3] != ndim:
                raise UserError(
                    f"idx file {path} has magic number 0x{header[:4].hex()}, expected 0x000008{ndim:02x} "
                    f"(unsigned bytes, {ndim} dimensions); the file is corrupt or of another kind"
                )
            dims = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
            if inner and dims[1:] != inner:
                raise UserError(f"idx file {path} declares {'x'.join(map(str, dims[1:]))} images, expected "
                                f"{'x'.join(map(str, inner))}")
            expected = 1
            for d in dims:
                expected *= d
            if expected > IDX_MAX_BYTES:
                raise UserError(f"idx file {path} declares shape {dims} ({expected} bytes), more than any "
                                f"Fashion-MNIST file ({IDX_MAX_BYTES // 2**20} MB at most); the header is corrupt")
            if not gz and path.stat().st_size - header_len != expected:
                raise UserError(
                    f"idx file {path} declares shape {dims} ({expected} bytes) but holds "
                    f"{path.stat().st_size - header_len} bytes of data; the file is truncated or corrupt")
            buf = bytearray()
            while len(buf) <= expected:  # one byte past the declared size is enough to see extra data
                chunk = f.read(min(_CHUNK, expected + 1 - len(buf)))
                if not chunk:
                    break
                buf += chunk
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise UserError(f"cannot read idx file {path}: {err}; the file is truncated or corrupt") from None
    if len(buf) != expected:
        got = f"{len(buf)}" if len(buf) <= expected else "more"
        raise UserError(f"idx file {path} declares shape {dims} ({expected} bytes) but holds {got} bytes of data; "
                        f"the file is truncated or corrupt")
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


def _load_fmnist(info: DatasetInfo, root: Path, train: bool, download: bool) -> ImageSet:
    img_base, lbl_base = _IDX_NAMES[train]
    local = _unique([root / "fmnist", root / "fmnist" / "FashionMNIST" / "raw", root / "FashionMNIST" / "raw", root])
    candidates = _unique(local + [FMNIST_SYSTEM_DIR])

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
    used = root
    if img_path.parent not in local:  # the system copy, as a last resort: said, and reported as the root
        used = FMNIST_SYSTEM_DIR
        _note_once(f"dataset 'fmnist' not found under {root}; reading the system copy in {FMNIST_SYSTEM_DIR}")
    images = _read_idx(img_path, 3, (info.image_size, info.image_size))
    labels = _read_idx(lbl_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds {labels.shape[0]} labels")
    return replace(_make_set(images[:, None].copy(), labels), root=used)


# ----------------------------------------------------------------------------------------------
# image-folder formats (GTSRB, Tiny-ImageNet): decode once, cache as tensors


#: largest image, in pixels, that a dataset or trigger file may declare: 4096 x 4096, far beyond any
#: supported dataset (64 px) or sensible trigger, far below what would exhaust memory when decoded
MAX_IMAGE_PIXELS = 4096 * 4096


def read_image(path: str | Path, mode: str, size: int, what: str) -> np.ndarray:
    """Decode one image file as uint8 (size, size) for mode "L" or (size, size, 3) for "RGB",
    bilinear-resized when its own size differs. PIL opens lazily, so the size in the file's header is
    checked against `MAX_IMAGE_PIXELS` before a pixel is decoded: a small file claiming 20000 x 20000
    pixels (a decompression bomb) is refused without the allocation. Every failure is one UserError
    naming `what` and the file."""
    from PIL import Image

    path = Path(path)
    too_big = (f"more than the {MAX_IMAGE_PIXELS} (4096x4096) allowed; refused before decoding, "
               f"as a decompression bomb would be")
    try:
        with warnings.catch_warnings():
            # PIL warns at open time past its own limit (and raises past twice that): both mean too big
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise UserError(f"{what} {path} declares {w}x{h} pixels, {too_big}")
                img = img.convert(mode)
                if img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                return np.asarray(img, dtype=np.uint8)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        declared = f"{found.group(1)} pixels" if found else "too many pixels"
        raise UserError(f"{what} {path} declares {declared}, {too_big}") from None
    except FileNotFoundError:
        raise UserError(f"{what} {path} cannot be read: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} cannot be read: it is a folder, not an image file") from None
    except Exception as err:  # noqa: BLE001  PIL signals damaged files with OSError, ValueError, SyntaxError...
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"cannot decode {what} {path}: {first}") from None


def _decode_images(paths: Sequence[Path], size: int, what: str) -> np.ndarray:
    """Decode image files to an (N, 3, size, size) uint8 array, RGB, bilinear-resized if needed."""
    from tqdm import tqdm

    # every listed file must exist before the whole output array is allocated
    for path in paths:
        if not path.is_file():
            raise UserError(f"image file {path} is missing; the {what} data is incomplete")
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    bar = tqdm(paths, desc=f"decoding {what}", unit="img", leave=False, file=sys.stderr,
               disable=len(paths) < _PROGRESS_MIN_FILES or not interactive())
    for i, path in enumerate(bar):
        out[i] = read_image(path, "RGB", size, f"{what} image").transpose(2, 0, 1)
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
                # a row longer than the header puts its extra cells in a list under the key None
                row = {(k or "").strip(): v.strip() for k, v in row.items() if isinstance(v, str)}
                if not row.get("Filename"):
                    continue
                name = _plain_name(row["Filename"], f"{csv_path} line {reader.line_num}: Filename")
                try:
                    rows.append((name, int(row.get("ClassId", ""))))
                except ValueError:
                    raise UserError(f"{csv_path} line {reader.line_num}: ClassId "
                                    f"{row.get('ClassId', '')[:40]!r} is not an integer") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{csv_path} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        f"it is not a GTSRB annotation file") from None
    except csv.Error as err:
        raise UserError(f"{csv_path} is not a readable GTSRB annotation file: {err}") from None
    except OSError as err:
        raise UserError(f"cannot read {csv_path}: {err}") from None
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


def _plain_name(name: str, where: str) -> str:
    """A file or folder name from an annotation file, refused when it would lead out of its folder."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise UserError(f"{where} {name[:80]!r} is not a plain file name")
    return name


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None


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
    wnids = sorted({_plain_name(w.strip(), f"{folder / 'wnids.txt'}: wnid")
                    for w in _read_text(folder / "wnids.txt").split() if w.strip()})
    if not wnids:
        raise UserError(f"{folder / 'wnids.txt'} lists no class (wnid)")
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
        for lineno, line in enumerate(_read_text(ann).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1].strip() not in index:
                raise UserError(f"{ann} line {lineno} does not name an image and a wnid from wnids.txt")
            paths.append(folder / "val" / "images" / _plain_name(parts[0].strip(), f"{ann} line {lineno}: image"))
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
