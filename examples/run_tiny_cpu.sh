#!/usr/bin/env bash
# The embedded default: the tiny CPU SRPO run, 2 processes on gloo (TP=2), about 5 minutes on 2 cores.
# The starting checkpoint (tiny Qwen3 after a format warm-up) and the synthetic data are made once,
# under outputs/. Extra arguments are passed on as key=value overrides, e.g. the baselines:
#   bash examples/run_tiny_cpu.sh algorithm.variant=grpo log.run_name=tiny_cpu_grpo
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/tiny_inputs.sh
exec "$py" -m torch.distributed.run --standalone --nproc-per-node 2 \
  -m srpo_megatron.train --config configs/tiny_cpu.yaml "$@"
