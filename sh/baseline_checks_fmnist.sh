#!/usr/bin/env bash
# Checks of why most baselines barely purify the Fashion-MNIST victims of the NeurIPS 2024
# comparison (docs/robustness_fmnist_2024.md, "Why the baselines do not purify"), on the same records
# as sh/robustness_fmnist.sh (same RECORD_ROOT; a victim not there yet is trained first, with that
# recipe's settings). Each check writes a tagged result next to the comparison's own, so nothing of
# the comparison is replaced:
#
#   - ANP with the reduced 100 iterations of the comparison, and with BackdoorBench's 2000, each
#     with the whole threshold sweep (--anp_curve: is there a threshold that removes the backdoor?);
#   - i-BAU on BackdoorBench's 5% split beside the comparison's 2%;
#   - CLP with smaller u than BackdoorBench's 3 (more channels pruned);
#   - NC with 10 reversal epochs per class beside the comparison's 2 (BackdoorBench: 80; with its
#     patience of 5 epochs, 2 never let the L1 cost move): does it then flag the true target?
#   - NAD as in the comparison (its result records the teacher's ASR: a backdoored teacher has no
#     clean attention to distill);
#   - RA with 5 poisoned samples on the official-setting ANP and i-BAU models.
#
#   bash sh/baseline_checks_fmnist.sh                    # both attacks, into record/robustness_fmnist/
#   LONG_ATTACKS=badnet SWEEP_ARGS="--workers 2" bash sh/baseline_checks_fmnist.sh
#   SWEEP_ARGS=--dry_run bash sh/baseline_checks_fmnist.sh   # list the steps, done or to do
#
# LONG_ATTACKS: the attacks that get the long checks (default: all): the 2000-iteration ANP (about
# 80 min of one CPU thread), NC with 2 and 10 epochs (about 7 and 20 min), i-BAU on 2% and 5% (about
# 12 and 30 min) and RA on the official ANP and i-BAU. CLP_US: the u values (default "2.5 2 1.5 1"). Finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
ROOT=${RECORD_ROOT:-record/robustness_fmnist}
DEVICE=${DEVICE:-auto}
read -r -a ATTACKS <<<"${ATTACKS:-badnet blended}"
read -r -a LONG_ATTACKS <<<"${LONG_ATTACKS:-${ATTACKS[*]}}"
read -r -a CLP_US <<<"${CLP_US:-2.5 2 1.5 1}"
. sh/_jobs.sh
. sh/_victims_fmnist.sh
purify() {  # purify <attack> <job name> <output folder under defense/> <ft.py flags...>
  local attack=$1 name=$2 out=$3 rec; rec=$(record "$1"); shift 3
  job "$attack-$name" "$rec/defense/$out/result.json" "$rec/attack_result.pt" \
    "$PYTHON" fine_tune/ft.py "${COMMON[@]}" --attack "$attack" --pratio 0.1 --eval_every 10 "$@"
}
retune() {  # retune <attack> <folder under defense/>
  local rec; rec=$(record "$1")
  job "$1-$2-ra5" "$rec/defense/$2/retune/result.json" "$rec/defense/$2/model.pt" \
    "$PYTHON" fine_tune/ft_poison.py "${COMMON[@]}" --attack "$1" --pratio 0.1 --defense_type "$2" --poison_num 5
}

for attack in "${ATTACKS[@]}"; do
  victim "$attack" 0.1
done
# the longest steps first, so that with two workers they overlap the short ones. Untagged results
# are the comparison's own runs (same command as sh/robustness_fmnist.sh with
# docs/figures/robustness_2024/plan.env): the reference each check is read against, on the same victim.
for attack in "${LONG_ATTACKS[@]}"; do
  case " ${ATTACKS[*]} " in *" $attack "*) ;; *) echo "error: LONG_ATTACKS: $attack is not in ATTACKS" >&2; exit 2;; esac
  purify "$attack" anp-official anp_official --ft_mode anp --anp_curve true --tag official
  purify "$attack" nc-e10 nc_e10 --ft_mode nc --nc_epochs 10 --epochs 10 --tag e10
  purify "$attack" i-bau-official i-bau_official --ft_mode i-bau --tag official
  purify "$attack" i-bau i-bau --ft_mode i-bau --split_ratio 0.02
  purify "$attack" nc nc --ft_mode nc --nc_epochs 2 --epochs 10
done
for attack in "${ATTACKS[@]}"; do
  purify "$attack" anp-curve anp_curve --ft_mode anp --anp_iterations 100 --anp_curve true --tag curve
  purify "$attack" nad nad --ft_mode nad
  purify "$attack" clp clp --ft_mode clp
  for u in "${CLP_US[@]}"; do
    purify "$attack" "clp-u$u" "clp_u$u" --ft_mode clp --clp_u "$u" --tag "u$u"
  done
done
for attack in "${LONG_ATTACKS[@]}"; do
  retune "$attack" i-bau_official
  retune "$attack" anp_official
done
status=0
run_jobs || status=$?
case " ${SWEEP_ARGS:-} " in *" --dry_run "*) exit $status;; esac  # a dry run leaves nothing to tabulate
# every check beside the comparison's own result of the same mode
"$PYTHON" -m utils.results "$ROOT" --dataset fmnist --model smallcnn --pratio 0.1 --attacks "${ATTACKS[@]}" \
  --modes anp i-bau nad clp nc --tag '*' || status=$?
exit $status
