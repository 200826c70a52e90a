#!/usr/bin/env bash
# Lint, format check and the whole test suite, in the environment scripts/install.sh set up.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/algorithms -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${VIRTUAL_ENV:-$PWD/.venv}/bin/python"

"$py" -m ruff check .
"$py" -m ruff format --check .
# pytest exits 5 when it collected no test: that is a failure here, as is any other non-zero code.
"$py" -m pytest "$@"
