#!/usr/bin/env bash
# Every GPU row of the iteration benchmark (issue 18) in one run on one GPU (~5 minutes on an H200):
#
#   bash experiments/iteration_benchmark_gpu.sh [OUT]     # OUT [experiments/results/iteration_benchmark_gpu]
#
# Rows: fmnist_dmd2 at its batch (32) and at batch 128 (eager; fused AdamW + torch.compile; the same
# with CUDA graphs, compile.mode=reduce-overhead), fmnist_dmd2_4step, t2i_tiny (the presets'
# own trainer: bf16 autocast where the preset asks for it, float32 otherwise), and DMD2 on an
# SD1.5-size random UNet2DConditionModel (published config, 64x64 latents, batch SD15_BATCH [8],
# teacher in bf16, bf16 autocast): fully trained and LoRA 64, each with and without gradient
# checkpointing; then fmnist_dmd2's losses over 20 iterations compiled (inductor) vs eager. A row
# that fails is recorded as such and the others still run. Writes OUT.json and OUT.md.
#
# Environment: PYTHON [python3]; SD15_BATCH [8]; WHEELS: a folder of wheels to install first
# (a GPU machine without network: the project's packages beside its own torch); FMNIST_ROOT: a
# folder holding Fashion-MNIST's raw files when /usr/share/datasets/fashion-mnist is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-experiments/results/iteration_benchmark_gpu}
if [[ -n ${WHEELS:-} ]]; then
  "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl
fi
fm=${FMNIST_ROOT:+data.root=$FMNIST_ROOT}  # the Fashion-MNIST presets' own override
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU: run experiments/iteration_benchmark.py for the CPU rows'"
PYTHONPATH=. "$PY" experiments/iteration_benchmark.py \
  --preset "fmnist_dmd2${fm:+:$fm}" "fmnist_dmd2:data.batch_size=128${fm:+,$fm}" \
           "fmnist_dmd2:data.batch_size=128,optim.fused=true,compile.enabled=true${fm:+,$fm}" \
           "fmnist_dmd2:data.batch_size=128,optim.fused=true,compile.enabled=true,compile.mode=reduce-overhead${fm:+,$fm}" \
           "fmnist_dmd2_4step${fm:+:$fm}" t2i_tiny \
  --sd15 full full+gc lora64 lora64+gc --sd15-batch "${SD15_BATCH:-8}" \
  --compile-check "fmnist_dmd2${fm:+:$fm}" --out "$OUT"
