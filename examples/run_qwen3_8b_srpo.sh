#!/usr/bin/env bash
# SRPO on Qwen3-8B, one 8-GPU node (actor TP=4 x DP=2, two colocated SGLang engines of TP=4,
# launched by the trainer; their logs in $OUTPUT_DIR/qwen3_8b_srpo/sglang/).
#   HF_MODEL_DIR=/ckpt/Qwen3-8B DATA_DIR=/data/sciknoweval/chemistry bash examples/run_qwen3_8b_srpo.sh
# Add --dry-run to validate the config and the layout on any machine (no GPU, no weights needed).
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc-per-node "${GPUS_PER_NODE:-8}" -m srpo_megatron.train \
  --config configs/qwen3_8b_srpo.yaml \
  model.hf_dir="${HF_MODEL_DIR:-configs/models/qwen3_8b}" \
  "data.train_files=[${DATA_DIR:-data}/train.json]" \
  "data.test_files=[${DATA_DIR:-data}/test.json]" \
  log.output_dir="${OUTPUT_DIR:-outputs}/qwen3_8b_srpo" \
  "$@"
