"""Write the synthetic "pick the marked option" task (srpo_megatron/data/synthetic.py).

python tools/make_synthetic_data.py --out-dir data/synthetic --seed 0 --num-train 2048 --num-test 128
"""

import argparse
import json
from pathlib import Path

from srpo_megatron.data.rows import save_rows
from srpo_megatron.data.synthetic import make_synthetic_rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-test", type=int, default=128)
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    args = parser.parse_args(argv)
    counts = {}
    for split, num in (("train", args.num_train), ("test", args.num_test)):
        path = args.out_dir / f"{split}.{args.format}"
        save_rows(make_synthetic_rows(num, args.seed, split), path)
        counts[split] = num
        print(f"wrote {num} rows to {path}")
    print(json.dumps({"out_dir": str(args.out_dir), "seed": args.seed, **counts}))


if __name__ == "__main__":
    main()
