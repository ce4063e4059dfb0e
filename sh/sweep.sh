#!/usr/bin/env bash
# Any grid of attacks, purifications or retuning attacks, resumable, on local GPUs/CPU processes or
# through submitit (SLURM). A thin wrapper: installs what is missing, then `python -m utils.sweep "$@"`.
#
#   bash sh/sweep.sh attacks --yaml_path config/attack/prototype/cifar10.yaml --attacks badnet blended \
#       --pratios 0.1 0.01 --seeds 0 1 2 --record_root record/grid
#   bash sh/sweep.sh purify --record_root record/grid --modes all -- --epochs 10 --split_ratio 0.02
#   bash sh/sweep.sh retune --record_root record/grid --defenses none ft fst
#   bash sh/sweep.sh purify --record_root record/grid --executor submitit --cluster slurm \
#       --submitit_params '{"timeout_min": 120, "slurm_partition": "gpu", "gpus_per_node": 1}'
#   bash sh/sweep.sh attacks ... --dry_run      # list the jobs, done or to do, with their commands
#
# Arguments after `--` go to every job's script. Run the same command again to resume.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/sh/install.sh"
cd "$ROOT"
exec "$PY" -m utils.sweep "$@"
