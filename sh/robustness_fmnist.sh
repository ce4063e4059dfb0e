#!/usr/bin/env bash
# Post-purification robustness on Fashion-MNIST (README "Post-purification robustness"): BadNet and
# Blended victims and their clean (pratio 0) counterparts; purification with FT, FST, FT-SAM, BTI and
# PAM; the retuning attack (RA) on every purified model, the unpurified one and the clean one; then
# the table of C-Acc / ASR after purification and after RA.
#
#   bash sh/robustness_fmnist.sh                       # everything, into record/robustness_fmnist/
#   UNLEARN_EPOCHS=30 bash sh/robustness_fmnist.sh     # PAM's full 3 x 30 epochs (default 3 x 5 on a CPU)
#   QRA=1 bash sh/robustness_fmnist.sh                 # also the query-based reactivation attack on fst and pam
#   MODES="ft fst" bash sh/robustness_fmnist.sh        # only these purification modes
#   RECORD_ROOT=/tmp/r DEVICE=cuda:0 bash sh/robustness_fmnist.sh
#
# Finished steps are skipped, so a killed run is resumed by starting it again; a failed step is
# reported at the end with its log, and the others still run. Logs: <record_root>/logs/.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
ROOT=${RECORD_ROOT:-record/robustness_fmnist}
DEVICE=${DEVICE:-auto}
UNLEARN_EPOCHS=${UNLEARN_EPOCHS:-5}
QRA=${QRA:-0}
read -r -a MODES <<<"${MODES:-ft fst ft-sam bti pam}"
PROTO=config/attack/prototype/fmnist.yaml
COMMON=(--dataset fmnist --model smallcnn --record_root "$ROOT" --device "$DEVICE" --progress false)
mkdir -p "$ROOT/logs"
failed=()

# run <log name> <marker file that says the step is done> <command...>
run() {
  local name=$1 done_file=$2; shift 2
  if [ -f "$done_file" ]; then echo "== $name: done before, skipped"; return 0; fi
  echo "== $name   (log: $ROOT/logs/$name.log)"
  if ! "$@" >"$ROOT/logs/$name.log" 2>&1; then
    echo "   FAILED, see $ROOT/logs/$name.log"; failed+=("$name"); return 1
  fi
}

record() { echo "$ROOT/fmnist/$1/pratio_$2-target_0-archi_smallcnn"; }

for attack in badnet blended; do
  for pratio in 0.1 0.0; do
    run "attack-$attack-$pratio" "$(record "$attack" "$pratio")/attack_result.pt" \
      "$PYTHON" "attack/$attack.py" --yaml_path "$PROTO" --pratio "$pratio" --record_root "$ROOT" --device "$DEVICE" \
      --progress false
  done
  rec=$(record "$attack" 0.1)
  for mode in "${MODES[@]}"; do
    extra=()
    case $mode in bti|pam) extra=(--epochs "$UNLEARN_EPOCHS");; esac
    run "$attack-$mode" "$rec/defense/$mode/result.json" \
      "$PYTHON" fine_tune/ft.py "${COMMON[@]}" --attack "$attack" --pratio 0.1 --ft_mode "$mode" "${extra[@]}"
    run "$attack-$mode-retune" "$rec/defense/$mode/retune/result.json" \
      "$PYTHON" fine_tune/ft_poison.py "${COMMON[@]}" --attack "$attack" --pratio 0.1 --defense_type "$mode"
  done
  run "$attack-none-retune" "$rec/retune/result.json" \
    "$PYTHON" fine_tune/ft_poison.py "${COMMON[@]}" --attack "$attack" --pratio 0.1 --defense_type none
  run "$attack-clean-retune" "$(record "$attack" 0.0)/retune/result.json" \
    "$PYTHON" fine_tune/ft_poison.py "${COMMON[@]}" --attack "$attack" --pratio 0.0 --defense_type none
  if [ "$QRA" = 1 ]; then
    for mode in fst pam; do
      [ -f "$rec/defense/$mode/retune/model.pt" ] || continue
      run "$attack-$mode-qra" "$rec/defense/$mode/qra/result.json" \
        "$PYTHON" fine_tune/qra.py "${COMMON[@]}" --attack "$attack" --pratio 0.1 --defense_type "$mode"
    done
  fi
done

"$PYTHON" -m utils.robustness_table "$ROOT" --dataset fmnist --model smallcnn --attacks badnet blended
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}"; exit 1
fi
