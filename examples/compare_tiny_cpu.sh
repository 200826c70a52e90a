#!/usr/bin/env bash
# SRPO against GRPO, SDPO and SRPO without DW on the tiny CPU task, 3 seeds each (srpo-compare, about
# an hour on 2 cores): outputs/compare/compare.png and compare.md. Killed, it resumes where it stopped.
# Arguments go to srpo-compare, e.g. the long runs:  bash examples/compare_tiny_cpu.sh --variants srpo grpo --steps 150
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/tiny_inputs.sh
exec "$py" -m srpo_megatron.compare "$@"
