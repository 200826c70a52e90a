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
