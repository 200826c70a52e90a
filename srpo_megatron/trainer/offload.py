"""Parking tensors (a module's parameters) in host memory between uses (``model.teacher_offload``).

The EMA teacher is needed twice a step (its forward on SDPO-routed rollouts, its EMA update) and
holds a full model copy on the device the rest of the time: while the actor trains and, colocated,
while the engines generate. Parked, its parameters (and its fp32 EMA values, trainer/teacher.py)
live in pinned host buffers allocated once; ``on_device()`` brings them back for a use and parks
them again after it::

    parking = HostParking(dict(teacher.named_parameters()))      # parks at once
    with parking.on_device():
        ... forward / EMA update ...

Each tensor keeps its identity (only ``tensor.data`` moves), so tied weights, optimizers and
``sharded_state_dict`` see the same objects. Buffers (rotary frequencies) stay where they are.
"""

from contextlib import contextmanager

import torch


class HostParking:
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors  # a tensor under two names would be parked twice: name it once
        self.device = next(iter(self.tensors.values())).device
        pin = self.device.type == "cuda"
        self.host = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for n, t in self.tensors.items()}
        self.parked = False
        self.park()

    def park(self) -> None:
        if self.parked:
            return
        for name, tensor in self.tensors.items():
            self.host[name].copy_(tensor.data, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the copies are done before the device memory goes
        for name, tensor in self.tensors.items():
            tensor.data = self.host[name]
        self.parked = True

    def unpark(self) -> None:
        if not self.parked:
            return
        for name, tensor in self.tensors.items():
            # copy=True: a device copy even on CPU, so CPU tests see the same round trip as on GPU
            tensor.data = self.host[name].to(self.device, non_blocking=True, copy=True)
        self.parked = False

    @contextmanager
    def on_device(self):
        self.unpark()
        try:
            yield
        finally:
            self.park()
