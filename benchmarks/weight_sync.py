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

``--sglang-python .venv-sglang/bin/python`` also runs the PP=1 modes against a real SGLang 0.5.23
server on the CPU (launched here, serving a random HF Qwen3 of the same shapes; each sync in a
weight-update session, as the trainer runs it): our flattened buckets against SGLang's plain
``update_weights_from_distributed`` (one broadcast per tensor, requests of a bucket's tensors:
``server_time_ratio``) and against one request per tensor (``server_time_ratio_vs_per_tensor``).

    python benchmarks/weight_sync.py [--layers 28 --hidden 512 --bucket-mb 64 --repeats 9]
        [--sglang-python .venv-sglang/bin/python]
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


def write_hf_model(args, out: Path) -> None:
    """A random HF Qwen3 with the shapes of ``qwen3_shaped_tensors``, for the server to load."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(args.hidden // 128, 1),
        head_dim=64,
        intermediate_size=3 * args.hidden,
        vocab_size=args.vocab,
        tie_word_embeddings=False,
        architectures=["Qwen3ForCausalLM"],
    )
    Qwen3ForCausalLM(config).to(getattr(torch, args.dtype)).save_pretrained(out)


def _bench_server(args, url: str):
    """One trainer rank against the real server: each PP=1 mode syncs the whole model inside a
    weight-update session, interleaved; medians over ``--repeats`` after one warm-up."""
    from srpo_megatron.rollout.sglang_engine import SGLangEngine

    tensors = qwen3_shaped_tensors(args.layers, args.hidden, args.vocab, getattr(torch, args.dtype))
    bucket_bytes = int(args.bucket_mb * 1024**2)
    modes = {
        "bucketed": (bucket_bytes, True),
        "per_tensor_in_buckets": (bucket_bytes, False),  # SGLang's plain format
        "per_tensor": (1, False),
    }
    engine = SGLangEngine.connect(url, timeout_s=600)
    sender = BroadcastWeightSender([engine], GroupAddress("127.0.0.1", find_free_port(), "bench", "gloo"))
    sender.connect()
    times, requests = {m: [] for m in modes}, {}
    for repeat in range(args.repeats + 1):
        for mode, (size, flattened) in modes.items():
            sender.bucket_bytes = size
            start = time.perf_counter()
            engine.begin_weight_update()
            requests[mode] = sender.send(tensors, flattened=flattened).num_buckets
            engine.end_weight_update()
            if repeat:
                times[mode].append(time.perf_counter() - start)
    sender.close()
    engine.shutdown()
    return {m: (statistics.median(t), requests[m]) for m, t in times.items()}


def server_figures(args) -> dict:
    import tempfile

    from srpo_megatron.rollout.sglang_server import ServerSpec, launch_server, wait_until_healthy

    with tempfile.TemporaryDirectory() as tmp:
        write_hf_model(args, Path(tmp) / "model")
        spec = ServerSpec(
            str(Path(tmp) / "model"),
            port=find_free_port(),
            dtype=args.dtype,
            python=args.sglang_python,
            device="cpu",
        )
        server = launch_server(spec, Path(tmp))
        try:
            wait_until_healthy([server], timeout_s=900)
            [medians] = run_distributed(
                _bench_server, world_size=1, megatron=False, args=(args, server.url), timeout=1800
            )
        finally:
            server.stop()
    for mode, (seconds, requests) in medians.items():
        print(f"{'sglang ' + mode:>30}: {seconds * 1e3:9.1f} ms  ({requests} requests)")
    bucketed = medians["bucketed"][0]
    return {
        "server_bucketed_s": round(bucketed, 4),
        "server_per_tensor_in_buckets_s": round(medians["per_tensor_in_buckets"][0], 4),
        "server_per_tensor_s": round(medians["per_tensor"][0], 4),
        "server_time_ratio": round(bucketed / medians["per_tensor_in_buckets"][0], 3),
        "server_time_ratio_vs_per_tensor": round(bucketed / medians["per_tensor"][0], 3),
    }


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
    parser.add_argument("--sglang-python", help="also against a real SGLang server run by this Python")
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
    if args.sglang_python:
        result |= server_figures(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
