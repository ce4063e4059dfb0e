#!/usr/bin/env bash
# Install what is missing, idempotently: `bash sh/install.sh [--test]`. The other sh/ scripts source it
# to get $PY (it sets -euo pipefail, so do not source it into an interactive shell).
#  - Python packages from requirements.txt (and requirements-test.txt with --test) into the active
#    virtual or conda environment, else into .venv in the repository root (created if needed);
#  - Fashion-MNIST from the Debian package dataset-fashion-mnist where apt is usable, else
#    torchvision's download into data/fmnist;
#  - the data/ and record/ folders.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WITH_TESTS=0
for arg in "$@"; do [ "$arg" = "--test" ] && WITH_TESTS=1; done

if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "${VIRTUAL_ENV}/bin/python" ]; then
  PY="${VIRTUAL_ENV}/bin/python"
elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "${CONDA_PREFIX}/bin/python" ]; then
  PY="${CONDA_PREFIX}/bin/python"
else
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "[install] creating $ROOT/.venv"
    python3 -m venv "$ROOT/.venv"
  fi
  PY="$ROOT/.venv/bin/python"
fi
export PY

# Are the pinned packages already there? (cheap check, no network)
need_pip=0
"$PY" - <<'PYCHECK' || need_pip=1
import importlib.metadata as md, sys
pins = {"torch": "2.13.0", "torchvision": "0.28.0"}
for name in ("torch", "torchvision", "numpy", "pyyaml", "tqdm", "pillow"):
    try:
        version = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if name in pins and version.split("+")[0] != pins[name]:
        sys.exit(1)
PYCHECK
if [ "$need_pip" = 1 ]; then
  echo "[install] installing requirements.txt with $PY"
  "$PY" -m pip install -q -r "$ROOT/requirements.txt"
fi
if [ "$WITH_TESTS" = 1 ] && ! "$PY" -c "import pytest, matplotlib, submitit, xdist" 2>/dev/null; then
  echo "[install] installing requirements-test.txt"
  "$PY" -m pip install -q -r "$ROOT/requirements-test.txt"
fi

bash "$ROOT/sh/init_folders.sh"

# Fashion-MNIST, the embedded default dataset
FMNIST_SYS=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_SYS/train-images-idx3-ubyte.gz" ] && [ ! -d "$ROOT/data/fmnist/FashionMNIST/raw" ]; then
  SUDO=""
  [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && SUDO="sudo -n"
  if command -v apt-get >/dev/null && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    echo "[install] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
      { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || \
      echo "[install] apt-get could not install dataset-fashion-mnist"
  fi
  if [ ! -f "$FMNIST_SYS/train-images-idx3-ubyte.gz" ]; then
    echo "[install] downloading Fashion-MNIST with torchvision into data/fmnist"
    (cd "$ROOT" && "$PY" -c "
from utils.data.datasets import load_dataset
load_dataset('fmnist', 'data', train=True, download=True)
load_dataset('fmnist', 'data', train=False, download=True)") || echo "[install] Fashion-MNIST download failed; see README (Datasets)"
  fi
fi
echo "[install] ready: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
