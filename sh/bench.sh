#!/usr/bin/env bash
# Throughput: toolkit pipeline vs bare model step vs per-sample PIL + DataLoader, side by side.
# Extra arguments go to `python -m utils.bench` (e.g. --model resnet18 --device cuda:0).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/sh/install.sh"
cd "$ROOT"
exec "$PY" -m utils.bench "$@"
