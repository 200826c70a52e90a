"""The CPU runtime shim itself: CUDA-only calls that Megatron makes land on the CPU."""

import torch

from srpo_megatron.runtime.launch import run_distributed


def _probe_shim():
    from megatron.core.tensor_parallel import random as mcore_random

    from srpo_megatron.runtime.cpu import cpu_runtime_active

    x = torch.empty(3, device="cuda")
    y = torch.zeros(2).to(torch.device("cuda", 0)).cuda()
    grad_type = torch.zeros(2).type()
    stream = torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.Stream())
    torch.cuda.synchronize()
    # Megatron's RNG tracker state is the CPU generator's state.
    torch.cuda.manual_seed(7)
    state = mcore_random._get_cuda_rng_state()
    a = torch.rand(4)
    mcore_random._set_cuda_rng_state(state)
    b = torch.rand(4)
    return cpu_runtime_active(), x.device.type, y.device.type, grad_type, torch.equal(a, b)


def test_cuda_calls_land_on_cpu():
    (result,) = run_distributed(_probe_shim, world_size=1, megatron=False, timeout=120)
    assert result == (True, "cpu", "cpu", "torch.cuda.FloatTensor", True)


def test_not_applied_in_a_plain_process():
    # The shim is opt-in per process: importing the package changes nothing.
    import srpo_megatron.runtime  # noqa: F401

    assert torch.zeros(1).type() == "torch.FloatTensor"


def _alltoall_with_dispatcher_split_sizes():
    """What the MoE "alltoall" dispatcher does with its split sizes: to the host (numpy), then
    ``all_to_all_single`` with uneven splits. Without the shim's copy the sizes stay tensors,
    which the collective's binding refuses with a TypeError."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.mappings import all_to_all
    from megatron.core.transformer.moe import token_dispatcher

    rank = dist.get_rank()
    sends = torch.tensor([[1, 2], [3, 1]])  # [from rank, to rank]: rows sent
    input_splits = token_dispatcher.maybe_move_tensor_to_cpu(sends[rank], as_numpy=True)
    output_splits = token_dispatcher.maybe_move_tensor_to_cpu(sends[:, rank], as_numpy=True)
    tokens = torch.full((int(input_splits.sum()), 3), float(rank))  # [rows sent, H]
    received = all_to_all(dist.group.WORLD, tokens, output_splits.tolist(), input_splits.tolist())
    raw = all_to_all(dist.group.WORLD, tokens, output_splits, input_splits)  # numpy, as Megatron passes them
    return type(input_splits).__name__, received[:, 0].tolist(), torch.equal(raw, received)


def test_alltoall_split_sizes_reach_the_collective_as_numpy():
    results = run_distributed(
        _alltoall_with_dispatcher_split_sizes, world_size=2, megatron=False, timeout=120
    )
    # rank 0 gets 1 row from itself and 3 from rank 1; rank 1 gets 2 from rank 0 and 1 from itself
    assert results == [("ndarray", [0.0, 1.0, 1.0, 1.0], True), ("ndarray", [0.0, 0.0, 1.0], True)]
