"""One step's rollouts and everything derived from them per rollout: rewards, the actor's old
log-probs and top-K ids, the EMA teacher's numbers, and the per-micro-batch training inputs.

Per-rollout tensors are kept in lists indexed by the rollout's position in the step (only this
data-parallel rank's share is filled, and only on the last pipeline stage, where the output layer is).
"""

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from srpo_megatron.config import Config
from srpo_megatron.data.teacher_prompt import build_teacher_input_ids
from srpo_megatron.rewards.registry import get_reward_fn
from srpo_megatron.rollout.engine import RolloutBatch, SamplingParams
from srpo_megatron.rollout.metrics import LogpGap, logp_gap
from srpo_megatron.runtime.distributed import find_free_port, from_rank_0, get_device
from srpo_megatron.trainer.actor import MegatronActor, TrainInputs
from srpo_megatron.trainer.batching import MicroBatch, build_micro_batches


@dataclass
class StepRollouts:
    batch: RolloutBatch
    pad_id: int
    token_budget: int
    rewards: torch.Tensor = field(default=None)  # [R]
    teacher_rows: int = 0  # rollouts this rank's teacher pass scored

    def __len__(self) -> int:
        return len(self.batch)

    @property
    def group_ids(self) -> torch.Tensor:  # [R]
        return torch.tensor(self.batch.prompt_index, dtype=torch.long)

    @property
    def prompt_ids(self) -> list[list[int]]:
        return self.batch.prompt_ids

    @property
    def response_ids(self) -> list[list[int]]:
        return self.batch.response_ids

    def score(self, rows, tokenizer) -> None:
        """Rewards from each prompt's verifier; a verifier never raises on the response text."""
        rewards = []
        for i, response in enumerate(self.batch.response_ids):
            row = rows[self.batch.prompt_index[i]].row
            text = tokenizer.decode(response, skip_special_tokens=True)
            rewards.append(get_reward_fn(row.data_source)(text, row.ground_truth).score)
        self.rewards = torch.tensor(rewards, dtype=torch.float32)

    # ---- actor passes ---------------------------------------------------------------------------

    def _micro_batches(self, prefixes, ids) -> list[MicroBatch]:
        return build_micro_batches(
            prefixes, [self.response_ids[i] for i in ids], pad_id=self.pad_id, token_budget=self.token_budget
        )

    def score_student(self, actor: MegatronActor, ids: list[int], topk: int) -> dict[int, dict] | None:
        """pi_old: {rollout: {"logp": [T_i], "topk_ids": [T_i, K] | None}} on the last stage."""
        mbs = self._micro_batches([self.prompt_ids[i] for i in ids], ids)
        stats = actor.score(mbs, teacher=False, topk=topk)
        if stats is None:
            return None
        out: dict[int, dict] = {}
        for mb, s in zip(mbs, stats, strict=True):
            for row, (logp, topk_ids) in _per_row(mb, s.logp, s.topk_ids):
                out[ids[row]] = {"logp": logp, "topk_ids": topk_ids}
        return out

    def score_teacher(
        self, actor: MegatronActor, ids: list[int], routing, old: dict | None, tokenizer, rows, cfg: Config
    ) -> dict[int, dict] | None:
        """The EMA teacher on [teacher prompt ; student response] for the SDPO-routed rollouts ``ids``:
        {rollout: {"topk_logp": [T_i, K] at the student's top-K ids, "entropy": [T_i], "logp": [T_i]}}."""
        if not ids:
            return {} if old is not None else None
        prefixes = []
        for i in ids:
            sibling = int(routing.sibling[i])
            teacher_ids, prompt_len = build_teacher_input_ids(
                tokenizer,
                rows[self.batch.prompt_index[i]].row.messages,
                self.response_ids[sibling],
                self.response_ids[i],
                cfg.algorithm.teacher_max_prompt_len,
            )
            prefixes.append(teacher_ids[:prompt_len])
        mbs = self._micro_batches(prefixes, ids)
        self.teacher_rows = sum(int((mb.index >= 0).sum()) for mb in mbs)
        gather = None
        if old is not None:  # last stage: the student's top-K ids of the same tokens
            gather = [torch.cat([old[ids[int(r)]]["topk_ids"] for r in mb.index if r >= 0]) for mb in mbs]
        stats = actor.score(mbs, teacher=True, gather_ids=gather, want_entropy=True)
        if stats is None:
            return None
        out: dict[int, dict] = {}
        for mb, s in zip(mbs, stats, strict=True):
            for row, (topk_logp, entropy, logp) in _per_row(mb, s.gathered_logp, s.entropy, s.logp):
                out[ids[row]] = {"topk_logp": topk_logp, "entropy": entropy, "logp": logp}
        return out

    def train_inputs(self, mb: MicroBatch, ids, routing, advantages, old, teacher) -> TrainInputs:
        """Everything the SRPO loss needs for micro-batch ``mb`` of rollouts ``ids``, in [B, T] layout."""
        rollout_of = [ids[int(r)] if r >= 0 else None for r in mb.index]
        any_old = next(iter(old.values()))
        k = 0 if any_old["topk_ids"] is None else any_old["topk_ids"].shape[-1]  # top-K size, 0: unused

        def rows(get, shape_tail=(), dtype=torch.float32):
            out = torch.zeros((*mb.response_mask.shape, *shape_tail), dtype=dtype)
            for b, i in enumerate(rollout_of):
                value = get(i) if i is not None else None
                if value is not None:
                    out[b, : value.shape[0]] = value
            return out

        def per_rollout(values, dtype):
            return torch.tensor(
                [bool(values[i]) if i is not None else False for i in rollout_of], dtype=dtype
            )

        has_teacher_rows = teacher is not None and len(teacher) > 0
        return TrainInputs(
            old_logp=rows(lambda i: old[i]["logp"]),
            rollout_logp=rows(lambda i: self.batch.rollout_logp[i]),
            advantages=torch.tensor([float(advantages[i]) if i is not None else 0.0 for i in rollout_of]),
            route_sdpo=per_rollout(routing.route_sdpo, torch.bool),
            has_teacher=per_rollout(routing.has_teacher, torch.bool),
            fallback=per_rollout(routing.fallback, torch.bool),
            topk_ids=rows(lambda i: old[i]["topk_ids"], (k,), torch.long) if k else None,
            teacher_topk_logp=rows(lambda i: teacher.get(i, {}).get("topk_logp"), (k,))
            if has_teacher_rows
            else None,
            teacher_entropy=rows(lambda i: teacher.get(i, {}).get("entropy")) if has_teacher_rows else None,
            teacher_logp=rows(lambda i: teacher.get(i, {}).get("logp")) if has_teacher_rows else None,
        )

    def metrics(self, routing, old: dict | None, teacher: dict | None) -> dict[str, float]:
        lengths = torch.tensor([len(r) for r in self.response_ids], dtype=torch.float32)
        out = {
            "reward_mean": self.rewards.mean().item(),
            "sdpo_fraction": routing.route_sdpo.float().mean().item(),
            "grpo_fraction": 1.0 - routing.route_sdpo.float().mean().item(),
            "fallback_fraction": routing.fallback.float().mean().item(),
            "response_length_mean": lengths.mean().item(),
            "stop_fraction": sum(r == "stop" for r in self.batch.finish_reasons) / len(self),
            "sdpo_rollouts": int(routing.route_sdpo.sum()),
            "teacher_rollouts": _sum_over_data_parallel(self.teacher_rows),
        }
        if teacher:
            entropy = torch.cat([t["entropy"] for t in teacher.values()])
            out["teacher_entropy_mean"] = entropy.mean().item()
        else:
            out["teacher_entropy_mean"] = 0.0
        if old is not None:  # last pipeline stage: this rank's share, reduced over data parallel
            train_logp = torch.cat([old[i]["logp"] for i in old])
            rollout_logp = torch.cat([self.batch.rollout_logp[i] for i in old])
            gap = logp_gap(train_logp, rollout_logp, torch.ones_like(train_logp))
            out |= _reduce_gap_over_data_parallel(gap).as_metrics(prefix="logp_gap")
        return out


def _sum_over_data_parallel(value: int) -> int:
    from megatron.core import parallel_state

    total = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return int(total)


def _reduce_gap_over_data_parallel(gap: LogpGap) -> LogpGap:
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    sums = torch.tensor([gap.abs_sum, float(gap.num_tokens)], dtype=torch.float64)
    peak = torch.tensor([gap.max_abs], dtype=torch.float64)
    dist.all_reduce(sums, group=group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return LogpGap(abs_sum=float(sums[0]), max_abs=float(peak[0]), num_tokens=int(sums[1]))


def _per_row(mb: MicroBatch, *flat: torch.Tensor | None):
    """Split flat [N, ...] per-token tensors into per-row pieces: yields (row index, pieces)."""
    lengths = mb.response_mask.sum(dim=1).tolist()
    offset = 0
    for r, n in zip(mb.index.tolist(), lengths, strict=True):
        if r >= 0:
            yield r, tuple(None if t is None else t[offset : offset + n].cpu() for t in flat)
        offset += n


# ---- engine ---------------------------------------------------------------------------------------


def make_engine(cfg: Config, tokenizer):
    """The rollout engine, held by global rank 0 (call it there): the HF engine in this process, or
    an ``SGLangFleet`` of SGLang servers (launched here, or reached at ``rollout.engine_urls``)."""
    if cfg.rollout.engine == "sglang":
        return _start_sglang(cfg)
    from transformers import AutoModelForCausalLM

    from srpo_megatron.rollout.hf_engine import HFEngine

    dtype = torch.float32 if cfg.model.dtype == "float32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_dir, dtype=dtype)
    return HFEngine(model, pad_token_id=tokenizer.pad_token_id or 0, max_batch_size=cfg.rollout.hf_batch_size)


def _start_sglang(cfg: Config):
    from srpo_megatron.rollout.sglang_engine import SGLangEngine
    from srpo_megatron.rollout.sglang_fleet import SGLangFleet
    from srpo_megatron.rollout.sglang_server import launch_server, wait_until_healthy
    from srpo_megatron.rollout.weight_sync.broadcast import GroupAddress

    r = cfg.rollout
    colocated = r.mode == "colocated"
    servers = []
    try:
        if r.engine_urls:
            urls = list(r.engine_urls)
            print(f"SGLang: {len(urls)} engine(s) x TP {r.engine_tp} at {', '.join(urls)} ({r.mode})")
        else:
            log_dir = cfg.output_dir / "sglang"
            servers = [launch_server(spec, log_dir) for spec in _server_specs(cfg)]
            gpus = ", ".join(
                f"GPUs {s.spec.base_gpu_id}-{s.spec.base_gpu_id + r.engine_tp - 1}" for s in servers
            )
            print(f"SGLang: starting {len(servers)} engine(s), {r.mode}, on {gpus}; logs in {log_dir}")
            wait_until_healthy(servers, r.startup_timeout_s)
            urls = [s.url for s in servers]
        engines = [SGLangEngine.connect(u, tp_size=r.engine_tp, timeout_s=r.call_timeout_s) for u in urls]
        address = None
        if not colocated:  # the engines join a weight-update group hosted here
            host = r.sync_master_addr or (
                "127.0.0.1" if servers else os.environ.get("MASTER_ADDR", "127.0.0.1")
            )
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            address = GroupAddress(host, find_free_port(), "srpo_weights", backend)
        fleet = SGLangFleet(
            engines,
            colocated=colocated,
            bucket_bytes=r.bucket_mb * 2**20,
            sync_address=address,
            servers=servers,
            timeout_s=r.call_timeout_s,
        )
        fleet.connect()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return fleet


def _server_specs(cfg: Config):
    """One launch per engine on this node: colocated on the training GPUs from GPU 0, disaggregated
    on the GPUs after them (``validate_layout`` checked that they fit the node's processes)."""
    from srpo_megatron.rollout.sglang_server import ServerSpec

    r = cfg.rollout
    first = 0 if r.mode == "colocated" else int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    needed = first + r.num_engines * r.engine_tp
    if torch.cuda.is_available() and torch.cuda.device_count() < needed:
        raise ValueError(
            f"config: rollout: {r.num_engines} {r.mode} engine(s) x TP {r.engine_tp} need GPUs {first}.."
            f"{needed - 1} on this node, which has {torch.cuda.device_count()}"
        )
    return [
        ServerSpec(
            model_path=cfg.model.hf_dir,
            tp_size=r.engine_tp,
            base_gpu_id=first + i * r.engine_tp,
            port=find_free_port(),
            mem_fraction=r.mem_fraction,
            memory_saver=r.mode == "colocated",
            dtype=cfg.model.dtype,
            extra_args=tuple(r.server_args),
            module=r.server_module,
        )
        for i in range(r.num_engines)
    ]


def generate_rollouts(engine, cfg: Config, tokenizer, rows, *, seed: int) -> StepRollouts:
    """Rank 0 samples ``n`` responses per prompt; every rank receives the same batch. Colocated
    engines then give their GPU memory back for training (before the batch goes out, so that no
    rank starts its forward passes while the engines still hold it)."""

    def generate() -> RolloutBatch:
        params = SamplingParams(
            n=cfg.rollout.n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_new_tokens=cfg.rollout.max_new_tokens,
            stop_token_ids=tuple(stop_token_ids(tokenizer)),
            seed=seed,
        )
        batch = engine.generate([row.prompt_ids for row in rows], params)
        engine.release_memory()
        return batch

    batch = from_rank_0(generate, "rollout generation")
    return StepRollouts(batch, pad_id=tokenizer.pad_token_id or 0, token_budget=cfg.train.micro_batch_tokens)


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def sync_weights(actor: MegatronActor, engine, cfg: Config, hf_config: dict) -> dict[str, float]:
    """The actor's weights (Megatron shards) -> HF-named full tensors in buckets -> the engine(s)
    held by global rank 0. Every rank calls this.

    Colocated SGLang: ``_sync_colocated``. Otherwise the exporter yields each pipeline stage's
    tensors on that stage's source rank (TP 0, DP 0); stage 0's source is rank 0 itself, every later
    stage's source sends its buckets to rank 0 point-to-point (flat bytes + the bucket's names /
    dtypes / shapes), and rank 0 passes the whole stream on: into the HF engine, or by NCCL
    broadcast to disaggregated SGLang engines (``SGLangFleet.load_weights``).
    """
    from megatron.core import parallel_state

    from srpo_megatron.models.qwen3.exporter import export_hf_tensors
    from srpo_megatron.rollout.sglang_fleet import SGLangFleet
    from srpo_megatron.rollout.weight_sync.buckets import flatten_bucket, iter_buckets
    from srpo_megatron.rollout.weight_sync.tensor import sync_weights_in_process
    from srpo_megatron.rollout.weight_sync.verify import compare_checksums, record_checksums, weight_checksums

    bucket_bytes = cfg.rollout.bucket_mb * 2**20
    if cfg.rollout.engine == "sglang" and cfg.rollout.mode == "colocated":
        return _sync_colocated(actor, engine, hf_config, bucket_bytes)
    stream = export_hf_tensors(actor.student, hf_config)  # collective over TP: every rank iterates
    rank = dist.get_rank()
    stage_sources = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())
    if rank == 0:
        stream = _with_later_stages(stream, stage_sources[1:])
        sent: dict = {}
        if cfg.rollout.verify_sync:
            stream = record_checksums(stream, sent)
        if isinstance(engine, SGLangFleet):
            stats = engine.load_weights(stream)
        else:
            stats = sync_weights_in_process(stream, [engine], bucket_bytes=bucket_bytes)
        if cfg.rollout.verify_sync:
            wrong = compare_checksums(sent, weight_checksums(engine.named_weights()))
            if wrong:
                raise RuntimeError(
                    f"weight sync verify: the engine does not hold what it was sent: {wrong[:5]}"
                )
        return {"sync/bytes": float(stats.num_bytes)}
    is_source = (
        parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    )
    if is_source and rank in stage_sources[1:]:
        for bucket in iter_buckets(stream, bucket_bytes):
            flat, meta = flatten_bucket(bucket)
            dist.send_object_list([meta], dst=0)
            dist.send(flat, dst=0)
        dist.send_object_list([None], dst=0)
    else:
        for _ in stream:  # not a source: take part in the TP gathers only
            pass
    return {}


def _sync_colocated(actor: MegatronActor, fleet, hf_config: dict, bucket_bytes: int) -> dict[str, float]:
    """Colocated SGLang (PP = 1, engines covering the training GPUs rank for rank): every rank
    exports the full tensors (each data-parallel replica runs the TP all-gathers), and per bucket
    serialises CUDA IPC handles of its own copy; rank 0 gathers the handles and hands engine ``i``
    those of its GPUs. The ranks keep their bucket alive until rank 0 says every engine has loaded
    it (an engine's failure is raised on every rank). Engine memory: every rank has emptied its
    allocator cache before the weights come back, and the KV cache returns after the new weights.
    The loads run in one SGLang weight-update session."""
    from srpo_megatron.models.qwen3.exporter import export_hf_tensors
    from srpo_megatron.rollout.sglang_engine import serialize_tensors
    from srpo_megatron.rollout.weight_sync.buckets import iter_buckets

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    else:  # CPU engines: shared-memory files (fd passing needs a multiprocessing authkey we don't share)
        torch.multiprocessing.set_sharing_strategy("file_system")
    rank, world = dist.get_rank(), dist.get_world_size()
    # rank 0's engine calls each end in a broadcast of how they went: a failure there stops every rank
    from_rank_0(
        lambda: (fleet.resume_weights(), fleet.begin_weight_update()), "resuming the engines' weights"
    )
    num_bytes, loaded = 0, False
    try:
        for bucket in iter_buckets(
            export_hf_tensors(actor.student, hf_config, every_tp_rank=True), bucket_bytes
        ):
            payloads = [None] * world if rank == 0 else None
            dist.gather_object(serialize_tensors(bucket), payloads, dst=0)
            # the bucket stays alive here until every engine has loaded it
            from_rank_0(lambda: fleet.load_serialized(payloads), "colocated weight load")  # noqa: B023
            num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            del bucket
        loaded = True
    finally:
        if rank == 0 and not loaded:
            fleet.end_weight_update(flush=False, quiet=True)
    from_rank_0(lambda: (fleet.end_weight_update(), fleet.resume_rest()), "finishing the weight update")
    return {"sync/bytes": float(num_bytes)} if rank == 0 else {}


def _with_later_stages(stream, sources: list[int]):
    """Rank 0's own tensors, then each later pipeline stage's, received bucket by bucket."""
    from srpo_megatron.rollout.weight_sync.buckets import allocate_bucket, unflatten_bucket

    yield from stream
    for src in sources:
        while True:
            box = [None]
            dist.recv_object_list(box, src=src)
            if box[0] is None:
                break
            flat = allocate_bucket(box[0], get_device())
            dist.recv(flat, src=src)
            yield from unflatten_bucket(flat, box[0])
