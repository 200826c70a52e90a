"""Where a tensor would live on a GPU, checked on the CPU (``DeviceAudit``).

On a GPU rank, a tensor made without a device is on the host, as is whatever is computed from host
tensors alone, and ``.cpu()``'s result; the rank's device holds the model's parameters, tensors made
with a device (``torch.cuda.current_device()``, ``runtime.distributed.get_device()``) and those
moved with ``.to(device)`` / ``.cuda()``. On the CPU runtime both places are the CPU, so nothing
fails there that would fail on the first GPU step. The audit is a ``TorchFunctionMode`` that tags
every tensor a host one would be as it is made, and raises where a GPU would raise or wait:

- a host tensor handed to the Megatron model (``GPTModel.forward``'s arguments, and the tensors of
  the micro-batch its output hook reads);
- a host tensor handed to a collective through ``torch.distributed`` on a group that is NCCL on
  GPUs (all but ``runtime.distributed.host_group()`` and Megatron's ``*_GLOO`` groups; the object
  collectives move their own buffers);
- a torch op mixing a host tensor (not a 0-dim scalar, which CUDA kernels accept) with device ones;
- a device tensor read on the host (``.item()``, ``float()``, ``int()``, ``bool()``, ``.tolist()``)
  inside the loss function that Megatron's schedule calls.

A device argument means the host when it is a host tensor's ``.device`` (the audit hands out device
objects it knows again). Not seen: a literal ``device="cpu"`` counts as the rank's device (on the
CPU runtime that is the value ``get_device()`` returns), and tensors made outside the audit (before
it, by other threads, by unpickling) count as device tensors.
"""

import functools
import inspect
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

_FACTORIES = {
    torch.tensor,
    torch.as_tensor,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.empty_strided,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.scalar_tensor,
}
_LIKE = {
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.empty_like,
    torch.rand_like,
    torch.randn_like,
}
_DEVICE_OF = torch.Tensor.device.__get__  # compares equal, not identical, to what a mode gets
_MOVES = {torch.Tensor.to, torch.Tensor.cpu}
_HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "batch_isend_irecv",  # isend / irecv stay: P2POp checks that it was given those very functions
)


class DeviceViolation(AssertionError):
    pass


class DeviceAudit(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self._host: dict[int, weakref.ref] = {}
        self._host_devices: dict[int, torch.device] = {}  # host tensors' .device values, kept alive
        self._in_loss = False
        self._undo: list = []
        self.checked = {"model": 0, "collective": 0, "loss": 0}  # calls checked, for the test to show

    # ---- tags ---------------------------------------------------------------------------------

    def is_host(self, t) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _host_device(self, device) -> bool:
        """Whether a device argument means the host: none given (the default device, the CPU on GPU
        ranks), or a host tensor's ``.device``."""
        if device is None:
            return True
        known = self._host_devices.get(id(device))
        return known is device

    def _tag(self, t: torch.Tensor, host: bool) -> None:
        key = id(t)
        if host:
            self._host[key] = weakref.ref(t, lambda _, key=key: self._host.pop(key, None))
        else:
            self._host.pop(key, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_loss and func in _HOST_READS and not self.is_host(args[0]):
            raise DeviceViolation(f"the loss function reads a device tensor on the host ({func.__name__})")
        if func == _DEVICE_OF:  # a host tensor's .device: a device object to know again where it is used
            out = func(*args, **kwargs)
            if self.is_host(args[0]):
                out = torch.device(out)
                self._host_devices[id(out)] = out
            return out
        host = self._placement(func, args, kwargs)
        out = func(*args, **kwargs)
        if out is (args[0] if args else None) and func in _MOVES and host != self.is_host(out):
            out = out.view_as(out)  # a move to where the tensor is returns it; on a GPU it would not be
        if host is not None and not _in_place(func):  # an in-place op's tensor keeps its tag
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self._tag(t, host)
        return out

    def _placement(self, func, args, kwargs) -> bool | None:
        """True: the result is on the host; False: on the device; None: not a tensor op to follow."""
        if func in _FACTORIES:
            return self._host_device(kwargs.get("device"))
        if func in (torch.from_numpy, torch.frombuffer, torch.Tensor.cpu):
            return True
        if func in _LIKE:
            return (
                self.is_host(args[0]) if kwargs.get("device") is None else self._host_device(kwargs["device"])
            )
        if func is torch.Tensor.to:
            if kwargs.get("device") is not None:
                return self._host_device(kwargs["device"])
            for a in args[1:]:
                if isinstance(a, torch.Tensor):
                    return self.is_host(a)
                if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
                    return self._host_device(a)
            return self.is_host(args[0])  # a dtype only
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if not tensors:
            return None
        host = [t for t in tensors if self.is_host(t) and t.dim() > 0]
        device = [t for t in tensors if not self.is_host(t)]
        if host and device and func not in (torch.Tensor.__setitem__, torch.Tensor.copy_):
            raise DeviceViolation(f"{_name(func)} mixes host tensors {_shapes(host)} with device tensors")
        return all(self.is_host(t) for t in tensors)

    # ---- the checks at the model and the collectives --------------------------------------------

    def check(self, what: str, values) -> None:
        tensors = [t for t in _tensors_in(values) if self.is_host(t)]
        if tensors:
            raise DeviceViolation(f"{what} gets host tensors {_shapes(tensors)}")

    def __enter__(self):
        from megatron.core.models.gpt import GPTModel
        from megatron.core.pipeline_parallel import schedules

        def model_forward(original):
            @functools.wraps(original)
            def forward(module, *args, **kwargs):
                self.checked["model"] += 1
                self.check("the Megatron model", (args, kwargs))
                return original(module, *args, **kwargs)

            return forward

        def calc_loss(original):
            @functools.wraps(original)
            def wrapped(model, output_tensor, loss_func, *args, **kwargs):
                def audited(*a, **k):
                    self.checked["loss"] += 1
                    self._in_loss = True
                    try:
                        return loss_func(*a, **k)
                    finally:
                        self._in_loss = False

                return original(model, output_tensor, loss_func and audited, *args, **kwargs)

            return wrapped

        def collective(name, original):
            signature = inspect.signature(original)

            @functools.wraps(original)
            def wrapped(*args, **kwargs):
                bound = signature.bind(*args, **kwargs)
                group = bound.arguments.get("group")
                if group is None and name == "batch_isend_irecv":
                    group = bound.arguments["p2p_op_list"][0].group
                if not any(group is g for g in _host_groups()):
                    self.checked["collective"] += 1
                    self.check(f"torch.distributed.{name} (NCCL on GPUs)", bound.arguments)
                return original(*args, **kwargs)

            return wrapped

        self._patch(GPTModel, "forward", model_forward(GPTModel.forward))
        self._patch(schedules, "forward_step_calc_loss", calc_loss(schedules.forward_step_calc_loss))
        for name in _COLLECTIVES:
            self._patch(dist, name, collective(name, getattr(dist, name)))
        self._patch(torch.Tensor, "cuda", _untag_result(self, torch.Tensor.cuda))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        return super().__exit__(*exc)

    def _patch(self, owner, name, replacement) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)


def _untag_result(audit: DeviceAudit, method):
    @functools.wraps(method)
    def moved(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        if out is self and audit.is_host(self):  # the CPU runtime's .cuda() returns the tensor itself
            out = out.view_as(out)
        audit._tag(out, False)
        return out

    return moved


def _host_groups() -> list:
    """The groups that are gloo on GPUs too."""
    from megatron.core import parallel_state

    from srpo_megatron.runtime.distributed import host_group

    gloo = [v for k, v in vars(parallel_state).items() if k.endswith("_GLOO") and v is not None]
    try:
        return [host_group(), *gloo]
    except RuntimeError:  # before init_distributed
        return gloo


def _tensors_in(values, depth: int = 0):
    """Tensors in nested containers, partials' keywords, dataclasses and P2P ops (a few levels)."""
    if isinstance(values, torch.Tensor):
        yield values
    elif depth > 4:
        return
    elif isinstance(values, dict):
        for v in values.values():
            yield from _tensors_in(v, depth + 1)
    elif isinstance(values, list | tuple):
        for v in values:
            yield from _tensors_in(v, depth + 1)
    elif isinstance(values, functools.partial):
        yield from _tensors_in((values.args, values.keywords), depth + 1)
    elif isinstance(values, dist.P2POp):
        yield values.tensor
    elif hasattr(values, "__dataclass_fields__"):
        yield from _tensors_in({k: getattr(values, k) for k in values.__dataclass_fields__}, depth + 1)


_IN_PLACE_DUNDERS = {
    f"__{op}__"
    for op in (
        "setitem",
        "iadd",
        "isub",
        "imul",
        "itruediv",
        "ifloordiv",
        "imod",
        "ipow",
        "iand",
        "ior",
        "ixor",
    )
}


def _in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return name in _IN_PLACE_DUNDERS or name.endswith("_") and not name.endswith("__")


def _shapes(tensors) -> str:
    return ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in tensors[:4])


def _name(func) -> str:
    return getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
