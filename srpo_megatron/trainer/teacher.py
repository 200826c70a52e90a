"""The EMA self-teacher's update (ALGORITHM.md sec. 4), on fp32 values whatever the compute dtype:

    theta_T <- (1 - rate) * theta_T + rate * theta_S          (rate = algorithm.ema_decay)

Why fp32: bf16 keeps 8 bits of mantissa, so a step smaller than ~2^-9 |theta_T| rounds away. At
lr 5e-6 the student moves far less than that per update, and a bf16 teacher updated in place would
never leave its initial weights. So the recurrence runs on an fp32 copy of the teacher, fed from
the student's fp32 main parameters (the optimizer's), and the teacher's compute weights are cast
from it after every update.

Sharding follows Megatron's distributed optimizer: a data-parallel rank holds the fp32 values of
exactly the slice of each parameter whose main copy it owns (1/dp of the teacher in all), updates
that slice, and the full compute weights are put together over data parallel by one all-reduce per
parameter of zero-filled tensors. Each element comes from exactly one rank, so the sum is exact in
any dtype; it moves twice the bytes of an all-gather, once per training step. A MoE model's expert
parameters (Megatron marks them ``allreduce = False``) are sharded over their own data-parallel
group, the ranks that hold the same experts (``expert_data_parallel_group``).
"""

from contextlib import nullcontext

import torch
import torch.distributed as dist

from srpo_megatron.trainer.offload import HostParking


def iter_main_shards(optimizer):
    """(model param, its fp32 main shard, start, end) for every parameter slice whose main copy this
    rank's distributed optimizer owns; [start, end) indexes the flattened parameter."""
    for opt in optimizer.chained_optimizers:
        groups = (
            (opt.model_float16_groups, opt.shard_fp32_from_float16_groups),  # bf16 params
            (opt.model_fp32_groups, opt.shard_fp32_groups),  # fp32 params: the shard is the main copy
        )
        for model_groups, main_groups in groups:
            for model_group, main_group in zip(model_groups, main_groups, strict=True):
                for param, main in zip(model_group, main_group, strict=True):
                    # megatron-core 0.19's own bookkeeping of which slice this rank owns
                    owned = opt._get_model_param_range_map(param)["param"]
                    yield param, main, owned.start, owned.end


class EmaTeacher:
    """This rank's fp32 EMA values of the teacher ``module`` (its compute weights, no grad).

    ``student`` is the unwrapped student module and ``optimizer`` its Megatron distributed
    optimizer; the teacher starts equal to the student. ``offload``: park the compute weights and
    the fp32 values in host memory except while ``on_device()`` (``model.teacher_offload``).
    """

    def __init__(self, module: torch.nn.Module, student: torch.nn.Module, optimizer, *, offload: bool):
        from megatron.core import parallel_state

        self.params = dict(module.named_parameters())  # tied weights appear once
        self._names = {param: name for name, param in student.named_parameters()}
        dense = parallel_state.get_data_parallel_group(with_context_parallel=True)
        experts = parallel_state.get_expert_data_parallel_group()
        # the group over which the distributed optimizer shards each parameter's main copy
        self.groups = {
            name: dense if getattr(param, "allreduce", True) else experts
            for name, param in student.named_parameters()
        }
        self.slices: dict[str, tuple[int, int]] = {}
        self.values: dict[str, torch.Tensor] = {}  # name -> fp32 [end - start]
        for param, main, start, end in iter_main_shards(optimizer):
            name = self._names[param]
            self.slices[name] = (start, end)
            self.values[name] = main.detach().to(torch.float32, copy=True)
        assert set(self.slices) <= set(self.params), "the teacher and the student differ in parameters"
        for name, param in self.params.items():  # unsharded groups: this rank owns all of it
            assert dist.get_world_size(self.groups[name]) > 1 or self.slices.get(name) == (0, param.numel())
        tensors = self.params | {f"fp32:{name}": value for name, value in self.values.items()}
        self.parking = HostParking(tensors) if offload else None

    def on_device(self):
        """Context in which the teacher is on the device (a no-op unless offloaded)."""
        return self.parking.on_device() if self.parking else nullcontext()

    @torch.no_grad()
    def update(self, optimizer, rate: float) -> None:
        """One EMA step towards the student's current main parameters, then the compute weights."""
        main = {self._names[param]: shard for param, shard, _, _ in iter_main_shards(optimizer)}
        with self.on_device():
            for name, param in self.params.items():
                data_parallel = dist.get_world_size(self.groups[name]) > 1
                flat = param.data.view(-1)
                start, end = self.slices.get(name, (0, 0))  # (0, 0): other ranks own all of it
                if data_parallel:
                    flat[:start].zero_()
                    flat[end:].zero_()
                if name in self.values:
                    value = self.values[name]
                    value.lerp_(main[name], rate)
                    flat[start:end].copy_(value)
                if data_parallel:
                    dist.all_reduce(param.data, group=self.groups[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's fp32 values (the compute weights are saved with the model's shards)."""
        with self.on_device():
            return {name: value.detach().cpu().clone() for name, value in self.values.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.values.keys():
            raise ValueError(
                f"the checkpoint's fp32 EMA teacher holds {sorted(state)[:3]}..., this rank expects "
                f"{sorted(self.values)[:3]}... (another layout?)"
            )
        with self.on_device():
            for name, value in self.values.items():
                if state[name].shape != value.shape:
                    raise ValueError(
                        f"fp32 EMA teacher {name}: checkpoint slice {tuple(state[name].shape)}, "
                        f"this rank's {tuple(value.shape)}"
                    )
                value.copy_(state[name])
