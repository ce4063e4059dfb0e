#!/usr/bin/env bash
# The FST paper's CIFAR-10 grid on GPUs: ResNet-18 victims (the `cifar10` prototype: 100 epochs, SGD
# 0.1, cosine) for BadNet, Blended, SSBA and LC at pratios 10%, 5%, 1% and 0.5%, 3 seeds; each
# purified with the five modes on 2% of the training set for 10 epochs (lr 0.01, alpha 0.2); then the
# tables (record/repro_cifar10/tables.md) and figures (record/repro_cifar10/figures/).
#
#   bash sh/repro_cifar10.sh                                 # all local GPUs, one job per GPU
#   ATTACKS="badnet" PRATIOS="0.1 0.005" SEEDS="0" bash sh/repro_cifar10.sh   # a slice
#   EXECUTOR=submitit SUBMITIT='{"timeout_min": 180, "slurm_partition": "gpu", "gpus_per_node": 1}' \
#     bash sh/repro_cifar10.sh                               # through SLURM with submitit
#
# Precision: AMP=none by default, so victims, purifications and the cached LC/SSBA resources run in
# full fp32 as the official code does; AMP=auto (bf16 autocast on CUDA) is faster but not the official
# numerics:  AMP=auto bash sh/repro_cifar10.sh
#
# CIFAR-10 must be in data/cifar10 (torchvision's cifar-10-batches-py; `download: true` fetches it).
# Resumable like every sweep: run it again after a kill or a failure.
#
# Cost estimate (training images processed; measure your own throughput with
# `bash sh/bench.sh --model resnet18 --device cuda:0`):
#   victims:       4 attacks x 4 pratios x 3 seeds = 48 runs x 100 epochs x 50k images = 240M images
#   purification:  48 records x 5 modes x 10 epochs x (1k tuning + ~19k evaluated)  = ~48M image passes,
#                  mostly forward-only evaluation
#   LC and SSBA resources (PGD images, the StegaStamp-style encoder) are made once per seed and cached.
# At an assumed 8-10k training images/s for ResNet-18 with bf16 (AMP=auto) on one A100/H100-class GPU
# that is about 7-9 GPU-hours for the victims and under 1 GPU-hour for the purifications: ~8-10
# GPU-hours in all (about 1 hour on 8 GPUs); the fp32 default is slower by an unmeasured factor. This
# is an estimate from image counts, not a measurement: no GPU was available when this script was written.
set -uo pipefail
cd "$(dirname "$0")/.."
. sh/install.sh
set +e
ROOT=${RECORD_ROOT:-record/repro_cifar10}
ATTACKS=${ATTACKS:-badnet blended ssba lc}
PRATIOS=${PRATIOS:-0.1 0.05 0.01 0.005}
SEEDS=${SEEDS:-0 1 2}
EXECUTOR=${EXECUTOR:-local}
SUBMITIT=${SUBMITIT:-{\}}
AMP=${AMP:-none}
RUN=(--executor "$EXECUTOR" --submitit_params "$SUBMITIT")
[ -n "${WORKERS:-}" ] && RUN+=(--workers "$WORKERS")
status=0
# shellcheck disable=SC2086
"$PY" -m utils.sweep attacks --yaml_path config/attack/prototype/cifar10.yaml --attacks $ATTACKS --pratios $PRATIOS \
  --seeds $SEEDS --record_root "$ROOT" "${RUN[@]}" -- --amp "$AMP" || status=1
# shellcheck disable=SC2086
"$PY" -m utils.sweep purify --record_root "$ROOT" --modes all --attacks $ATTACKS --pratios $PRATIOS --seeds $SEEDS \
  "${RUN[@]}" -- --epochs 10 --split_ratio 0.02 --lr 0.01 --alpha 0.2 --amp "$AMP" || status=1
# shellcheck disable=SC2086
"$PY" -m utils.results "$ROOT" --dataset cifar10 --model resnet18 --attacks $ATTACKS --pratio $PRATIOS \
  --csv "$ROOT/results.csv" --summary_csv "$ROOT/summary.csv" --markdown "$ROOT/tables.md" || status=1
"$PY" -m utils.plots pratio --csv "$ROOT/results.csv" --out "$ROOT/figures" || status=1
exit $status
