# Sourced by the tiny CPU examples: makes, once, the starting checkpoint (a tiny Qwen3 after the format
# warm-up, outputs/tiny_qwen3) and the synthetic data (outputs/synthetic); sets $py.
py="${VIRTUAL_ENV:-$PWD/.venv}/bin/python"
export OMP_NUM_THREADS=1
[[ -f outputs/tiny_qwen3/config.json ]] || "$py" tools/make_tiny_model.py --out-dir outputs/tiny_qwen3 --seed 0
[[ -f outputs/synthetic/train.parquet ]] || "$py" tools/make_synthetic_data.py --out-dir outputs/synthetic --seed 0
