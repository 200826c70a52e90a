#!/usr/bin/env bash
# The tiny CPU SRPO run on a tiny Qwen3-MoE (8 experts, top-2, every layer sparse, as Qwen3-30B-A3B):
# 2 processes on gloo, expert parallelism 2 (each rank holds 4 experts; attention replicated, data
# parallel 2). The starting checkpoint (outputs/tiny_qwen3_moe, after the format warm-up) and the
# synthetic data are made once. Extra arguments are key=value overrides, e.g.
#   bash examples/run_tiny_moe_cpu.sh train.total_steps=3 eval.every=-1
set -euo pipefail
cd "$(dirname "$0")/.."
py="${VIRTUAL_ENV:-$PWD/.venv}/bin/python"
export OMP_NUM_THREADS=1
[[ -f outputs/tiny_qwen3_moe/config.json ]] ||
  "$py" tools/make_tiny_model.py --out-dir outputs/tiny_qwen3_moe --seed 0 --moe
[[ -f outputs/synthetic/train.parquet ]] || "$py" tools/make_synthetic_data.py --out-dir outputs/synthetic --seed 0
exec "$py" -m torch.distributed.run --standalone --nproc-per-node 2 \
  -m srpo_megatron.train --config configs/tiny_cpu.yaml \
  model.hf_dir=outputs/tiny_qwen3_moe model.tp=1 model.ep=2 log.run_name=tiny_moe_cpu_srpo "$@"
