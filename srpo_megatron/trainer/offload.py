"""Parking a module's parameters in host memory between uses (``model.teacher_offload``).

The EMA teacher is needed twice a step (its forward on SDPO-routed rollouts, its EMA update) and
holds a full model copy on the device the rest of the time: while the actor trains and, colocated,
while the engines generate. Parked, its parameters live in pinned host buffers allocated once;
``on_device()`` brings them back for a use and parks them again after it::

    parking = HostParking(teacher)      # parks at once
    with parking.on_device():
        ... forward / EMA update ...

Each parameter keeps its identity (only ``param.data`` moves), so tied weights, optimizers and
``sharded_state_dict`` see the same objects. Buffers (rotary frequencies) stay where they are.
"""

from contextlib import contextmanager

import torch


class HostParking:
    def __init__(self, module: torch.nn.Module):
        self.params = dict(module.named_parameters())  # tied weights appear once
        self.device = next(iter(self.params.values())).device
        pin = self.device.type == "cuda"
        self.host = {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for n, p in self.params.items()}
        self.parked = False
        self.park()

    def park(self) -> None:
        if self.parked:
            return
        for name, param in self.params.items():
            self.host[name].copy_(param.data, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the copies are done before the device memory goes
        for name, param in self.params.items():
            param.data = self.host[name]
        self.parked = True

    def unpark(self) -> None:
        if not self.parked:
            return
        for name, param in self.params.items():
            # copy=True: a device copy even on CPU, so CPU tests see the same round trip as on GPU
            param.data = self.host[name].to(self.device, non_blocking=True, copy=True)
        self.parked = False

    @contextmanager
    def on_device(self):
        self.unpark()
        try:
            yield
        finally:
            self.park()
