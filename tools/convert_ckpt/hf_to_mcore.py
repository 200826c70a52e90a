"""HF Qwen3 directory -> Megatron torch_dist checkpoint at any TP x PP, on CPU, without torchrun.

    python tools/convert_ckpt/hf_to_mcore.py --hf-dir IN --out-dir OUT --tp N --pp M

The command line of ``srpo-convert-ckpt hf-to-mcore`` (srpo_megatron/convert_ckpt.py), run from a
checkout: spawns N*M gloo processes on this machine; each loads only its slices of the HF tensors.
Writes OUT/model/ (torch_dist) and OUT/srpo_meta.json; see tools/convert_ckpt/README.md.
"""

import sys
from pathlib import Path

# Run from a checkout: use the package next to this script, not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from srpo_megatron.convert_ckpt import main  # noqa: E402 (after the path)

if __name__ == "__main__":  # required: dist_checkpointing's writer and our ranks start with spawn
    sys.exit(main(["hf-to-mcore", *sys.argv[1:]]))
