#!/usr/bin/env bash
# The main job on the embedded default: BadNet on Fashion-MNIST (small CNN), then all five
# purification modes, then one table of C-Acc / ASR / RA before and after. GPU when present.
# Writes only under record/quickstart/ (its own namespace), replacing what an earlier quickstart left.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/sh/install.sh"
cd "$ROOT"
start=$(date +%s)
"$PY" attack/badnet.py --yaml_path config/attack/prototype/fmnist.yaml --device auto \
  --record_root record/quickstart --overwrite true "$@"
"$PY" fine_tune/ft.py --attack badnet --dataset fmnist --model smallcnn --pratio 0.1 --attack_target 0 \
  --ft_mode all --device auto --record_root record/quickstart --overwrite true --progress false
echo "quickstart finished in $(( $(date +%s) - start )) s; results in record/quickstart/fmnist/badnet/"
echo "to go on from this record (README: Typical workflow), add --record_root record/quickstart to ft.py, ft_poison.py and qra.py"
