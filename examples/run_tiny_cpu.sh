#!/usr/bin/env bash
# The embedded default: the tiny CPU run, 2 processes on gloo.
# Until the SRPO trainer lands (issue 8) this runs the Megatron-core TP=2 smoke training.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${VIRTUAL_ENV:-$PWD/.venv}/bin/python"
exec "$py" -m srpo_megatron.runtime.smoke "$@"
