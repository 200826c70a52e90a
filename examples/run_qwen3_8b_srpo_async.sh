#!/usr/bin/env bash
# SRPO on Qwen3-8B, one 8-GPU node, async rollouts: the actor on GPUs 0-3 (TP=4), two disaggregated
# SGLang engines of TP=2 on GPUs 4-7, launched by the trainer (configs/qwen3_8b_srpo_async.yaml;
# their logs in $OUTPUT_DIR/qwen3_8b_srpo_async/sglang/).
#   HF_MODEL_DIR=/ckpt/Qwen3-8B DATA_DIR=/data/sciknoweval/chemistry bash examples/run_qwen3_8b_srpo_async.sh
# Add --dry-run to validate the config and the layout on any machine (no GPU, no weights needed).
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc-per-node "${TRAIN_GPUS:-4}" -m srpo_megatron.train \
  --config configs/qwen3_8b_srpo.yaml --config configs/qwen3_8b_srpo_async.yaml \
  model.hf_dir="${HF_MODEL_DIR:-configs/models/qwen3_8b}" \
  "data.train_files=[${DATA_DIR:-data}/train.json]" \
  "data.test_files=[${DATA_DIR:-data}/test.json]" \
  log.output_dir="${OUTPUT_DIR:-outputs}/qwen3_8b_srpo_async" \
  "$@"
