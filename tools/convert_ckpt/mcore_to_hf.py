"""Megatron torch_dist checkpoint (any TP/PP) -> HF Qwen3 directory, on CPU, in one process.

    python tools/convert_ckpt/mcore_to_hf.py --mcore-dir IN --out-dir OUT [--tokenizer-dir DIR]

The command line of ``srpo-convert-ckpt mcore-to-hf`` (srpo_megatron/convert_ckpt.py), run from a
checkout: IN holds srpo_meta.json and model/ (written by hf_to_mcore.py or by the trainer); OUT
loads with AutoModelForCausalLM.
"""

import sys
from pathlib import Path

# Run from a checkout: use the package next to this script, not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from srpo_megatron.convert_ckpt import main  # noqa: E402 (after the path)

if __name__ == "__main__":  # required: dist_checkpointing starts worker processes with spawn
    sys.exit(main(["mcore-to-hf", *sys.argv[1:]]))
