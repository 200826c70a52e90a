#!/usr/bin/env bash
# SRPO on Qwen3-30B-A3B (MoE), one 8-GPU node of 141 GB GPUs (H200): actor TP=4 x EP=2 (DP=2, one
# copy of the experts over the node), two colocated SGLang engines of TP=4, launched by the trainer
# (configs/qwen3_30b_a3b_srpo.yaml says why this layout, and why 80 GB GPUs do not hold it; the
# engines' logs in $OUTPUT_DIR/qwen3_30b_a3b_srpo/sglang/).
#   HF_MODEL_DIR=/ckpt/Qwen3-30B-A3B DATA_DIR=/data/sciknoweval/chemistry \
#     bash examples/run_qwen3_30b_a3b_srpo.sh
# Add --dry-run to validate the config and the layout on any machine (no GPU, no weights needed),
# and --gpu-memory-gib 140 to plan for the H200's memory (the default plans for 80 GiB: it warns).
set -euo pipefail
cd "$(dirname "$0")/.."
exec torchrun --standalone --nproc-per-node "${GPUS_PER_NODE:-8}" -m srpo_megatron.train \
  --config configs/qwen3_30b_a3b_srpo.yaml \
  model.hf_dir="${HF_MODEL_DIR:-configs/models/qwen3_30b_a3b}" \
  "data.train_files=[${DATA_DIR:-data}/train.json]" \
  "data.test_files=[${DATA_DIR:-data}/test.json]" \
  log.output_dir="${OUTPUT_DIR:-outputs}/qwen3_30b_a3b_srpo" \
  "$@"
