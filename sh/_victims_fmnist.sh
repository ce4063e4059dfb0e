# The Fashion-MNIST victims the robustness recipes share (sh/robustness_fmnist.sh,
# sh/baseline_checks_fmnist.sh): where a record lives and the job that trains it. Source it after
# sh/_jobs.sh, with PYTHON, ROOT and DEVICE set.
read -r -a ATTACK_ARGS <<<"${ATTACK_ARGS:---epochs 15 --train_subset 10000}"
PROTO=config/attack/prototype/fmnist.yaml
COMMON=(--dataset fmnist --model smallcnn --record_root "$ROOT" --device "$DEVICE" --progress false)
mkdir -p "$ROOT/logs"

record() { echo "$ROOT/fmnist/$1/pratio_${2:-0.1}-target_0-archi_smallcnn"; }  # record <attack> [pratio]
victim() {  # victim <attack> <pratio>: the job training that record (skipped once it exists)
  local rec; rec=$(record "$1" "$2")
  job "attack-$1-$2" "$rec/attack_result.pt" - \
    "$PYTHON" "attack/$1.py" --yaml_path "$PROTO" --pratio "$2" --record_root "$ROOT" --device "$DEVICE" \
    --progress false "${ATTACK_ARGS[@]}"
}
