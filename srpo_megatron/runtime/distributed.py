"""Process groups and devices: NCCL on GPUs, gloo on CPU, Megatron's parallel state on top.

Every entry point (trainer, converters, benchmarks, tests) calls ``init_distributed`` once. It
reads the usual torchrun variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); without them it starts a world of one, so the tools also run as plain
``python script.py``.
"""

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from srpo_megatron.errors import ServiceError, UserError
from srpo_megatron.runtime.cpu import apply_cpu_runtime


@dataclass(frozen=True)
class ParallelLayout:
    """How the world is split. ``dp`` is derived: world_size / (tp * pp).

    ``ep`` (Megatron's ``expert_model_parallel_size``) splits the experts of each MoE layer over
    ``ep`` ranks. It is carved out of data parallelism, not added to the world: the attention and
    dense layers stay replicated over all ``dp`` ranks while each group of ``ep`` data-parallel
    ranks shares one copy of the experts (``dp / ep`` copies in all), so ``ep`` must divide ``dp``.
    The experts are tensor-parallel over the same ``tp`` ranks as the rest of the layer
    (Megatron's default ``expert_tensor_parallel_size = tp``).
    """

    tp: int = 1
    pp: int = 1
    ep: int = 1

    def data_parallel_size(self, world_size: int) -> int:
        if self.tp < 1 or self.pp < 1 or self.ep < 1:
            raise ValueError(f"tp, pp and ep must be >= 1, got tp={self.tp} pp={self.pp} ep={self.ep}")
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp} = {model_parallel}"
            )
        dp = world_size // model_parallel
        if dp % self.ep:
            raise ValueError(
                f"expert parallel size {self.ep} does not divide the data parallel size {dp} "
                f"(world size {world_size} / (tp*pp = {model_parallel})): EP splits the data-parallel ranks"
            )
        return dp


def get_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_HOST_GROUP: dist.ProcessGroup | None = None  # gloo over the whole world: see host_group()


def host_group() -> dist.ProcessGroup:
    """The whole world on gloo: for ranks that wait on rank 0's engine calls. Waiting in an NCCL
    collective would keep a polling kernel on the GPU, which colocated engines share; on gloo the
    wait is on the CPU."""
    if _HOST_GROUP is None:
        raise RuntimeError("init_distributed() first")
    return _HOST_GROUP


def init_distributed(
    layout: ParallelLayout = ParallelLayout(),
    *,
    seed: int = 1234,
    timeout_minutes: int = 30,
    megatron: bool = True,
) -> None:
    """Start torch.distributed (if not started) and Megatron's parallel state for ``layout``.

    On a machine without CUDA the Megatron CPU runtime is applied first and the backend is gloo.
    ``seed`` seeds Python-side torch RNG and Megatron's model-parallel RNG tracker (same seed on
    every rank; Megatron offsets it per TP rank where weights must differ).
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        apply_cpu_runtime()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if on_gpu:
            torch.cuda.set_device(get_device())
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    global _HOST_GROUP
    if _HOST_GROUP is None:  # every rank, once, in the same order as the other groups
        _HOST_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    layout.data_parallel_size(dist.get_world_size())  # validates before Megatron asserts
    torch.manual_seed(seed)
    if not megatron:
        return

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    except ImportError:
        pass
    global _HOST_GROUP
    _HOST_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


_LAUNCHER_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip


def child_process_env() -> dict[str, str]:
    """This process's environment without the launcher's variables (torchrun, run_distributed), for a
    child that is not a rank of this world (a converter, an SGLang server with groups of its own)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in _LAUNCHER_VARIABLES and not k.startswith(("TORCHELASTIC_", "GROUP_WORLD", "ROLE_WORLD"))
    }


def from_rank_0(fn, what: str):
    """``fn()`` on global rank 0, its (picklable) result on every rank. An exception on rank 0 is
    raised on every rank, rank 0's own there and a RuntimeError quoting it elsewhere, so that no
    rank is left waiting in a collective that rank 0 never enters (the engine calls of the trainer
    run on rank 0 alone). A UserError or ServiceError stays one on the other ranks, which report
    nothing of it (errors.py). The others wait on the CPU (``host_group``)."""
    box, error = [None], None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            error, box[0] = e, ("UserError", str(e))
        except ServiceError as e:
            error, box[0] = e, ("ServiceError", str(e))
        except Exception as e:
            error, box[0] = e, ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, group=host_group())
    if error is not None:
        raise error
    status, value = box[0]
    if status == "UserError":
        raise UserError(value)
    if status == "ServiceError":
        raise ServiceError(value)
    if status == "error":
        raise RuntimeError(f"{what} failed on rank 0: {value}")
    return value
