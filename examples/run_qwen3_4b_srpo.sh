#!/usr/bin/env bash
# SRPO on Qwen3-4B, one 8-GPU node (actor TP=2 x DP=4, eight colocated SGLang engines of TP=1).
#   HF_MODEL_DIR=/ckpt/Qwen3-4B DATA_DIR=/data/sciknoweval/chemistry bash examples/run_qwen3_4b_srpo.sh
# Add --dry-run to validate the config and the layout on any machine (no GPU, no weights needed).
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc-per-node "${GPUS_PER_NODE:-8}" -m srpo_megatron.train \
  --config configs/qwen3_4b_srpo.yaml \
  model.hf_dir="${HF_MODEL_DIR:-configs/models/qwen3_4b}" \
  "data.train_files=[${DATA_DIR:-data}/train.json]" \
  "data.test_files=[${DATA_DIR:-data}/test.json]" \
  log.output_dir="${OUTPUT_DIR:-outputs}/qwen3_4b_srpo" \
  "$@"
