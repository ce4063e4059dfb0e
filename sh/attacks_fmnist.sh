#!/usr/bin/env bash
# Train the clean model and every attack on Fashion-MNIST at pratio 0.1 (target 0, small CNN, the
# `fmnist` prototype), then print the results table of the README's "Attacks" section.
#
#   bash sh/attacks_fmnist.sh                 # all of them, into record/attacks_fmnist/
#   bash sh/attacks_fmnist.sh badnet lc       # only these (the clean model is named "clean")
#   RECORD_ROOT=/tmp/r DEVICE=cuda:0 bash sh/attacks_fmnist.sh
#   SWEEP_ARGS=--dry_run bash sh/attacks_fmnist.sh          # list the steps, done or to do; run nothing
#
# Runs on `python -m utils.sweep jobs`: a finished record is kept and skipped; a killed run resumes
# from its last epoch. Each run's output goes to <record_root>/logs/<name>.log. Generated resources
# (surrogates, PGD images, encoders) are cached under <record_root>/resources/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
ROOT=${RECORD_ROOT:-record/attacks_fmnist}
DEVICE=${DEVICE:-auto}
PROTO=config/attack/prototype/fmnist.yaml
mkdir -p "$ROOT/logs"
. sh/_jobs.sh

# name | script | record attack name | extra flags (the reason for each is in the README)
RECIPES=(
  "clean|badnet|badnet|--pratio 0"
  "badnet|badnet|badnet|"
  "blended|blended|blended|"
  "sig|sig|sig|--train_subset 0"
  "lc|lc|lc|--train_subset 0 --bd_yaml_path config/attack/lc/fmnist_cpu.yaml"
  "ssba|ssba|ssba|"
  "lf|lf|lf|"
  "inputaware|inputaware|inputaware|--bd_yaml_path config/attack/inputaware/fmnist_cpu.yaml --epochs 5"
  "wanet|wanet|wanet|--bd_yaml_path config/attack/wanet/fmnist_cpu.yaml --epochs 5"
  "badnet_bypass|badnet_bypass|badnet_bypass|"
  "blended_bypass|blend_bypass|blended_bypass|"
)

selected=("$@")
want() { [ ${#selected[@]} -eq 0 ] && return 0; for s in "${selected[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

for recipe in "${RECIPES[@]}"; do
  IFS='|' read -r name script attack flags <<<"$recipe"
  want "$name" || continue
  pratio=0.1; [ "$name" = clean ] && pratio=0.0
  rec="$ROOT/fmnist/$attack/pratio_$pratio-target_0-archi_smallcnn"
  # shellcheck disable=SC2086
  job "$name" "$rec/attack_result.pt,$rec/summary.json" - "$PYTHON" "attack/$script.py" --yaml_path "$PROTO" \
    --device "$DEVICE" --record_root "$ROOT" --resource_root "$ROOT/resources" --progress false $flags
done
status=0
run_jobs || status=$?

"$PYTHON" - "$ROOT" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print("\n| attack | pratio | C-Acc | ASR | RA | epochs | minutes |\n|---|---|---|---|---|---|---|")
for summary in sorted(root.glob("fmnist/*/pratio_*-target_0-archi_smallcnn/summary.json")):
    s = json.loads(summary.read_text())
    attack, pratio = summary.parts[-3], summary.parts[-2].split("-")[0].split("_")[1]
    name = "none (clean model)" if float(pratio) == 0 else attack
    print(f"| {name} | {pratio} | {100 * s['clean_acc']:.2f} | {100 * s['asr']:.2f} | {100 * s['ra']:.2f} | "
          f"{s['epochs']} | {s['seconds'] / 60:.1f} |")
PY
exit $status
