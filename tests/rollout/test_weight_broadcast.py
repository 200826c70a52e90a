"""SGLang's weight-update protocol end to end on CPU/gloo: trainer-side senders broadcast buckets,
a receiver process (``BroadcastWeightReceiver`` in front of an HF Qwen3, the way an SGLang engine
rank receives) joins the group, allocates, receives and loads by HF name. Results must be bitwise.

One receiver process and one sender world per test: every spawned process costs seconds of imports."""

import multiprocessing as mp
import pickle

import pytest
import torch
import torch.distributed as dist

from srpo_megatron.rollout.weight_sync.broadcast import (
    BroadcastWeightReceiver,
    BroadcastWeightSender,
    GroupAddress,
    WeightSyncError,
)
from srpo_megatron.rollout.weight_sync.loopback import LoopbackEngineHandle, serve_requests
from srpo_megatron.runtime.distributed import find_free_port
from srpo_megatron.runtime.launch import run_distributed

TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def tiny_hf_model(seed: int, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**{**TINY, **overrides}, torch_dtype="float32")).eval()


class SnapshotReceiver(BroadcastWeightReceiver):
    """The receiver plus one test-only request: send back (pickled) what the engine holds now."""

    def __init__(self, engine):
        super().__init__(engine.update_weights)
        self.engine = engine

    def snapshot(self):
        return True, pickle.dumps({n: t.clone() for n, t in self.engine.named_weights()})


def receiver_main(requests, replies, num_clients, model_overrides):
    """An engine process: random HF Qwen3 (another seed than the trainer's) behind the protocol."""
    from srpo_megatron.rollout.hf_engine import HFEngine

    engine = HFEngine(tiny_hf_model(seed=99, **model_overrides))
    serve_requests(SnapshotReceiver(engine), requests, replies, num_clients)


def start_receiver(num_clients: int, **model_overrides):
    ctx = mp.get_context("spawn")
    requests = ctx.Queue()
    replies = [ctx.Queue() for _ in range(num_clients)]
    proc = ctx.Process(target=receiver_main, args=(requests, replies, num_clients, model_overrides))
    proc.start()
    return proc, requests, replies


def engine_snapshot(handle: LoopbackEngineHandle) -> dict[str, torch.Tensor]:
    ok, payload = handle._call("snapshot", {}).result()
    assert ok
    return pickle.loads(payload)


def mismatches(received: dict, expected: dict) -> list[str]:
    return [n for n in expected if n not in received or not torch.equal(received[n], expected[n])]


def stage_tensors(model, stage: int, num_stages: int):
    """The HF tensors PP stage ``stage`` of ``num_stages`` owns (as the exporter yields them)."""
    layers = model.config.num_hidden_layers // num_stages
    for name, tensor in model.named_parameters():
        if name.startswith("model.layers."):
            owner = int(name.split(".")[2]) // layers
        else:
            owner = 0 if "embed_tokens" in name else num_stages - 1
        if owner == stage:
            yield name, tensor.detach()


def hf_stage_senders(address, requests, replies):
    """Rank r of this world is the source of PP stage r of an HF Qwen3 and has its own group."""
    stage, stages = dist.get_rank(), dist.get_world_size()
    engine = LoopbackEngineHandle(requests, replies, client_id=stage, name="receiver")
    sender = BroadcastWeightSender([engine], address.for_stage(stage), bucket_bytes=64 * 1024, timeout_s=60)
    sender.connect()
    report = {}

    # 1. bucketed (SGLang's flattened_bucket): 64 KiB buckets, several per stage
    model = tiny_hf_model(seed=0)
    stats = sender.send(stage_tensors(model, stage, stages))
    dist.barrier()  # both stages done before looking at the engine
    expected = {n: t.detach() for n, t in model.named_parameters()}
    report["bucketed"] = (stats.num_buckets, stats.num_tensors, mismatches(engine_snapshot(engine), expected))
    dist.barrier()

    # 2. one broadcast per tensor (SGLang without load_format), new weights
    model = tiny_hf_model(seed=1)
    stats = sender.send(stage_tensors(model, stage, stages), flattened=False)
    dist.barrier()
    expected = {n: t.detach() for n, t in model.named_parameters()}
    report["per_tensor"] = (
        stats.num_buckets,
        stats.num_tensors,
        mismatches(engine_snapshot(engine), expected),
    )

    # 3. an engine that refuses a bucket: the sender names the engine and carries its message
    if stage == 0:
        with pytest.raises(
            WeightSyncError, match="receiver.*refused bucket 0.*no parameter 'model.not_a_weight'"
        ):
            sender.send([("model.not_a_weight", torch.zeros(3))])
        report["refused"] = True
    engine.shutdown()
    sender.close()
    return report


def test_each_pp_stage_broadcasts_its_own_layers_bitwise():
    proc, requests, replies = start_receiver(num_clients=2)
    address = GroupAddress("127.0.0.1", find_free_port(), "weights", backend="gloo")
    reports = run_distributed(
        hf_stage_senders, world_size=2, megatron=False, args=(address, requests, replies), timeout=150
    )
    proc.join(timeout=30)
    assert proc.exitcode == 0
    num_params = len(dict(tiny_hf_model(seed=0).named_parameters()))
    for mode in ("bucketed", "per_tensor"):
        buckets = [r[mode][0] for r in reports]
        tensors = [r[mode][1] for r in reports]
        assert sum(tensors) == num_params and min(tensors) > 0  # each stage sent its own share
        assert min(buckets) > 3  # several 64 KiB buckets per stage
        assert reports[0][mode][2] == [] and reports[1][mode][2] == []  # bitwise, every tensor
    assert reports[0]["refused"]
