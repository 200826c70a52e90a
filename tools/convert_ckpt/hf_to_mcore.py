"""HF Qwen3 directory -> Megatron torch_dist checkpoint at any TP x PP, on CPU, without torchrun.

    python tools/convert_ckpt/hf_to_mcore.py --hf-dir IN --out-dir OUT --tp N --pp M

Spawns N*M gloo processes on this machine; each loads only its slices of the HF tensors. Writes
OUT/model/ (torch_dist) and OUT/srpo_meta.json; see tools/convert_ckpt/README.md.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU tool: gloo ranks, never a GPU (set before torch starts)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # N*M ranks share this machine's cores
# Run from a checkout: use the package next to this script, not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> None:
    from srpo_megatron.runtime.quiet import silence_known_noise

    silence_known_noise()  # before megatron-core is imported
    import torch
    from rich.console import Console

    from srpo_megatron.models.qwen3.convert import hf_to_mcore

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hf-dir", required=True, help="HF directory: config.json + safetensors")
    parser.add_argument("--out-dir", required=True, help="checkpoint directory to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="parameter dtype (default: as stored)"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    written = hf_to_mcore(
        args.hf_dir,
        args.out_dir,
        tp=args.tp,
        pp=args.pp,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        params_dtype=getattr(torch, args.dtype) if args.dtype else None,
        progress=not args.no_progress,
    )
    console = Console(soft_wrap=True)  # one line per file, whatever the width
    console.print(f"wrote Megatron checkpoint (TP={args.tp}, PP={args.pp}) to {args.out_dir}:")
    for path in written:
        console.print(f"  {path}  ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":  # required: dist_checkpointing's writer and our ranks start with spawn
    main()
