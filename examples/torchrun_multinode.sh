#!/usr/bin/env bash
# Multi-node SRPO without Slurm: run this on every node with the same MASTER_ADDR and its own NODE_RANK.
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 bash examples/torchrun_multinode.sh configs/qwen3_8b_srpo.yaml key=value ...
# SGLang on several nodes: the trainer launches engines on global rank 0's node only, so pass the
# servers you started on each node: rollout.engine_urls=[http://node0:30000,...] (README, "Rollout engines").
set -euo pipefail
cd "$(dirname "$0")/.."
config="$1"; shift
exec torchrun --nnodes "${NNODES:?}" --node-rank "${NODE_RANK:?}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" \
  -m srpo_megatron.train --config "$config" "$@"
