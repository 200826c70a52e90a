#!/usr/bin/env bash
# The tiny CPU SRPO run with rollouts from a real SGLang server on the CPU instead of the HF engine:
# the trainer launches one SGLang 0.5.23 server (disaggregated: its own process tree, weights
# broadcast into it over gloo after every step). Needs `bash scripts/install.sh --sglang` first
# (.venv-sglang). Extra arguments are passed on as key=value overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv-sglang/bin/python ]] || { echo "run_tiny_cpu_sglang.sh: run 'bash scripts/install.sh --sglang' first" >&2; exit 1; }
exec bash examples/run_tiny_cpu.sh rollout.engine=sglang rollout.mode=disaggregated \
  rollout.server_python="$PWD/.venv-sglang/bin/python" log.run_name=tiny_cpu_srpo_sglang "$@"
