"""Routing replay for a mixture-of-experts student (``algorithm.routing_replay``, "R3" in slime and
verl): when the router picks other experts in training than in the rollout, the importance ratios of
those tokens are off, so training can replay the experts the rollout used.

    none     every pass routes with the live router
    rollout  the rollout engine records each token's experts (``SamplingParams.record_routes``);
             the old-log-prob pass and the training passes replay them
    old      the old-log-prob pass records the live router's choice and the training passes replay
             it (it matters with more than one optimizer update per step)

The EMA teacher always routes live: it reads the student's tokens under another prompt, for which
nothing was recorded. Its routers have no hook.

Routes: for each sequence position and MoE layer (in ``Qwen3Arch.moe_layers`` order) the ``k``
experts chosen, int16 ``[..., layers, k]``; -1 where nothing was recorded (the response's last
token, which no engine feeds back, and padding). A replayed router gets experts 0..k-1 there: those
positions come after every target of their sequence (right padding, causal attention), so they
change no output. Where rollout routes exist, the old-log-prob pass also counts the router decisions
(a token's set of experts at one layer) its live router makes differently: ``moe/route_flip``.

The hook is Megatron's: ``TopKRouter`` asks ``router.router_replay.get_replay_topk(...)`` for its
top-k (megatron-core 0.19 ``moe_utils.topk_routing_with_score_function``), given the router's scores
and its own top-k function. Megatron's ``RouterReplay`` (``moe_enable_routing_replay``) is not used
for it: its instances are one process-wide list that the teacher's routers (same config) would join,
under activation recomputation it leaves the switch to ``REPLAY_BACKWARD`` to the caller, and it
counts nothing. Here a router call made while autograd runs a backward pass is a recomputation and
replays the forward's routes in order (a FIFO per layer: the schedules run backward passes in the
order of their forward passes).

A router sees a micro-batch ``[B, L]`` sequence-first, ``[L * B]`` tokens, and under sequence
parallelism only this tensor-parallel rank's ``L / tp`` of them; each pipeline stage has the
routers of its own layers.
"""

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from srpo_megatron.algorithms.stats import Mean
from srpo_megatron.runtime.distributed import get_device


@dataclass(frozen=True)
class RoutePass:
    """What a pass of the student does with the routes of its micro-batches."""

    replay: bool = False  # route by them
    compare: bool = False  # count the live router's other choices (``RouteReplay.take_flips``)
    record: bool = False  # keep the live router's choices (``RouteReplay.recorded``)


class _LayerHook:
    """One router's ``router_replay``: the routes of the micro-batch in flight in router order
    ([T, k] int64, -1 rows unrecorded), and what the pass does with them."""

    def __init__(self, layer: int):
        self.layer = layer  # index in the routes' layer dimension
        self.target: torch.Tensor | None = None
        self.replay = self.compare = self.record = False
        self.recorded: torch.Tensor | None = None  # record: the live choice [T, k]
        self.recompute: deque[torch.Tensor] = deque()
        self.flips = self.decisions = None  # compare: device sums over the pass

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.replay and torch._C._current_graph_task_id() != -1:
            # activation recomputation in the backward pass: the forward's routes, in order
            target = self.recompute.popleft()
            return scores.gather(1, target), target
        replaying = self.replay and self.target is not None
        probs = live = None
        if not replaying or self.compare or self.record:
            probs, live = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if self.record:
            self.recorded = live
        if self.compare and self.target is not None:
            recorded = self.target[:, 0] >= 0
            differ = (live.sort(-1).values != self.target.sort(-1).values).any(-1) & recorded
            self.flips += differ.sum()
            self.decisions += recorded.sum()
        if not replaying:
            return probs, live
        filler = torch.arange(self.target.shape[1], device=self.target.device)
        target = torch.where(self.target >= 0, self.target, filler)
        self.recompute.append(target)
        return scores.gather(1, target), target


class RouteReplay:
    """The hooks on a student's routers (``install``), and per pass: which micro-batch's routes the
    routers see (``micro_batch``), and the live choices recorded (``recorded``)."""

    def __init__(self, hooks: list[_LayerHook], *, tp_group, sequence_parallel: bool):
        self.hooks = hooks
        self.tp_group = tp_group
        self.sequence_parallel = sequence_parallel

    @classmethod
    def install(cls, model: torch.nn.Module, moe_layers: tuple[int, ...], *, sequence_parallel: bool):
        """Hooks on every ``TopKRouter`` of ``model`` (this pipeline stage's MoE layers)."""
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.router import TopKRouter

        hooks = []
        for module in model.modules():
            if isinstance(module, TopKRouter):
                hook = _LayerHook(moe_layers.index(module.layer_number - 1))  # 1-based, global
                module.router_replay = hook
                hooks.append(hook)
        group = parallel_state.get_tensor_model_parallel_group()
        return cls(hooks, tp_group=group, sequence_parallel=sequence_parallel)

    def begin(self, routes: RoutePass) -> None:
        """A pass, whose micro-batches' routes come next (``micro_batch``)."""
        for hook in self.hooks:
            hook.replay, hook.compare, hook.record = routes.replay, routes.compare, routes.record
            hook.target = hook.recorded = None
            hook.flips = torch.zeros((), dtype=torch.long, device=get_device())
            hook.decisions = torch.zeros((), dtype=torch.long, device=get_device())
            hook.recompute.clear()

    def end(self) -> None:
        """Back to routing live (the counts stay for ``take_flips``)."""
        for hook in self.hooks:
            hook.replay = hook.compare = hook.record = False
            hook.target = hook.recorded = None
            hook.recompute.clear()

    def micro_batch(self, routes: torch.Tensor | None) -> None:
        """The routes of the micro-batch about to run, [B, L, layers, k] (None: route live)."""
        for hook in self.hooks:
            hook.target = None if routes is None else self._router_order(routes[:, :, hook.layer])

    def recorded(self, batch_size: int) -> dict[int, torch.Tensor]:
        """The live choices of the micro-batch just run: {layer: [B, L, k] int16}, this stage's layers."""
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        out = {}
        for hook in self.hooks:
            live = hook.recorded.view(-1, batch_size, hook.recorded.shape[1])  # [L(/tp), B, k]
            if self._shards() > 1:
                live = gather_from_sequence_parallel_region(live, group=self.tp_group)
            out[hook.layer] = live.transpose(0, 1).to(torch.int16)
        return out

    def take_flips(self, groups) -> Mean:
        """Of the recorded router decisions of the pass just run (a token's experts at one layer),
        the ones the live router made differently: this stage's layers, summed over ``groups`` (the
        tensor- and pipeline-parallel ones: other tokens, other layers); a ``Mean`` of this
        data-parallel rank."""
        both = torch.zeros(2, dtype=torch.float64, device=get_device())
        for hook in self.hooks:
            both += torch.stack([hook.flips, hook.decisions]).double()
        for group in groups:
            dist.all_reduce(both, group=group)
        return Mean(both[0], both[1])

    def _shards(self) -> int:
        return dist.get_world_size(self.tp_group) if self.sequence_parallel else 1

    def _router_order(self, routes: torch.Tensor) -> torch.Tensor:
        """[B, L, k] -> [L * B, k] sequence-first (this rank's L / tp under sequence parallelism), int64."""
        seq_first = routes.transpose(0, 1)
        if self._shards() > 1:
            seq_first = seq_first.chunk(self._shards())[dist.get_rank(self.tp_group)]
        return seq_first.reshape(-1, routes.shape[-1]).long()
