#!/usr/bin/env bash
# Installs srpo_megatron (editable, with the dev extras) into the active virtual environment, or
# into .venv (created with Python 3.12) when none is active. Re-running is cheap: pip is skipped
# while pyproject.toml is unchanged since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  venv="$VIRTUAL_ENV"
else
  venv="$PWD/.venv"
  if [[ ! -x "$venv/bin/python" ]]; then
    py=""
    # pyenv's shim for python3.12 exists but fails unless 3.12 is selected: try each for real.
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
      if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
        py="$candidate"; break
      fi
    done
    [[ -n "$py" ]] || { echo "install.sh: Python 3.12 not found (megatron-core 0.19 needs >= 3.12)" >&2; exit 1; }
    echo "install.sh: creating $venv with $py"
    "$py" -m venv "$venv"
  fi
fi

stamp="$venv/.srpo_megatron_install_stamp"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "install.sh: $venv is up to date"
  exit 0
fi
echo "install.sh: installing srpo_megatron[dev] into $venv (torch, megatron-core, transformers, ...)"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
echo "install.sh: done ($("$venv/bin/python" -c 'import torch, megatron.core as m; print(f"torch {torch.__version__}, megatron-core {m.__version__}")' 2>/dev/null))"
