"""SGLang's weight-update protocol end to end on CPU/gloo: trainer-side senders broadcast buckets,
a receiver process (``BroadcastWeightReceiver`` in front of an HF Qwen3, the way an SGLang engine
rank receives) joins the group, allocates, receives and loads by HF name. Results must be bitwise.

One receiver process and one sender world per test: every spawned process costs seconds of imports."""

import multiprocessing as mp
import pickle
import re
import time
from concurrent.futures import Future

import pytest
import torch
import torch.distributed as dist
from loopback import LoopbackEngineHandle, serve_requests
from tiny_qwen3 import TINY_QWEN3

from srpo_megatron.rollout.sglang_engine import WeightSyncError
from srpo_megatron.rollout.weight_sync.broadcast import (
    BroadcastWeightReceiver,
    BroadcastWeightSender,
    GroupAddress,
)
from srpo_megatron.runtime.distributed import find_free_port
from srpo_megatron.runtime.launch import run_distributed

TINY = {**TINY_QWEN3, "num_hidden_layers": 4, "tie_word_embeddings": False}


def tiny_hf_model(seed: int, **overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**{**TINY, **overrides}, torch_dtype="float32")).eval()


class SnapshotReceiver(BroadcastWeightReceiver):
    """The receiver plus two test-only requests: send back (pickled) what the engine holds now;
    overwrite every weight with noise."""

    def __init__(self, engine):
        super().__init__(engine.update_weights)
        self.engine = engine

    def snapshot(self):
        return True, pickle.dumps({n: t.clone() for n, t in self.engine.named_weights()})

    def scramble(self):
        with torch.no_grad():
            for p in self.engine.params.values():
                p.normal_()
        return True, "scrambled"


def receiver_main(requests, replies, num_clients, hf_dir):
    """An engine process: a random HF Qwen3 (another seed than the trainer's; the config of
    ``hf_dir`` when given) behind the protocol."""
    from srpo_megatron.rollout.hf_engine import HFEngine

    if hf_dir is None:
        model = tiny_hf_model(seed=99)
    else:
        from transformers import AutoConfig, Qwen3ForCausalLM

        torch.manual_seed(99)
        model = Qwen3ForCausalLM(AutoConfig.from_pretrained(hf_dir)).eval()
    serve_requests(SnapshotReceiver(HFEngine(model)), requests, replies, num_clients)


def start_receiver(num_clients: int, hf_dir: str | None = None):
    ctx = mp.get_context("spawn")
    requests = ctx.Queue()
    replies = [ctx.Queue() for _ in range(num_clients)]
    proc = ctx.Process(target=receiver_main, args=(requests, replies, num_clients, hf_dir))
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


def hf_stage_senders(ports, requests, replies):
    """Rank r of this world is the source of PP stage r of an HF Qwen3 and has its own group."""
    stage, stages = dist.get_rank(), dist.get_world_size()
    engine = LoopbackEngineHandle(requests, replies, client_id=stage, name="receiver")
    address = GroupAddress("127.0.0.1", ports[stage], f"weights_pp{stage}", backend="gloo")
    sender = BroadcastWeightSender([engine], address, bucket_bytes=64 * 1024, timeout_s=60)
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
    sender.close()
    engine.shutdown()
    return report


def test_each_pp_stage_broadcasts_its_own_layers_bitwise():
    proc, requests, replies = start_receiver(num_clients=2)
    ports = [find_free_port() for _ in range(2)]
    reports = run_distributed(
        hf_stage_senders, world_size=2, megatron=False, args=(ports, requests, replies), timeout=150
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


class SilentEngine:
    """A ``WeightReceiverHandle`` whose join request answers ``answer`` at once without joining
    (``None``: never answers): an engine that cannot complete a join."""

    name, world_size = "silent engine", 1

    def __init__(self, answer):
        self.answer = answer

    def request_join(self, **kwargs) -> Future:
        future = Future()
        if self.answer is not None:
            future.set_result(self.answer)
        return future


def join_engines_that_never_join(address):
    outcomes = []
    for answer in (None, (True, "joined"), (False, "no such backend")):
        sender = BroadcastWeightSender([SilentEngine(answer)], address, timeout_s=60, join_timeout_s=3)
        start = time.monotonic()
        try:
            sender.connect()
        except WeightSyncError as e:
            outcomes.append((str(e), time.monotonic() - start))
        address = GroupAddress(address.master_address, find_free_port(), address.group_name, address.backend)
    return outcomes


def test_a_join_that_cannot_complete_fails_in_bounded_time_naming_the_engine_and_the_group():
    """The sender builds its side while the join requests are pending (gloo connects in the group's
    constructor, on both sides, as SGLang's engines build theirs inside the request: waiting for the
    answers first would wait for engines that wait for the sender). An engine that never answers,
    one that answers without joining and one that refuses each fail the join within its deadline."""
    address = GroupAddress("127.0.0.1", find_free_port(), "weights_run1", backend="gloo")
    [outcomes] = run_distributed(
        join_engines_that_never_join, world_size=1, megatron=False, args=(address,), timeout=120
    )
    (silent, t1), (answered, t2), (refused, t3) = outcomes
    where = r"init_weights_update_group\('weights_run1' at 127\.0\.0\.1:\d+\)"
    assert re.fullmatch(
        rf"engine 'silent engine' did not answer {where} within 3 s \(dead or stuck\?\)", silent
    )
    assert re.fullmatch(
        rf"{where}: 'silent engine' answered, but the group was not complete within 3 s", answered
    )
    assert re.fullmatch(rf"engine 'silent engine' refused {where}: no such backend", refused)
    assert max(t1, t2) < 10 and t3 < 1


# -- Megatron senders (the exporter of models/qwen3) ---------------------------------------------


def make_hf_checkpoint(hf_dir):
    """A tiny random fp32 Qwen3 (untied: lm_head travels too) saved as safetensors."""
    model = tiny_hf_model(seed=5, vocab_size=1100, architectures=["Qwen3ForCausalLM"])
    with torch.no_grad():  # norms away from 1 and larger weights: a wrong mapping cannot hide
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(hf_dir)


def megatron_logp(model, tokens, vocab_size, temperature):
    """log softmax(logits / temperature) at the next token, TP=1 or 2, PP=1: [B, S-1]."""
    from megatron.core import parallel_state as ps

    batch, seq = tokens.shape
    with torch.no_grad():
        logits = model(tokens, torch.arange(seq).expand(batch, seq), attention_mask=None)  # [B, S, Vp/tp]
    shards = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    logits = torch.cat(shards, -1)[:, :-1, :vocab_size].float()  # [B, S-1, V]: the padding cut off
    logp = (logits / temperature).log_softmax(-1)
    return logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def megatron_senders(hf_dir, ports, requests, replies):
    """Trainer world of 2: (A) TP=2 -> receiver, then the HF engine's rollout log-probs vs the
    actor's; (B) PP=2, each stage broadcasting its own layers -> receiver (scrambled first)."""
    from megatron.core import parallel_state as ps

    from srpo_megatron.models.qwen3.config import load_hf_config
    from srpo_megatron.models.qwen3.exporter import export_hf_tensors
    from srpo_megatron.models.qwen3.loader import load_hf_weights
    from srpo_megatron.models.qwen3.provider import build_qwen3_model
    from srpo_megatron.rollout.engine import SamplingParams
    from srpo_megatron.rollout.hf_engine import HFEngine
    from srpo_megatron.rollout.weight_sync.broadcast import megatron_sync_role, send_or_drain
    from srpo_megatron.rollout.weight_sync.in_process import InProcessWeightSync
    from srpo_megatron.runtime.distributed import ParallelLayout, init_distributed

    config = load_hf_config(hf_dir)
    rank, report = dist.get_rank(), {}

    def stage_model():
        model = build_qwen3_model(config, params_dtype=torch.float32, init_weights=False).eval()
        load_hf_weights(model, hf_dir)
        return model

    def sync(model, address, client_id):
        exports, sends, _ = megatron_sync_role()
        handle, sender = None, None
        if sends:
            handle = LoopbackEngineHandle(requests, replies, client_id=client_id, name="receiver")
            sender = BroadcastWeightSender([handle], address, bucket_bytes=100 * 1024, timeout_s=60)
            sender.connect()
        stats = send_or_drain(export_hf_tensors(model, config), sender) if exports else None
        dist.barrier()  # every stage has sent before anyone looks at the engine
        return handle, sender, stats

    # (A) TP=2: rank 0 is the only source
    init_distributed(ParallelLayout(tp=2))
    model = stage_model()
    handle, sender, stats = sync(model, GroupAddress("127.0.0.1", ports[0], "tp2", "gloo"), client_id=0)
    if handle is not None:
        report["tp2"] = (stats.num_buckets, engine_snapshot(handle))
        handle._call("scramble", {}).result()
        sender.close()
        handle.shutdown()

    # with synced weights: the HF engine's rollout log-probs vs the actor's, same sampled tokens
    engine = HFEngine(tiny_hf_model(seed=7, vocab_size=1100)) if rank == 0 else None
    InProcessWeightSync(engine, bucket_bytes=100 * 1024).sync(model, config)
    if engine is not None:
        batch = engine.generate(
            [[5, 6, 7], [1, 2, 3, 4, 5, 9]], SamplingParams(n=2, temperature=0.8, max_new_tokens=6, seed=3)
        )
        seqs = [p + r for p, r in zip(batch.prompt_ids, batch.response_ids, strict=True)]
        payload = [(seqs, [len(p) for p in batch.prompt_ids], batch.rollout_logp)]
    else:
        payload = [None]
    dist.broadcast_object_list(payload, src=0)
    seqs, prompt_lens, rollout_logp = payload[0]
    width = max(len(s) for s in seqs)
    tokens = torch.tensor([s + [0] * (width - len(s)) for s in seqs])  # right padding: causal, harmless
    train_logp = megatron_logp(model, tokens, 1100, temperature=0.8)  # [B, width-1]
    padded_rollout, mask = torch.zeros_like(train_logp), torch.zeros_like(train_logp)
    for i, (seq, plen, lp) in enumerate(zip(seqs, prompt_lens, rollout_logp, strict=True)):
        padded_rollout[i, plen - 1 : len(seq) - 1] = lp
        mask[i, plen - 1 : len(seq) - 1] = 1
    gap = (train_logp - padded_rollout).abs()[mask.bool()]  # over the sampled tokens
    report["gap"] = {"num_tokens": gap.numel(), "max_abs": gap.max().item()}

    # (B) PP=2: each stage's TP rank 0 is a source with its own group
    init_distributed(ParallelLayout(pp=2))
    model = stage_model()
    stage = ps.get_pipeline_model_parallel_rank()
    handle, sender, stats = sync(
        model, GroupAddress("127.0.0.1", ports[1 + stage], f"pp2_pp{stage}", "gloo"), client_id=1 + stage
    )
    report["pp2_tensors"] = stats.num_tensors
    if rank == 0:
        report["pp2"] = engine_snapshot(handle)
    dist.barrier()
    sender.close()
    handle.shutdown()
    return report


def test_megatron_tp2_and_pp2_sync_bitwise_and_rollout_logp_matches_the_actor(tmp_path):
    from safetensors.torch import load_file

    hf_dir = str(tmp_path / "hf")
    make_hf_checkpoint(hf_dir)
    checkpoint = load_file(f"{hf_dir}/model.safetensors")
    proc, requests, replies = start_receiver(num_clients=3, hf_dir=hf_dir)
    ports = [find_free_port() for _ in range(3)]
    report0, report1 = run_distributed(
        megatron_senders, world_size=2, args=(hf_dir, ports, requests, replies), timeout=200
    )
    proc.join(timeout=30)
    assert proc.exitcode == 0

    # TP=2 -> receiver, then PP=2 -> receiver (scrambled in between): the checkpoint, bitwise
    num_buckets, after_tp2 = report0["tp2"]
    assert num_buckets > 3 and after_tp2.keys() == checkpoint.keys()
    assert mismatches(after_tp2, checkpoint) == []
    assert report0["pp2_tensors"] > 0 and report1["pp2_tensors"] > 0  # each stage sent its share
    assert report0["pp2_tensors"] + report1["pp2_tensors"] == len(checkpoint)
    assert mismatches(report0["pp2"], checkpoint) == []

    # synced weights: rollout log-probs == the actor's on the sampled tokens, within 1e-4 (fp32)
    for gap in (report0["gap"], report1["gap"]):
        assert gap["num_tokens"] >= 4 * 1 and gap["max_abs"] <= 1e-4, gap
