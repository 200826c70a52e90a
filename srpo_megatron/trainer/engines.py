"""The rollout engine(s) from the trainer's side: started by global rank 0 at the start of a run,
with the weight sync that feeds them after every step, picked here once (``rollout/weight_sync/``):

    rollout.engine=hf:                     InProcessWeightSync, the HF engine in rank 0's process;
    rollout.engine=sglang, disaggregated:  BroadcastWeightSync, each pipeline stage's source rank
                                           broadcasting its layers in a weight-update group of its own;
    rollout.engine=sglang, colocated:      CudaIpcWeightSync, every rank's own copy as CUDA IPC handles
                                           for the engine rank on its GPU.
"""

import os
import secrets
import socket
import sys

import torch
import torch.distributed as dist

from srpo_megatron.config import Config
from srpo_megatron.errors import UserError
from srpo_megatron.models.qwen3.config import Qwen3Arch, load_hf_config
from srpo_megatron.rollout.engine import RolloutEngine
from srpo_megatron.rollout.hf_engine import HFEngine
from srpo_megatron.rollout.sglang_engine import SGLangEngine
from srpo_megatron.rollout.sglang_fleet import SGLangFleet
from srpo_megatron.rollout.sglang_server import ServerSpec, launch_server, wait_until_healthy
from srpo_megatron.rollout.weight_sync import WeightSync
from srpo_megatron.rollout.weight_sync.broadcast import BroadcastWeightSync
from srpo_megatron.rollout.weight_sync.cuda_ipc import CudaIpcWeightSync
from srpo_megatron.rollout.weight_sync.in_process import InProcessWeightSync
from srpo_megatron.runtime.distributed import find_free_port, from_rank_0


def start_engine(cfg: Config, tokenizer) -> tuple[RolloutEngine | None, WeightSync]:
    """Every rank, before any rank builds the actor: global rank 0 starts the rollout engine(s)
    (launched SGLang sizes its KV cache on GPUs that are still empty, and colocated engines then
    give their memory back until the first weight sync), then every rank makes its side of the
    weight sync. A failure anywhere stops every rank. Returns (the engine on rank 0, None
    elsewhere; the weight sync)."""
    engine = None

    def start() -> dict:
        nonlocal engine
        started, urls = (
            _start_sglang(cfg) if cfg.rollout.engine == "sglang" else (_hf_engine(cfg, tokenizer), [])
        )
        try:
            started.release_memory()
        except BaseException:
            started.shutdown()
            raise
        engine = started
        # what the other ranks need to reach the engines; the group name is this run's own (an
        # engine refuses a group name it holds already, and a run that died without leaving its
        # groups, SIGKILL, leaves them there)
        return {
            "urls": urls,
            "host": socket.gethostname(),
            "group_name": f"srpo_weights_{secrets.token_hex(4)}",
        }

    meeting = from_rank_0(start, "starting the rollout engine")
    try:
        return engine, _weight_sync(cfg, engine, **meeting)
    except BaseException:
        if engine is not None:
            engine.shutdown()
        raise


def _hf_engine(cfg: Config, tokenizer) -> HFEngine:
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if cfg.model.dtype == "float32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(cfg.model.hf_dir, dtype=dtype)
    # the other local ranks wait while rank 0 generates (the HF engine has no async mode): their
    # cores are the engine's meanwhile
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = min(torch.get_num_threads() * local_ranks, len(os.sched_getaffinity(0)))
    return HFEngine(
        model,
        pad_token_id=tokenizer.pad_token_id or 0,
        max_batch_size=cfg.rollout.hf_batch_size,
        num_threads=threads,
    )


def _start_sglang(cfg: Config) -> tuple[SGLangFleet, list[str]]:
    """An ``SGLangFleet`` of SGLang servers, launched here or reached at ``rollout.engine_urls``,
    and their URLs."""
    r = cfg.rollout
    servers = []
    try:
        if r.engine_urls:
            urls = list(r.engine_urls)
            print(f"SGLang: {len(urls)} engine(s) x TP {r.engine_tp} at {', '.join(urls)} ({r.mode})")
        else:
            log_dir = cfg.output_dir / "sglang"
            servers = [launch_server(spec, log_dir) for spec in _server_specs(cfg)]
            where = (
                "the CPU"
                if servers[0].spec.device == "cpu"
                else ", ".join(_gpu_range(s.spec.base_gpu_id, r.engine_tp) for s in servers)
            )
            print(f"SGLang: starting {len(servers)} engine(s), {r.mode}, on {where}; logs in {log_dir}")
            wait_until_healthy(servers, r.startup_timeout_s)
            urls = [s.url for s in servers]
        logs = [s.log_path for s in servers] or [None] * len(urls)
        arch = Qwen3Arch.from_hf(load_hf_config(cfg.model.hf_dir))
        engines = [
            SGLangEngine.connect(
                u,
                tp_size=r.engine_tp,
                timeout_s=r.call_timeout_s,
                log_path=log,
                layers=(arch.num_layers, arch.moe_layers),
            )
            for u, log in zip(urls, logs, strict=True)
        ]
        fleet = SGLangFleet(
            engines,
            colocated=r.mode == "colocated",
            servers=servers,
            deterministic=r.deterministic,
            routed_experts=cfg.algorithm.routing_replay == "rollout",
        )
        fleet.connect()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return fleet, urls


def _weight_sync(cfg: Config, engine, *, urls: list[str], host: str, group_name: str) -> WeightSync:
    """host: global rank 0's host name."""
    r = cfg.rollout
    bucket_bytes = r.bucket_mb * 2**20
    if r.engine == "hf":
        return InProcessWeightSync(engine, bucket_bytes=bucket_bytes, verify=r.verify_sync)
    if r.mode == "colocated":
        return CudaIpcWeightSync(engine, bucket_bytes=bucket_bytes)
    if socket.gethostname() != host:  # another node: the name torch's rendezvous advertises
        address = socket.getfqdn()
    else:
        address = r.sync_master_addr or (
            "127.0.0.1" if not r.engine_urls else os.environ.get("MASTER_ADDR", "127.0.0.1")
        )
    return BroadcastWeightSync.connect(
        engine,
        urls,
        engine_tp=r.engine_tp,
        group_name=group_name,
        master_address=address,
        bucket_bytes=bucket_bytes,
        timeout_s=r.call_timeout_s,
    )


def _gpu_range(first: int, count: int) -> str:
    return f"GPU {first}" if count == 1 else f"GPUs {first}-{first + count - 1}"


def _server_specs(cfg: Config):
    """One launch per engine on this node: colocated on the training GPUs from GPU 0, disaggregated
    on the GPUs after them (``validate_layout`` checked that they fit the node's processes). Without
    CUDA, on the CPU: SGLang binds a CPU server's threads to the cores of NUMA node ``base_gpu_id``,
    so every engine gets node 0, and one rank (TP 1); colocated ones run without the memory saver
    (there is no GPU memory to give back)."""
    r = cfg.rollout
    on_gpus = torch.cuda.is_available()
    first = 0 if r.mode == "colocated" else int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    needed = first + r.num_engines * r.engine_tp
    if on_gpus and torch.cuda.device_count() < needed:
        raise ValueError(
            f"config: rollout: {r.num_engines} {r.mode} engine(s) x TP {r.engine_tp} need GPUs {first}.."
            f"{needed - 1} on this node, which has {torch.cuda.device_count()}"
        )
    if not on_gpus and r.engine_tp != 1:
        raise UserError(f"config: rollout.engine_tp={r.engine_tp}: SGLang engines on the CPU run TP 1")
    return [
        ServerSpec(
            model_path=cfg.model.hf_dir,
            tp_size=r.engine_tp,
            base_gpu_id=first + i * r.engine_tp if on_gpus else 0,
            port=find_free_port(),
            mem_fraction=r.mem_fraction,
            memory_saver=r.mode == "colocated" and on_gpus,  # torch_memory_saver needs libcuda
            deterministic=r.deterministic,
            routed_experts=cfg.algorithm.routing_replay == "rollout",
            dtype=cfg.model.dtype,
            extra_args=tuple(r.server_args),
            module=r.server_module,
            python=r.server_python or sys.executable,
            device="cuda" if on_gpus else "cpu",
        )
        for i in range(r.num_engines)
    ]
