"""Weight sync to a disaggregated engine, in one run (CPU/gloo, 3 processes): bucketed vs one
collective per tensor, and with PP=2 each stage broadcasting its own layers vs stage 1 funnelled
through rank 0.

Ranks 0 and 1 are the trainer's source ranks (of PP stages 0 and 1), rank 2 an engine rank running
SGLang's receive protocol (``BroadcastWeightReceiver`` loading into preallocated tensors by name,
one request at a time, as SGLang's scheduler serves them). The tensors have the shapes of an
untied Qwen3 (defaults: 28 layers, hidden 512, vocabulary 32,768: 311 tensors, 243 MB in bf16).
Each mode syncs the full set ``--repeats`` times after one warm-up, modes interleaved; the median
is reported.

  bucketed               rank 0 alone, SGLang ``load_format="flattened_bucket"``: one request +
                         one broadcast per bucket
  per_tensor             rank 0 alone, one request + one broadcast per tensor (the naive sync)
  per_tensor_in_buckets  rank 0 alone, one request per bucket, one broadcast per tensor (SGLang's
                         plain format)
  pp2_per_stage          each stage's source rank broadcasts its own half in a group of its own
                         (``BroadcastWeightSync``'s layout)
  pp2_funnel             stage 1 sends its buckets to rank 0 point to point, which broadcasts the
                         whole model in one group (``in_process.send_to`` / ``with_stages_from``)

The sender keeps one bucket in flight while it flattens the next into a reused buffer (every mode
pipelines its requests the same way). Prints the figures; the last line is one JSON object
(``time_ratio`` = bucketed / per_tensor, ``pp2_time_ratio`` = per_stage / funnel). Gloo on one host
measures the per-collective and per-request overheads bucketing removes, and the extra hop of the
funnel; on GPUs NCCL's per-collective launch cost is smaller but the per-request RPC is the same.

    python benchmarks/weight_sync.py [--layers 28 --hidden 512 --bucket-mb 64 --repeats 9]
"""

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "rollout"))  # the loopback test helper
from loopback import LoopbackEngineHandle, serve_requests  # noqa: E402

from srpo_megatron.rollout.weight_sync.broadcast import (
    BroadcastWeightReceiver,
    BroadcastWeightSender,
    GroupAddress,
)
from srpo_megatron.rollout.weight_sync.in_process import send_to, with_stages_from
from srpo_megatron.runtime.distributed import find_free_port
from srpo_megatron.runtime.launch import run_distributed


def qwen3_shaped_tensors(
    layers: int, hidden: int, vocab: int, dtype: torch.dtype
) -> list[tuple[str, torch.Tensor]]:
    head_dim, heads, kv_heads, ffn = 64, hidden // 64, max(hidden // 128, 1), 3 * hidden
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (f"{p}.self_attn.q_norm.weight", (head_dim,)),
            (f"{p}.self_attn.k_norm.weight", (head_dim,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (ffn, hidden)),
            (f"{p}.mlp.up_proj.weight", (ffn, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, ffn)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    gen = torch.Generator().manual_seed(0)
    return [(name, torch.randn(shape, generator=gen).to(dtype)) for name, shape in shapes]


def stage_of(name: str, layers: int) -> int:
    """The PP=2 stage that owns an HF tensor: the embedding and the first half of the layers on
    stage 0, the rest, the final norm and lm_head on stage 1 (Megatron's even split)."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) >= layers // 2
    return int(not name.startswith("model.embed_tokens"))


def _bench(args, requests, replies, ports):
    """Ranks 0 and 1: the trainer's source ranks (of PP stages 0 and 1); rank 2: the engine."""
    tensors = qwen3_shaped_tensors(args.layers, args.hidden, args.vocab, getattr(torch, args.dtype))
    sources = dist.new_group([0, 1])  # every rank makes every group
    rank = dist.get_rank()
    if rank == 2:  # the engine rank: one client per source rank, served one request at a time
        held = {n: torch.empty_like(t) for n, t in tensors}

        def load(named):
            for name, t in named:
                held[name].copy_(t)

        serve_requests(BroadcastWeightReceiver(load), requests, replies, num_clients=2)
        return all(torch.equal(held[n], t) for n, t in tensors)

    engine = LoopbackEngineHandle(requests, replies, client_id=rank, name="engine", timeout_s=600)
    bucket_bytes = int(args.bucket_mb * 1024**2)
    # PP=1, rank 0 alone: the same tensors in three request / broadcast granularities
    pp1 = {
        "bucketed": dict(bucket_bytes=bucket_bytes, flattened=True),
        "per_tensor": dict(bucket_bytes=1, flattened=False),  # every tensor its own request
        "per_tensor_in_buckets": dict(bucket_bytes=bucket_bytes, flattened=False),
    }
    address = GroupAddress("127.0.0.1", ports[0], "bench", "gloo")
    # PP=2: each stage's source in a group of its own (per_stage), or stage 1 through rank 0 (funnel)
    stage_sender = BroadcastWeightSender(
        [engine],
        GroupAddress("127.0.0.1", ports[1 + rank], f"bench_pp{rank}", "gloo"),
        bucket_bytes=bucket_bytes,
        timeout_s=600,
    )
    sender = None
    if rank == 0:
        sender = BroadcastWeightSender([engine], address, timeout_s=600)
        sender.connect()
    stage_sender.connect()
    mine = [(n, t) for n, t in tensors if stage_of(n, args.layers) == rank]
    modes = [*pp1, "pp2_funnel", "pp2_per_stage"]
    times, stats = {m: [] for m in modes}, {}
    for repeat in range(args.repeats + 1):
        for mode in modes:  # interleaved, so machine noise hits every mode alike
            dist.barrier(group=sources)
            start = time.perf_counter()
            if mode == "pp2_per_stage":
                stats[mode] = stage_sender.send(mine)
            elif mode == "pp2_funnel":
                if rank == 0:
                    sender.bucket_bytes = bucket_bytes
                    stats[mode] = sender.send(with_stages_from(mine, [1]))
                else:
                    send_to(mine, 0, bucket_bytes)
            elif rank == 0:
                sender.bucket_bytes = pp1[mode]["bucket_bytes"]
                stats[mode] = sender.send(tensors, flattened=pp1[mode]["flattened"])
            dist.barrier(group=sources)  # PP=2: done when both stages are
            if repeat:  # repeat 0 is the warm-up
                times[mode].append(time.perf_counter() - start)
    for s in (sender, stage_sender):  # the engine leaves each group: before it stops serving
        if s is not None:
            s.close()
    engine.shutdown()
    if rank == 1:
        return None
    return {m: (statistics.median(t), stats[m].num_buckets) for m, t in times.items()}, stats["bucketed"]


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--bucket-mb", type=float, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), [ctx.Queue(), ctx.Queue()]
    ports = [find_free_port() for _ in range(3)]
    (medians, bucketed), _, received_ok = run_distributed(
        _bench, world_size=3, megatron=False, args=(args, requests, replies, ports), timeout=1800
    )
    assert received_ok, "the engine rank does not hold the sent tensors"
    for mode, (seconds, buckets) in medians.items():
        print(f"{mode:>24}: {seconds * 1e3:9.1f} ms  ({buckets} requests from rank 0)")
    ratio = medians["bucketed"][0] / medians["per_tensor"][0]
    print(
        f"{bucketed.num_tensors} tensors, {bucketed.num_bytes / 1e6:.1f} MB, {bucketed.num_buckets} buckets"
    )
    result = {
        "num_tensors": bucketed.num_tensors,
        "bytes": bucketed.num_bytes,
        "num_buckets": bucketed.num_buckets,
        "bucket_bytes": int(args.bucket_mb * 1024**2),
        "dtype": args.dtype,
        "backend": "gloo",
        "repeats": args.repeats,
        "bucketed_s": round(medians["bucketed"][0], 4),
        "per_tensor_s": round(medians["per_tensor"][0], 4),
        "per_tensor_in_buckets_s": round(medians["per_tensor_in_buckets"][0], 4),
        "time_ratio": round(ratio, 3),
        "time_ratio_vs_per_tensor_in_buckets": round(
            medians["bucketed"][0] / medians["per_tensor_in_buckets"][0], 3
        ),
        "pp2_funnel_s": round(medians["pp2_funnel"][0], 4),
        "pp2_per_stage_s": round(medians["pp2_per_stage"][0], 4),
        "pp2_time_ratio": round(medians["pp2_per_stage"][0] / medians["pp2_funnel"][0], 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
