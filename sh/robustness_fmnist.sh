#!/usr/bin/env bash
# Post-purification robustness on Fashion-MNIST (README "Post-purification robustness"): BadNet and
# Blended victims and their clean (pratio 0) counterparts; purification with FT, FST, FT-SAM, BTI and
# PAM; the retuning attack (RA, with 5 and with 20 poisoned samples, on the one RA set every model of
# a record shares) on every purified model, the unpurified one and the clean one; the query-based
# reactivation attack (QRA) on the purified models; then the table.
#
#   bash sh/robustness_fmnist.sh                       # everything, into record/robustness_fmnist/
#   MODES="ft fst" QRA=0 bash sh/robustness_fmnist.sh  # only these purification modes, no QRA
#   # the reduced CPU recipe of docs/fidelity_fmnist.md:
#   UNLEARN_EPOCHS=10 BTI_ARGS="--split_ratio 0.02 --bti_unet_width 8 --bti_pretrain_epochs 10 --bti_mask_epochs 5
#     --bti_gen_epochs 10" QRA_ARGS="--epochs 10" QRA_MODES="fst pam" MODES="ft fst ft-sam bti pam" bash sh/robustness_fmnist.sh
#   RECORD_ROOT=/tmp/r DEVICE=cuda:0 bash sh/robustness_fmnist.sh
#   # the NeurIPS 2024 comparison: every baseline, with settings a CPU finishes (FT_ARGS go to every
#   # purification; each mode reads only its own flags)
#   MODES="ep anp i-bau nad fp clp nc ft-sam fst bti pam" FT_ARGS="--anp_iterations 300 --nc_epochs 5" \
#     bash sh/robustness_fmnist.sh
#   # ARGS_<MODE> (upper case, - as _) go to that mode only, e.g. ARGS_FP="--epochs 10" ARGS_I_BAU="--split_ratio 0.02";
#   # LMC_ARGS to utils.lmc (e.g. "--points 5"); SWEEP_ARGS="--workers 2" runs two jobs at a time, each
#   # waiting for the jobs that write its inputs (docs/robustness_fmnist_2024.md has the CPU recipe it ran)
#   SWEEP_ARGS=--dry_run bash sh/robustness_fmnist.sh          # list the steps, done or to do; run nothing
#
# Defaults are the official protocol: BTI/PAM 3 rounds x 30 epochs on 5% with the official BTI-DBF
# inversion (UNLEARN_EPOCHS, BTI_ARGS change it); victims trained 15 epochs with a cosine schedule
# on 10k images (ATTACK_ARGS). Finished steps are skipped, so a killed run is resumed by starting it
# again; a failed step is reported at the end with its log, and the others still run (a step whose
# input a failed step should have made is reported as blocked). Runs on `python -m utils.sweep jobs`.
# Then the tables (the robustness table and the NeurIPS 2024 layout), the O-ASR/P-ASR figure and the
# linear mode connectivity of each record (ANALYSES=0 skips the last three).
# Logs: <record_root>/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
ROOT=${RECORD_ROOT:-record/robustness_fmnist}
DEVICE=${DEVICE:-auto}
UNLEARN_EPOCHS=${UNLEARN_EPOCHS:-30}
QRA=${QRA:-1}
read -r -a MODES <<<"${MODES:-ft fst ft-sam bti pam}"
read -r -a ATTACKS <<<"${ATTACKS:-badnet blended}"
read -r -a POISON_NUMS <<<"${POISON_NUMS:-5 20}"
read -r -a BTI_ARGS <<<"${BTI_ARGS:-}"
read -r -a QRA_ARGS <<<"${QRA_ARGS:-}"
read -r -a FT_ARGS <<<"${FT_ARGS:-}"
read -r -a LMC_ARGS <<<"${LMC_ARGS:-}"
mode_args() {  # mode_args <mode>: the words of ARGS_<MODE> into MODE_ARGS
  local var; var="ARGS_$(printf '%s' "$1" | tr 'a-z-' 'A-Z_')"
  read -r -a MODE_ARGS <<<"${!var:-}"
}
ANALYSES=${ANALYSES:-1}
read -r -a QRA_MODES <<<"${QRA_MODES:-${MODES[*]}}"
. sh/_jobs.sh
. sh/_victims_fmnist.sh
# RA with n poisoned samples writes retune/ for the first count and retune_p<n>/ for the others
ra_tag() { [ "$1" = "${POISON_NUMS[0]}" ] && echo "" || echo "p$1"; }
ra_dir() { local t; t=$(ra_tag "$1"); [ -z "$t" ] && echo retune || echo "retune_$t"; }
retune() {  # retune <name> <folder holding the model> <model file> <pratio> <defense>
  local name=$1 base=$2 model=$3 pratio=$4 defense=$5 n
  for n in "${POISON_NUMS[@]}"; do
    job "$name-ra$n" "$base/$(ra_dir "$n")/result.json" "$model" \
      "$PYTHON" fine_tune/ft_poison.py "${COMMON[@]}" --attack "$attack" --pratio "$pratio" --defense_type "$defense" \
      --poison_num "$n" --tag "$(ra_tag "$n")"
  done
}

for attack in "${ATTACKS[@]}"; do
  victim "$attack" 0.1
  rec=$(record "$attack" 0.1)
  # bti and pam in one ft.py call: they share the pre-trained BTI-DBF generator
  unlearn=()
  for mode in "${MODES[@]}"; do
    case $mode in
      bti|pam) [ -f "$rec/defense/$mode/result.json" ] || unlearn+=("$mode");;
      *) mode_args "$mode"
         job "$attack-$mode" "$rec/defense/$mode/result.json" "$rec/attack_result.pt" \
           "$PYTHON" fine_tune/ft.py "${COMMON[@]}" --attack "$attack" --pratio 0.1 --ft_mode "$mode" "${FT_ARGS[@]}" \
           "${MODE_ARGS[@]}";;
    esac
  done
  if [ ${#unlearn[@]} -gt 0 ]; then
    joined=$(IFS=,; echo "${unlearn[*]}")
    outs=$(for m in "${unlearn[@]}"; do printf '%s,' "$rec/defense/$m/result.json"; done)
    job "$attack-${joined/,/-}" "${outs%,}" "$rec/attack_result.pt" \
      "$PYTHON" fine_tune/ft.py "${COMMON[@]}" --attack "$attack" --pratio 0.1 --ft_mode "$joined" \
      --epochs "$UNLEARN_EPOCHS" --eval_every 10 "${BTI_ARGS[@]}" "${FT_ARGS[@]}"
  fi
  for mode in "${MODES[@]}"; do
    retune "$attack-$mode" "$rec/defense/$mode" "$rec/defense/$mode/model.pt" 0.1 "$mode"
  done
  retune "$attack-none" "$rec" "$rec/attack_result.pt" 0.1 none
  victim "$attack" 0.0  # the clean model: RA baseline and QRA's clean reference
  clean=$(record "$attack" 0.0)
  retune "$attack-clean" "$clean" "$clean/attack_result.pt" 0.0 none
  if [ "$QRA" = 1 ]; then
    for mode in "${QRA_MODES[@]}"; do
      job "$attack-$mode-qra" "$rec/defense/$mode/qra/result.json" "$rec/defense/$mode/retune/model.pt,$clean/attack_result.pt" \
        "$PYTHON" fine_tune/qra.py "${COMMON[@]}" --attack "$attack" --pratio 0.1 --defense_type "$mode" "${QRA_ARGS[@]}"
    done
  fi
done
status=0
run_jobs || status=$?

tags=()
for n in "${POISON_NUMS[@]}"; do tags+=("$(ra_tag "$n")"); done
qra_flag=(); [ "$QRA" = 1 ] && qra_flag=(--qra)
case " ${SWEEP_ARGS:-} " in *" --dry_run "*) exit $status;; esac  # a dry run leaves nothing to tabulate
"$PYTHON" -m utils.robustness_table "$ROOT" --dataset fmnist --model smallcnn --attacks "${ATTACKS[@]}" \
  --retune_tags "${tags[@]}" "${qra_flag[@]}" || status=$?
if [ "$ANALYSES" = 1 ]; then
  "$PYTHON" -m utils.results "$ROOT" --dataset fmnist --model smallcnn --pratio 0.1 --attacks "${ATTACKS[@]}" \
    --layout 2024 || status=$?
  "$PYTHON" -m utils.plots opasr "$ROOT" || status=$?
  for attack in "${ATTACKS[@]}"; do
    "$PYTHON" -m utils.lmc "$(record "$attack" 0.1)" --modes "${MODES[@]}" --device "$DEVICE" --progress false \
      "${LMC_ARGS[@]}" || status=$?
  done
fi
exit $status
