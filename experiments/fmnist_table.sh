#!/usr/bin/env bash
# Reproduce experiments/results/fmnist_table.{md,json}: train the three students of the table
# (DMD 1-step, DMD2 1-step, DMD2 4-step, the presets with longer runs), then evaluate them with
# the teacher at every NFE (experiments/fmnist_table.py).
#
#   bash experiments/fmnist_table.sh [train|table|all]
#
# Environment (defaults in brackets): OUT_ROOT [outputs/table]; DMD2_ITERS [10000] iterations of
# the DMD2 runs (TTUR 5: 2000 generator steps); DMD_ITERS [2000] iterations of DMD (ratio 1: the
# same 2000 generator steps); MAX_TIME [none] a Lightning max_time cap per run (DD:HH:MM:SS);
# PARALLEL [0] 1 trains the three at once (on a GPU); NUM_SAMPLES [10000]; PYTHON [python];
# TABLE_OUT [experiments/results/fmnist_table]. On 2 CPU cores one DMD2 run takes about 2 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ROOT=${OUT_ROOT:-outputs/table}
mkdir -p "$ROOT"

train_one() {
  local preset=$1 iters=$2
  echo "training $preset ($iters iterations) -> $ROOT/$preset (log: $ROOT/$preset.log)"
  "$PY" -m dmd.train "experiment=$preset" "max_iterations=$iters" "hydra.run.dir=$ROOT/$preset" \
    trainer.enable_progress_bar=false ${MAX_TIME:+"+trainer.max_time=$MAX_TIME"} \
    ${TRAIN_OVERRIDES:-} >"$ROOT/$preset.log" 2>&1
}

train() {
  local runs=("fmnist_dmd ${DMD_ITERS:-2000}" "fmnist_dmd2 ${DMD2_ITERS:-10000}"
              "fmnist_dmd2_4step ${DMD2_ITERS:-10000}")
  if [[ ${PARALLEL:-0} == 1 ]]; then
    local pids=()
    for r in "${runs[@]}"; do train_one $r & pids+=($!); done
    local failed=0
    for p in "${pids[@]}"; do wait "$p" || failed=1; done
    return $failed
  fi
  for r in "${runs[@]}"; do train_one $r; done
}

table() {
  "$PY" experiments/fmnist_table.py --num-samples "${NUM_SAMPLES:-10000}" \
    --out "${TABLE_OUT:-experiments/results/fmnist_table}" \
    --generator "DMD 1-step=$ROOT/fmnist_dmd" --generator "DMD2 1-step=$ROOT/fmnist_dmd2" \
    --generator "DMD2 4-step=$ROOT/fmnist_dmd2_4step" ${TABLE_ARGS:-}
}

case "${1:-all}" in
  train) train ;;
  table) table ;;
  all) train && table ;;
  *) echo "usage: $0 [train|table|all]" >&2; exit 2 ;;
esac
