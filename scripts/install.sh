#!/usr/bin/env bash
# Installs srpo_megatron (editable, with the dev extras) into the active virtual environment, or
# into .venv (created with Python 3.12) when none is active. Re-running is cheap: pip is skipped
# while pyproject.toml is unchanged since the last successful install.
#
#   --sglang   also make .venv-sglang: Python 3.12 with the SGLang release pinned in pyproject.toml,
#              for SGLang servers on this machine's CPU (rollout.server_python; the sglang-marked
#              tests). An environment of its own: sglang pins its own transformers. About 5 minutes
#              and 11 GB the first time (its torch is the CUDA build; PyPI has no other).
set -euo pipefail
cd "$(dirname "$0")/.."

with_sglang=0
for arg in "$@"; do
  case "$arg" in
    --sglang) with_sglang=1 ;;
    *) echo "install.sh: unknown argument $arg (known: --sglang)" >&2; exit 2 ;;
  esac
done

python312() {
  # pyenv's shim for python3.12 exists but fails unless 3.12 is selected: try each for real.
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$candidate"; return
    fi
  done
  echo "install.sh: Python 3.12 not found (megatron-core 0.19 and sglang need >= 3.12)" >&2; exit 1
}

if [[ "$with_sglang" == 1 ]]; then
  sglang_venv="$PWD/.venv-sglang"
  pin="$(grep -o '"sglang==[^"]*"' pyproject.toml | tr -d '"')"
  [[ -n "$pin" ]] || { echo "install.sh: no sglang pin in pyproject.toml" >&2; exit 1; }
  installed() {  # the pinned version, as the environment's own metadata says (no import: fast)
    "$sglang_venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '${pin#sglang==}')" 2>/dev/null
  }
  if installed; then
    echo "install.sh: $sglang_venv ($pin) is up to date"
  else
    [[ -x "$sglang_venv/bin/python" ]] || { rm -rf "$sglang_venv"; "$(python312)" -m venv "$sglang_venv"; }
    echo "install.sh: installing $pin into $sglang_venv (about 5 minutes the first time)"
    "$sglang_venv/bin/python" -m pip install --quiet --upgrade pip
    "$sglang_venv/bin/python" -m pip install --quiet "$pin"
    installed || { echo "install.sh: $pin did not install into $sglang_venv" >&2; exit 1; }
  fi
fi

if [[ -n "${VIRTUAL_ENV:-}" ]]; then
  venv="$VIRTUAL_ENV"
else
  venv="$PWD/.venv"
  if [[ ! -x "$venv/bin/python" ]]; then
    py="$(python312)"
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
