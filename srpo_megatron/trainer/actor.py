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
from functools import partial

import torch

from srpo_megatron.algorithms import AlgorithmConfig, LossBatch, compute_srpo_loss, count_denominator_tokens
from srpo_megatron.config import Config, ModelConfig
from srpo_megatron.models.qwen3.loader import load_hf_weights
from srpo_megatron.models.qwen3.provider import build_qwen3_model
from srpo_megatron.ops.token_stats import TokenStats, vocab_parallel_token_stats
from srpo_megatron.trainer.batching import MicroBatch
from srpo_megatron.trainer.teacher import EmaTeacher


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
        )
        student = build()
        load_hf_weights(student, cfg.model.hf_dir, hf_config)
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

    def load_optimizer_state(self, state: dict) -> None:
        """Megatron's optimizer state from a checkpoint (``optimizer.sharded_state_dict`` loaded)."""
        with torch.no_grad():  # fp32 main parameters are views of the (grad-requiring) parameters
            self.optimizer.load_state_dict(state)
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

    @property
    def student(self) -> torch.nn.Module:
        return self.model.module

    def teacher_on_device(self):
        """Context in which the teacher (and its fp32 EMA values) are on the device (a no-op unless offloaded)."""
        return self.ema.on_device()

    # ---- the passes ---------------------------------------------------------------------------

    def _run(
        self,
        model,
        micro_batches: list[MicroBatch],
        stats_args: Callable[[int, MicroBatch], dict],
        loss_func: Callable,
        *,
        forward_only: bool,
    ) -> list:
        """One call of Megatron's schedule over ``micro_batches``.

        ``stats_args(i, mb)``: extra arguments of the token-stats op for micro-batch i (top-k, ids to
        gather at, entropy); ``loss_func(i, mb, stats)``: Megatron's loss function for it.
        """
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        items = iter(enumerate(micro_batches))
        # Sequence parallelism splits the sequence evenly over TP: a multiple of tp positions.
        tp = parallel_state.get_tensor_model_parallel_world_size()
        multiple = tp if self.cfg.model.sequence_parallel else 1
        seq_len = -(-micro_batches[0].tokens.shape[1] // multiple) * multiple

        def forward_step(data_iterator, model):
            index, mb = next(data_iterator)
            tokens, position_ids = mb.tokens, mb.position_ids  # [B, L]
            if seq_len > tokens.shape[1]:
                # Right padding: after every real token (causal attention) and never scored.
                tokens = torch.nn.functional.pad(tokens, (0, seq_len - tokens.shape[1]))
                position_ids = torch.arange(seq_len).expand_as(tokens)
            output = model(
                tokens,
                position_ids,
                None,
                output_processor=partial(self._token_stats, mb=mb, extra=stats_args(index, mb)),
            )
            return output, partial(loss_func, index, mb)

        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=items,
            model=[model],
            num_microbatches=len(micro_batches),
            seq_length=seq_len,
            micro_batch_size=micro_batches[0].tokens.shape[0],
            forward_only=forward_only,
        )

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
        hidden = hidden_states.transpose(0, 1)[mb.rows, mb.cols]  # [N, H]
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
        gather_ids: list[torch.Tensor | None] | None = None,
        want_entropy: bool = False,
    ) -> list[TokenStats] | None:
        """Forward-only pass of the student (``teacher=False``) or the EMA teacher.

        Returns one ``TokenStats`` (flat [N] layout) per micro-batch on the last pipeline stage,
        None on the other stages. ``gather_ids``: per micro-batch [N, K] ids to gather at.
        """
        from megatron.core import parallel_state

        results: list[TokenStats] = []

        def collect(index, mb, stats):
            results.append(stats)
            return torch.zeros((), device=stats.logp.device), {}

        def stats_args(index, mb):
            ids = None if gather_ids is None else gather_ids[index]
            return {"topk": topk, "want_entropy": want_entropy, "gather_ids": ids}

        model = self.teacher if teacher else self.model
        model.eval()
        with self.teacher_on_device() if teacher else nullcontext():
            self._run(model, micro_batches, stats_args, collect, forward_only=True)
        return results if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None

    def train(
        self,
        micro_batches: list[MicroBatch],
        inputs: list[LossBatch] | None,
        *,
        weight_stats: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> dict[str, float]:
        """Forward + backward over one mini-batch with the SRPO objective, then one optimizer step.

        inputs: each micro-batch's ``LossBatch`` without the log-probs of this pass (which the loss
        function fills in), on the last pipeline stage; None on the other stages. weight_stats: the
        global sum and count of the dynamic weights (srpo; ``objective.compute_srpo_loss``)."""
        alg: AlgorithmConfig = self.cfg.algorithm
        weight_sum, weight_count = weight_stats or (None, None)
        per_micro_batch: list[dict] = []

        def loss_func(index, mb, stats: TokenStats):
            topk_logp = None
            if stats.gathered_logp is not None:
                topk_logp = mb.to_response_layout(stats.gathered_logp)
            batch = dataclasses.replace(
                inputs[index], logp=mb.to_response_layout(stats.logp), student_topk_logp=topk_logp
            )
            # num_tokens=1: the numerator; Megatron divides by the global count returned next to it.
            loss, metrics = compute_srpo_loss(
                alg, batch, num_tokens=1.0, weight_sum=weight_sum, weight_count=weight_count
            )
            count = count_denominator_tokens(alg, batch.loss_mask, batch.route_sdpo)
            per_micro_batch.append(
                {k: float(v) for k, v in metrics.items()}
                | {"num_tokens": int(count), "valid_tokens": int(mb.response_mask.sum())}
            )
            return loss, count.to(torch.int), {}

        def stats_args(index, mb):
            topk_ids = None if inputs is None else inputs[index].topk_ids  # fixed by the old pass
            return {} if topk_ids is None else {"gather_ids": mb.from_response_layout(topk_ids)}

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._run(self.model, micro_batches, stats_args, loss_func, forward_only=False)
        # Megatron's fp32 / bf16 optimizers step whatever the gradients hold (only fp16 loss scaling
        # skips on overflow): a non-finite global gradient norm skips this update here, and is counted.
        self.optimizer.prepare_grads()
        grad_norm = self.optimizer.get_grad_norm()
        update_ok = math.isfinite(grad_norm)
        if update_ok:
            # schedule first: update k (from 1) runs at lr * k / warmup, not at 0 for the first one
            self.scheduler.step(increment=1)
            update_ok, grad_norm, _ = self.optimizer.step()
        return {
            "update_ok": float(bool(update_ok)),
            "skipped_update": float(not update_ok),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "micro_batches": per_micro_batch,  # empty on all but the last pipeline stage
        }

    def update_teacher(self, rate: float) -> None:
        """EMA: theta_T <- (1 - rate) * theta_T + rate * theta_S (ALGORITHM.md sec. 4; 0.95 stays on
        the teacher), from the optimizer's fp32 main parameters."""
        self.ema.update(self.optimizer, rate)


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
