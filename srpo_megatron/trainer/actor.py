"""The Megatron actor: the student (DDP + Megatron optimizer + LR schedule) and the EMA teacher,
sharded alike, and the three passes of a step through Megatron's ``forward_backward_func``:

    forward(...)      forward only, no grad: old log-probs (+ the student's top-K ids), or the
                      teacher's log-probs at those ids + its full-vocab entropy;
    train(...)        forward + backward with the SRPO objective, then one optimizer step;
    update_teacher()  theta_T <- (1 - rate) * theta_T + rate * theta_S, on fp32 values
                      (trainer/teacher.py).

Precision is the same on every device: parameters in ``model.dtype`` (bf16 on GPUs), fp32 main
parameters and gradients (reduced in fp32) in Megatron's distributed optimizer, on CPU too.

The output layer never materialises [T, V/tp] logits: GPTModel's ``output_processor`` hook hands us
the final hidden states, we keep only the positions that predict response tokens and feed them,
with this rank's output-weight shard, to the fused vocab-parallel op.

Memory settings are Megatron's own (``model.sequence_parallel``, ``model.recompute_*`` become
``TransformerConfig`` fields); ``trainer/memory_plan.py`` estimates what each costs.

Loss normalisation uses Megatron's per-token-loss path (``calculate_per_token_loss``): the loss
function returns the micro-batch's loss NUMERATOR and its local token count, and Megatron divides
the gradients by the count summed over micro-batches and data-parallel ranks — exactly the global
denominator of ALGORITHM.md sec. 6, whatever the micro-batching and DP size.
"""

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from srpo_megatron.algorithms import AlgorithmConfig, LossBatch, compute_srpo_loss, count_denominator_tokens
from srpo_megatron.algorithms.stats import Mean, Metric
from srpo_megatron.config import Config, ModelConfig
from srpo_megatron.errors import UserError
from srpo_megatron.models.qwen3.checkpoint import write_meta
from srpo_megatron.models.qwen3.config import Qwen3Arch
from srpo_megatron.models.qwen3.loader import load_hf_weights
from srpo_megatron.models.qwen3.provider import build_qwen3_model
from srpo_megatron.ops.token_stats import TokenStats, vocab_parallel_token_stats
from srpo_megatron.runtime.distributed import get_device
from srpo_megatron.trainer.expert_routes import RoutePass, RouteReplay
from srpo_megatron.trainer.step_batch import MicroBatch, Sequences
from srpo_megatron.trainer.teacher import EmaTeacher

# The EMA teacher's keys in the actor's sharded checkpoint (the student's have no prefix).
_TEACHER_PREFIX = "teacher."


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def megatron_memory_settings(model: ModelConfig) -> dict:
    """``TransformerConfig`` fields of ``model.sequence_parallel`` and ``model.recompute_*``
    (validated in config.py). Megatron recomputes only in training passes, never in ``score``."""
    selective = model.recompute_granularity == "selective"
    return dict(
        sequence_parallel=model.sequence_parallel,
        recompute_granularity=None if model.recompute_granularity == "none" else model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        recompute_modules=list(model.recompute_modules) if selective else None,
    )


def moe_settings(model: ModelConfig) -> dict:
    """``TransformerConfig`` fields of the MoE router's losses (``model.moe_*``; 0: off)."""
    return dict(
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff else "none",
        moe_z_loss_coeff=model.moe_z_loss_coeff or None,
    )


class MegatronActor:
    def __init__(self, cfg: Config, hf_config: dict, *, optimizer_steps: int) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.cfg = cfg
        dtype = _dtype(cfg.model.dtype)
        arch = Qwen3Arch.from_hf(hf_config)
        build = partial(
            build_qwen3_model,
            hf_config,
            params_dtype=dtype,
            transformer_impl=cfg.model.transformer_impl,
            make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
            init_weights=False,
            calculate_per_token_loss=True,
            bf16=dtype == torch.bfloat16,
            **megatron_memory_settings(cfg.model),
            **(moe_settings(cfg.model) if arch.is_moe else {}),
        )
        student = build()
        load_hf_weights(student, cfg.model.hf_dir, hf_config)
        # a MoE student's routers take replayed routes (trainer/expert_routes.py); the teacher's route live
        self.routes = None
        self.route_shape = (len(arch.moe_layers), arch.num_experts_per_tok) if arch.is_moe else None
        if arch.is_moe:
            self.routes = RouteReplay.install(
                student, arch.moe_layers, sequence_parallel=cfg.model.sequence_parallel
            )
        self.teacher = build()
        self.teacher.load_state_dict(student.state_dict())
        self.teacher.requires_grad_(False)
        self.true_vocab_size = student.hf_vocab_size

        self.model = DistributedDataParallel(
            student.config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False
            ),
            student,
        )
        student.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=cfg.optim.lr,
                min_lr=cfg.optim.min_lr,
                weight_decay=cfg.optim.weight_decay,
                adam_beta1=cfg.optim.adam_beta1,
                adam_beta2=cfg.optim.adam_beta2,
                adam_eps=cfg.optim.adam_eps,
                clip_grad=cfg.optim.clip_grad,
                bf16=dtype == torch.bfloat16,
                params_dtype=dtype,
                use_distributed_optimizer=True,
            ),
            [self.model],
        )
        _create_adam_state(self.optimizer)
        self.ema = EmaTeacher(self.teacher, student, self.optimizer, offload=cfg.model.teacher_offload)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=cfg.optim.lr,
            min_lr=cfg.optim.min_lr,
            lr_warmup_steps=cfg.optim.warmup_steps,
            lr_decay_steps=max(optimizer_steps, cfg.optim.warmup_steps + 1),
            lr_decay_style="constant",
            start_wd=cfg.optim.weight_decay,
            end_wd=cfg.optim.weight_decay,
            wd_incr_steps=max(optimizer_steps, 1),
            wd_incr_style="constant",
        )

    # ---- checkpoints (trainer/checkpoint.py) ----------------------------------------------------

    def sharded_state_dict(self, *, is_loading: bool = False) -> dict:
        """The actor's state in one ``dist_checkpointing`` save or load (collective): the student,
        the EMA teacher's compute weights (keys under ``teacher.``), the distributed optimizer (in
        its ``dp_reshardable`` format) and the LR schedule (common state, equal on every rank).
        Save and load it while ``teacher_on_device()``: it holds the teacher's tensors."""
        student = self.student.sharded_state_dict()
        return {
            "model": student,
            "teacher": self.teacher.sharded_state_dict(prefix=_TEACHER_PREFIX),
            "optimizer": self.optimizer.sharded_state_dict(
                student, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"}
            ),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_sharded_state_dict(self, state: dict) -> None:
        """``sharded_state_dict(is_loading=True)`` as ``dist_checkpointing.load`` returned it, into
        the actor (while ``teacher_on_device()``)."""
        _load_module(self.student, state["model"], "")
        _load_module(self.teacher, state["teacher"], _TEACHER_PREFIX)
        with torch.no_grad():  # fp32 main parameters are views of the (grad-requiring) parameters
            self.optimizer.load_state_dict(state["optimizer"])
        # megatron-core 0.19.2 without apex / TE (DistributedOptimizer.load_state_dict, dp_reshardable)
        # restores torch Adam's per-parameter "step" as 0 (the bias correction of a fresh start), after
        # first handing every parameter one shared tensor that foreach Adam would bump once per
        # parameter. The group's "step" holds the saved count: give each parameter its own copy.
        for opt in self.optimizer.chained_optimizers:
            adam = opt.optimizer
            if not isinstance(adam, torch.optim.Adam):  # TE's / apex's FusedAdam: a step per group
                continue
            for group in adam.param_groups:
                for param in group["params"]:
                    adam.state[param]["step"] = torch.tensor(float(group["step"]))
        self.scheduler.load_state_dict(state["scheduler"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's state outside the sharded save: its slices of the EMA teacher's fp32 values
        (trainer/teacher.py; sharded like the distributed optimizer's state)."""
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.load_state_dict(state)

    def write_model_meta(self, ckpt_dir: Path, hf_config: dict, *, source: str) -> None:
        """``<ckpt_dir>/srpo_meta.json``: what ``mcore_to_hf`` needs to read the student in the
        checkpoint's ``model/`` (models/qwen3/checkpoint.py). One rank."""
        write_meta(
            ckpt_dir,
            hf_config=hf_config,
            tp=self.cfg.model.tp,
            pp=self.cfg.model.pp,
            ep=self.cfg.model.ep,
            make_vocab_size_divisible_by=self.cfg.model.make_vocab_size_divisible_by,
            padded_vocab_size=self.student.vocab_size,
            params_dtype=self.student.config.params_dtype,
            source=source,
        )

    @property
    def student(self) -> torch.nn.Module:
        return self.model.module

    def teacher_on_device(self):
        """Context in which the teacher (and its fp32 EMA values) are on the device (a no-op unless offloaded)."""
        return self.ema.on_device()

    # ---- the passes ---------------------------------------------------------------------------

    def micro_batches(self, seqs: Sequences, first: int = 0, last: int | None = None) -> list[MicroBatch]:
        """Sequences [first, last) of ``seqs`` as the micro-batches of one pass (``train.micro_batch_tokens``
        each; a multiple of TP long under sequence parallelism).

        Under expert parallelism the data-parallel ranks run every forward step together (the token
        dispatcher's collectives), so they agree first (one collective of two numbers) on the
        longest sequence and the number of sequences: the same number of micro-batches of one
        shape everywhere, filler ones where a rank has fewer sequences (the teacher's pass). A pass
        no rank has sequences for has no micro-batch.
        """
        from megatron.core import parallel_state

        last = seqs.num_sequences if last is None else last
        longest, count = max(seqs.lengths[first:last], default=0), last - first
        if self.cfg.model.ep > 1:
            plan = torch.tensor([longest, count], device=get_device())
            torch.distributed.all_reduce(
                plan, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_data_parallel_group()
            )
            longest, count = plan.tolist()
        if count == 0:
            return []
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return seqs.micro_batches(
            first,
            last,
            token_budget=self.cfg.train.micro_batch_tokens,
            multiple=tp if self.cfg.model.sequence_parallel else 1,
            longest=longest,
            count=count,
        )

    def _run(
        self,
        model,
        micro_batches: list[MicroBatch],
        stats_args: Callable[[int], dict],
        loss_func: Callable,
        *,
        forward_only: bool,
        routes: RoutePass | None = None,
        record_into: torch.Tensor | None = None,
    ) -> None:
        """One call of Megatron's schedule over ``micro_batches`` (on the rank's device).

        ``stats_args(i)``: extra arguments of the token-stats op for micro-batch i (top-k, ids to
        gather at, entropy); ``loss_func(i, stats)``: Megatron's loss function for it. ``routes``:
        what a MoE student does with its micro-batches' routes (None: the teacher, or a dense
        model); ``record_into``: the pass's ``Sequences.routes``, for the live choices it records.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        items = iter(enumerate(micro_batches))
        hooks = self.routes if routes is not None else None

        def forward_step(data_iterator, model):
            index, mb = next(data_iterator)
            if hooks is not None:
                hooks.micro_batch(mb.routes)
            output = model(
                mb.tokens,
                mb.position_ids,
                None,
                output_processor=partial(self._token_stats, mb=mb, extra=stats_args(index)),
            )
            if record_into is not None:
                length = min(mb.tokens.shape[1], record_into.shape[1])
                for layer, live in hooks.recorded(mb.tokens.shape[0]).items():
                    record_into[mb.seqs, :length, layer] = live[: mb.seqs.stop - mb.seqs.start, :length]
            return output, partial(loss_func, index)

        if hooks is not None:
            hooks.begin(routes)
        try:
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=items,
                model=[model],
                num_microbatches=len(micro_batches),
                seq_length=micro_batches[0].tokens.shape[1],
                micro_batch_size=micro_batches[0].tokens.shape[0],
                forward_only=forward_only,
            )
        finally:
            if hooks is not None:
                hooks.end()

    def _token_stats(
        self, *, hidden_states, output_layer, output_weight, config, mb: MicroBatch, extra: dict, **_
    ):
        """GPTModel's output hook: hidden [S, B, H] ([S/tp, B, H] under sequence parallelism) ->
        per-token stats at the predicted positions only."""
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        weight = output_weight if output_weight is not None else output_layer.weight  # [V/tp, H]
        group = parallel_state.get_tensor_model_parallel_group()
        if config.sequence_parallel:
            # The op's hidden gradient is already summed over TP, so the gather's backward only keeps
            # this rank's slice (tensor_parallel_output_grad=False; ops/token_stats.py).
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False, group=group
            )  # [S, B, H]
        hidden = hidden_states.transpose(0, 1)[mb.rows, mb.cols]  # [n, H]
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        return vocab_parallel_token_stats(
            hidden,
            weight,
            vocab_start=tp_rank * weight.shape[0],
            true_vocab_size=self.true_vocab_size,
            targets=mb.targets,
            group=group,
            chunk_size=self.cfg.train.ops_chunk_tokens,
            **extra,
        )

    @torch.no_grad()
    def forward(
        self,
        micro_batches: list[MicroBatch],
        *,
        teacher: bool,
        topk: int = 0,
        gather_ids: list[torch.Tensor] | None = None,
        want_entropy: bool = False,
        routes: RoutePass | None = None,
        record_into: torch.Tensor | None = None,
    ) -> list[TokenStats] | None:
        """Forward-only pass of the student (``teacher=False``) or the EMA teacher.

        Returns one ``TokenStats`` ([n] per target) per micro-batch on the last pipeline stage,
        None on the other stages. ``gather_ids``: per micro-batch [n, K] ids to gather at. A MoE
        student's pass does ``routes`` with the micro-batches' routes, records into ``record_into``
        (``_run``); the teacher routes live.
        """
        from megatron.core import parallel_state

        results: list[TokenStats] = []

        def collect(index, stats):
            results.append(stats)
            return torch.zeros((), device=stats.logp.device), {}

        def stats_args(index):
            ids = None if gather_ids is None else gather_ids[index]
            return {"topk": topk, "want_entropy": want_entropy, "gather_ids": ids}

        model = self.teacher if teacher else self.model
        model.eval()
        student_routes = None if teacher or self.routes is None else routes or RoutePass()
        with self.teacher_on_device() if teacher else nullcontext():
            self._run(
                model,
                micro_batches,
                stats_args,
                collect,
                forward_only=True,
                routes=student_routes,
                record_into=record_into if student_routes is not None else None,
            )
        return results if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None

    def train(
        self,
        micro_batches: list[MicroBatch],
        inputs: list[LossBatch] | None,
        *,
        weight_stats: tuple[torch.Tensor, torch.Tensor] | None,
        replay_routes: bool = False,
    ) -> "Update":
        """Forward + backward over one mini-batch with the SRPO objective, then one optimizer step.

        inputs: each micro-batch's ``LossBatch``, token-major ([n, 1]: ``StepBatch.loss_batch``),
        without the log-probs of this pass (which the loss function fills in), on the last pipeline
        stage; None on the other stages. weight_stats: the global sum and count of the dynamic
        weights (srpo; ``objective.compute_srpo_loss``). replay_routes: a MoE student routes by the
        micro-batches' routes. The loss function reads no value on the host.
        """
        alg: AlgorithmConfig = self.cfg.algorithm
        weight_sum, weight_count = weight_stats or (None, None)
        metrics: list[dict[str, Metric]] = []

        def loss_func(index, stats: TokenStats):
            x = inputs[index]
            topk_logp = None
            if stats.gathered_logp is not None:
                topk_logp = stats.gathered_logp.view(*x.old_logp.shape, -1)  # [n, 1, K]
            batch = dataclasses.replace(x, logp=stats.logp.view_as(x.old_logp), student_topk_logp=topk_logp)
            # num_tokens=1: the numerator; Megatron divides by the global count returned next to it.
            loss, mb_metrics = compute_srpo_loss(
                alg, batch, num_tokens=1.0, weight_sum=weight_sum, weight_count=weight_count
            )
            metrics.append(mb_metrics)
            return loss, count_denominator_tokens(alg, batch.loss_mask, batch.route_sdpo).to(torch.int), {}

        def stats_args(index):
            topk_ids = None if inputs is None else inputs[index].topk_ids  # fixed by the old pass
            return {} if topk_ids is None else {"gather_ids": topk_ids.flatten(0, -2)}  # [n, K]

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        routes = None if self.routes is None else RoutePass(replay=replay_routes)
        self._run(self.model, micro_batches, stats_args, loss_func, forward_only=False, routes=routes)
        router_losses = _router_losses(len(micro_batches))
        if metrics and router_losses:  # the last pipeline stage, a MoE model with the losses on
            metrics.append(router_losses)
        # Megatron's fp32 / bf16 optimizers step whatever the gradients hold (only fp16 loss scaling
        # skips on overflow): a non-finite global gradient norm skips this update here, and is counted.
        self.optimizer.prepare_grads()
        grad_norm = self.optimizer.get_grad_norm()
        update_ok = math.isfinite(grad_norm)
        if update_ok:
            # schedule first: update k (from 1) runs at lr * k / warmup, not at 0 for the first one
            self.scheduler.step(increment=1)
            update_ok, grad_norm, _ = self.optimizer.step()
        return Update(
            ok=bool(update_ok),
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=self.optimizer.param_groups[0]["lr"],
            metrics=metrics,
        )

    def take_route_flips(self) -> Mean:
        """``moe/route_flip`` of the student's last pass that compared routes, over this rank's
        tensor- and pipeline-parallel groups (collective; expert_routes.py)."""
        from megatron.core import parallel_state

        return self.routes.take_flips(
            [
                parallel_state.get_tensor_model_parallel_group(),
                parallel_state.get_pipeline_model_parallel_group(),
            ]
        )

    def update_teacher(self, rate: float) -> None:
        """EMA: theta_T <- (1 - rate) * theta_T + rate * theta_S (ALGORITHM.md sec. 4; 0.95 stays on
        the teacher), from the optimizer's fp32 main parameters."""
        self.ema.update(self.optimizer, rate)


@dataclass(frozen=True)
class Update:
    """One optimizer update: Megatron's own host numbers, and the loss's metrics of each micro-batch
    and the MoE router's losses where they are on (device tensors; empty on all but the last
    pipeline stage)."""

    ok: bool  # False: skipped (a non-finite gradient norm)
    grad_norm: float
    lr: float
    metrics: list[dict[str, Metric]]


def _load_module(module: torch.nn.Module, state: dict, prefix: str) -> None:
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise UserError(
            f"checkpoint does not match the model: missing {missing}, unexpected {result.unexpected_keys}"
        )


def _router_losses(num_micro_batches: int) -> dict[str, Metric]:
    """The MoE router's auxiliary losses of the pass just run (``model.moe_aux_loss_coeff``,
    ``model.moe_z_loss_coeff``), as Megatron's routers recorded them, per layer summed over the
    micro-batches: ``moe/<name>``, the mean over this stage's MoE layers and the micro-batches. The
    record is cleared for the next pass (on every stage). Empty for a dense model or with both
    losses off."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    out = {}
    for name, entry in tracker.metrics.items():
        layers = (entry.values != 0).sum()  # the layers of this stage that recorded it
        out[f"moe/{name}"] = Mean(entry.values.sum(), layers * num_micro_batches)
    tracker.clear()
    return out


def _create_adam_state(optimizer) -> None:
    """Create torch Adam's state now, as its first step would (step 0, zero moments: the numbers
    are unchanged). torch creates it lazily, and megatron-core 0.19's distributed optimizer cannot
    save without it (its ``state_dict`` reads one "step" of every parameter), so a run whose
    updates were all skipped so far (non-finite gradients) would fail at its first checkpoint.
    TE's and apex's FusedAdam (GPU images) keep the step per group and need nothing."""
    for opt in optimizer.chained_optimizers:
        adam = opt.optimizer
        if not isinstance(adam, torch.optim.Adam):  # torch's AdamW is an Adam
            continue
        for group in adam.param_groups:
            assert not (group["fused"] or group["capturable"] or group["amsgrad"]), (
                "another Adam state layout"
            )
            for param in group["params"]:
                if not adam.state[param]:
                    adam.state[param] = {
                        "step": torch.tensor(0.0),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }
