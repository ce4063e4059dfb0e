#!/usr/bin/env bash
# First thing to run on a new machine (a GPU above all): every attack and every purification mode for
# one short epoch on generated CIFAR-10-format data, then the throughput benchmark; one table.
#   bash sh/device_check.sh --device cuda:0 --out docs/device_check
# Arguments go to `python -m utils.device_check` (see its --help); the size defaults to full on a
# GPU (5,000 images at 32x32, ResNet-18) and to tiny on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/sh/install.sh"
cd "$ROOT"
exec "$PY" -m utils.device_check "$@"
