"""Where and how a run computes: device choice with the CPU fallback, mixed precision, seeds,
threads, and the helpers that make results portable (weights to the CPU, versions)."""
from __future__ import annotations

from typing import Callable, TypeVar

import os
import platform
import random
import warnings
import zlib
from typing import Any

import numpy as np
import torch

from utils.errors import UserError

T = TypeVar("T")
_warned_cpu_fallback = False


def resolve_device(name: str) -> torch.device:
    """`cuda`, `cuda:N`, `cpu`, `mps` or `auto`; CUDA asked for but absent falls back to the CPU with
    one warning, so the paper's `--device cuda:0` runs unchanged on a laptop."""
    global _warned_cpu_fallback
    name = (name or "auto").strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use cpu or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if not _warned_cpu_fallback:
                warnings.warn(f"--device {name}: CUDA is not available, running on the CPU", stacklevel=2)
                _warned_cpu_fallback = True
            return torch.device("cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 instructions (AVX512-BF16, AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """`auto`: bf16 on CUDA and on CPUs with bf16 instructions, else full precision."""
    if mode == "none":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads() -> None:
    """Use every core for intra-op parallelism unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def derive_seed(seed: int, purpose: str) -> int:
    """An independent seed for each use of the run's seed. Drawing the poisoned indices and the
    batch order from identically seeded generators makes the first batches consist of exactly the
    poisoned images, which wrecks training; deriving per-purpose seeds keeps the streams apart while
    one `--random_seed` still fixes everything."""
    return zlib.crc32(f"{purpose}:{seed}".encode()) & 0x7FFFFFFF


def make_generator(seed: int, device: torch.device, purpose: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose))


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def to_cpu(obj: Any, float32: bool = False) -> Any:
    """Detached CPU copies of the tensors inside nested dicts/lists (records and caches must load
    anywhere, and must not change when training goes on); `float32` also casts floating-point
    tensors to float32 (weights trained under mixed precision). The one "weights to the CPU"."""
    if isinstance(obj, torch.Tensor):
        out = obj.detach().cpu()
        return (out.float() if float32 and out.is_floating_point() else out).clone()
    if isinstance(obj, dict):
        return {k: to_cpu(v, float32) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v, float32) for v in obj)
    return obj


def seeded_init(factory: Callable[[], T], seed: int, purpose: str) -> T:
    """Build something random (a network's initial weights) from a seed derived for `purpose`,
    without touching the global random stream: the one way to seed-initialise a network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, purpose))
        return factory()
