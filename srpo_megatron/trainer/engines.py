"""The rollout engine(s) from the trainer's side: starting them on global rank 0, and the weight
sync after every step (Megatron shards -> HF-named buckets -> the engines).

    HF engine:             rank 0's export stream (later pipeline stages send theirs to rank 0),
                           loaded in process;
    SGLang disaggregated:  the same stream broadcast by rank 0 in the engines' weight-update group;
    SGLang colocated:      every rank's own full copy, as CUDA IPC handles gathered on rank 0 and
                           handed to the engine rank on the same GPU (``_sync_colocated``).
"""

import os
import secrets

import torch
import torch.distributed as dist

from srpo_megatron.config import Config
from srpo_megatron.runtime.distributed import find_free_port, from_rank_0, get_device, host_group
from srpo_megatron.trainer.actor import MegatronActor


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
            gpus = ", ".join(_gpu_range(s.spec.base_gpu_id, r.engine_tp) for s in servers)
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
            # a name of this run's own: an engine refuses a group name it holds already, and a
            # run that died without leaving its group (SIGKILL) leaves it there
            address = GroupAddress(host, find_free_port(), f"srpo_weights_{secrets.token_hex(4)}", backend)
        fleet = SGLangFleet(
            engines,
            colocated=colocated,
            bucket_bytes=r.bucket_mb * 2**20,
            sync_address=address,
            servers=servers,
            timeout_s=r.call_timeout_s,
            deterministic=r.deterministic,
        )
        fleet.connect()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return fleet


def _gpu_range(first: int, count: int) -> str:
    return f"GPU {first}" if count == 1 else f"GPUs {first}-{first + count - 1}"


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
            deterministic=r.deterministic,
            dtype=cfg.model.dtype,
            extra_args=tuple(r.server_args),
            module=r.server_module,
        )
        for i in range(r.num_engines)
    ]


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
    those of its GPUs. A rank frees its copy once rank 0 says every engine has loaded it (an
    engine's failure is raised on every rank); torch's IPC reference counting keeps the memory
    from reuse until the engine's copies are done. Engine memory: every rank has emptied its
    allocator cache before the weights come back, and the KV cache returns after the new weights.
    The loads run in one SGLang weight-update session."""
    from srpo_megatron.models.qwen3.exporter import export_hf_tensors
    from srpo_megatron.rollout.sglang_engine import serialize_tensors
    from srpo_megatron.rollout.weight_sync.buckets import flatten_bucket, iter_buckets, unflatten_bucket

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    else:  # CPU engines: shared-memory files (fd passing needs a multiprocessing authkey we don't share)
        torch.multiprocessing.set_sharing_strategy("file_system")
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier(group=host_group())  # every rank is done training and has emptied its cache
    # rank 0's engine calls each end in a broadcast of how they went: a failure there stops every rank
    from_rank_0(
        lambda: (fleet.resume_weights(), fleet.begin_weight_update()), "resuming the engines' weights"
    )
    num_bytes, loaded = 0, False
    try:
        for bucket in iter_buckets(
            export_hf_tensors(actor.student, hf_config, every_tp_rank=True), bucket_bytes
        ):
            # a fresh copy, one buffer per bucket: one IPC handle per bucket, and never a handle
            # on the parameters themselves (replicated ones are exported as they are; torch's IPC
            # bookkeeping on a storage lives as long as the storage)
            flat, meta = flatten_bucket(bucket)
            payloads = [None] * world if rank == 0 else None
            dist.gather_object(
                serialize_tensors(unflatten_bucket(flat, meta)), payloads, dst=0, group=host_group()
            )
            from_rank_0(lambda: fleet.load_serialized(payloads), "colocated weight load")  # noqa: B023
            num_bytes += meta.nbytes
            del bucket, flat
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
