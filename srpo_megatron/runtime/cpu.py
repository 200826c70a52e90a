"""Megatron-core on a machine without CUDA.

Megatron-core assumes CUDA throughout: it allocates with ``device=torch.cuda.current_device()``,
calls ``.cuda()`` on modules and tensors, saves and restores CUDA RNG states in its RNG tracker,
asks for the current CUDA stream during gradient sync, and grad clipping asserts that every
gradient is a ``torch.cuda.FloatTensor``. None of that math needs a GPU, so for development and
CI we redirect those calls to the CPU (measured on megatron-core 0.16.1 and 0.19.2; see
DESIGN.md "Megatron-core on CPU"):

- ``torch.cuda.current_device()`` returns ``"cpu"``; ``Tensor.cuda`` / ``Module.cuda`` are no-ops;
- ``torch.cuda.{synchronize, set_device, manual_seed[_all], get_rng_state, set_rng_state}`` and
  Megatron's RNG-tracker helpers act on the CPU generator;
- a global ``TorchFunctionMode`` rewrites ``device="cuda[:N]"`` arguments to ``"cpu"``;
- Megatron's causal-mask helper, which allocates on ``device="cuda"``, builds the mask on the CPU:
  the mode above does not reach the backward pass (torch takes a mode off its stack while the
  mode handles a call, here ``torch.autograd.backward``), where activation recompute
  (``tensor_parallel.checkpoint``) runs the attention's forward again;
- ``torch.cuda.{current_stream, default_stream, Stream, Event, stream}`` become stand-ins whose
  waits and records do nothing (CPU kernels run synchronously);
- ``Tensor.type()`` (no argument) reports CUDA type names, which is what Megatron asserts on;
- the MoE "alltoall" token dispatcher's device-to-host copy of its split sizes also converts CPU
  tensors to numpy (``_cpu_move_tensor_to_cpu`` says why).

``apply_cpu_runtime()`` is idempotent and does nothing when CUDA is available, so every entry
point may call it unconditionally.
"""

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` / ``torch.device("cuda", n)`` arguments of torch calls to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if args and any(_is_cuda(a) for a in args):
            # e.g. tensor.to("cuda"), tensor.to(torch.device("cuda", 0), non_blocking=True)
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: CPU work is synchronous, so waiting is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cuda_tensor_type(original):
    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            # Megatron asserts e.g. grad.type() == 'torch.cuda.FloatTensor'. (Under a torch function
            # mode the original may already have come back through this wrapper.)
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                name = name.replace("torch.", "torch.cuda.", 1)
            return name
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _cpu_rng_state(device=None, *args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=None, *args, **kwargs):
    torch.set_rng_state(new_state)


def _patch_megatron_rng() -> None:
    """Megatron's RNG tracker forks the CUDA generator; on CPU it forks the CPU generator."""
    try:
        from megatron.core.tensor_parallel import random as mcore_random
    except ImportError:  # megatron-core is optional for the pure-torch parts of the package
        return
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """``megatron.core.transformer.utils.get_default_causal_mask`` on the CPU: True above the diagonal."""
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def _patch_megatron_causal_mask() -> None:
    try:
        from megatron.core.fusions import fused_softmax
        from megatron.core.transformer import utils as mcore_utils
    except ImportError:
        return
    mcore_utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask  # imported there by name


def _cpu_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """``megatron.core.transformer.moe.moe_utils.maybe_move_tensor_to_cpu`` for tensors already on
    the CPU.

    The alltoall dispatcher computes its per-rank split sizes (``input_splits``, ``output_splits``)
    as tensors and hands them to ``torch.distributed.all_to_all_single``, whose C++ binding takes a
    sequence of ints, not a tensor. On a GPU the sizes become numpy arrays on the way: Megatron's
    helper copies them to the host with ``as_numpy=True``, but only ``if tensor.is_cuda``. On the
    CPU they are not CUDA tensors: left as they are, they reach the binding as tensors, which
    raises "TypeError: all_to_all_single(): incompatible function arguments" (DESIGN.md, "MoE on
    CPU"). Here a CPU tensor asked for as numpy becomes numpy, as on the GPU path; nothing is
    recorded on a stream (there is none). Megatron's other uses of the helper (token counts, no
    numpy) get their CPU tensors back unchanged, as before.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


def _patch_megatron_moe_dtoh() -> None:
    try:
        from megatron.core.transformer.moe import moe_utils, token_dispatcher
    except ImportError:
        return
    moe_utils.maybe_move_tensor_to_cpu = _cpu_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = _cpu_move_tensor_to_cpu  # imported there by name


def apply_cpu_runtime() -> bool:
    """Make megatron-core run on CPU. Returns True if the shim is (now) active.

    No-op (returns False) when CUDA is available.
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    # not torch.manual_seed: that calls torch.cuda.manual_seed_all itself
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.random.get_rng_state = _cpu_rng_state
    cuda.random.set_rng_state = _set_cpu_rng_state
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.default_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _cuda_tensor_type(torch.Tensor.type)

    _patch_megatron_rng()
    _patch_megatron_causal_mask()
    _patch_megatron_moe_dtoh()
    # Entered for the life of the process, on purpose: every later torch call is covered.
    _CudaToCpuMode().__enter__()

    _APPLIED = True
    return True


def cpu_runtime_active() -> bool:
    return _APPLIED
