#!/usr/bin/env bash
# The papers' full-length configuration of the matching methods (issue 4): DC, DSA, DM and
# DataDAM at IPC 1 / 10 / 50 on MNIST, Fashion-MNIST and CIFAR-10, as `pydistill` commands for
# a GPU machine. Not run in CI and not run on the 2-core CPU machine, whose tables
# (benchmarks/results/methods_table.md) stop after a few percent of these iterations.
#
#   RUNS=runs bash benchmarks/matching_gpu.sh distill dc mnist 10     # one distillation
#   RUNS=runs bash benchmarks/matching_gpu.sh eval dc mnist 10        # 5 evaluation networks
#   RUNS=runs bash benchmarks/matching_gpu.sh all                     # every cell, in order
#   (smoke test anywhere: DEVICE=cpu ITERATIONS=1 EVAL_EPOCHS=1 EVAL_REPEATS=1 ... digits 1)
#
# Iterations (REFERENCE.md 6.1 / the papers): DC and DSA 1000 outer iterations (their
# outer / inner loops per IPC are the methods' defaults: 1/1, 10/50, 50/10), DM 20,000,
# DataDAM 8,000; every other hyperparameter is the method's default (the paper's). Evaluation:
# the harness protocol with the papers' 1000 epochs and 5 networks.
set -euo pipefail
RUNS="${RUNS:-runs}"
DEVICE="${DEVICE:-cuda}"
PD=(python -m pydistill_ext.cli)

iterations() {
  if [[ -n "${ITERATIONS:-}" ]]; then echo "$ITERATIONS"; return; fi
  case "$1" in dc|dsa) echo 1000 ;; dm) echo 20000 ;; datadam) echo 8000 ;;
    *) echo "method: dc, dsa, dm or datadam" >&2; exit 2 ;; esac
}

distill() {
  local method="$1" dataset="$2" ipc="$3"
  "${PD[@]}" distill --method "$method" --dataset "$dataset" --ipc "$ipc" \
    --iterations "$(iterations "$method")" --seed 0 --device "$DEVICE" \
    --out "$RUNS/$dataset/${method}_ipc${ipc}_full" --checkpoint-seconds 600 --quiet
}

evaluate() {
  local method="$1" dataset="$2" ipc="$3"
  "${PD[@]}" eval "$RUNS/$dataset/${method}_ipc${ipc}_full/distilled.safetensors" \
    --dataset "$dataset" --model convnet --epochs "${EVAL_EPOCHS:-1000}" --repeats "${EVAL_REPEATS:-5}" --device "$DEVICE" --quiet
}

case "${1:-}" in
  distill) distill "${2:?method}" "${3:?dataset}" "${4:?ipc}" ;;
  eval) evaluate "${2:?method}" "${3:?dataset}" "${4:?ipc}" ;;
  all)
    for dataset in mnist fashion_mnist cifar10; do
      for ipc in 1 10 50; do
        for method in dc dsa dm datadam; do
          distill "$method" "$dataset" "$ipc"
          evaluate "$method" "$dataset" "$ipc"
        done
      done
    done ;;
  *) sed -n 2,15p "$0"; exit 2 ;;
esac
