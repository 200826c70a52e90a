"""Known third-party start-up noise, dropped where it is emitted so that a run's own lines show.

``silence_known_noise()`` runs first in every entry point that builds Megatron models (the trainer's
ranks, the checkpoint converters). Each filter matches one message of one library (its text, and
its warning category or its logger), so a new or unexpected warning still shows. Why each is
harmless here is written next to it. Re-check the list when a pinned version changes.
"""

import logging
import warnings

# (message regex, category, module regex of the code that warns): Python warnings.
_WARNINGS = (
    # megatron-core's models/__init__ imports the multimodal package, whose config class warns when
    # it is defined; we never build a MIMO model.
    (r"MimoModelConfig is experimental", UserWarning, r"megatron\.core\.models\.mimo\."),
    # A throughput hint for ordering the TP all-reduce before the next GEMM on CUDA queues (on a
    # CPU there are none); it changes no result. On GPUs it is unmeasured for colocated engines.
    (
        r"When using (async grad allreduce|sequence parallelism) it is recommended to set the "
        r"environment variable CUDA_DEVICE_MAX_CONNECTIONS",
        UserWarning,
        r"megatron\.core\.tensor_parallel\.layers",
    ),
    # The HF engine passes `past_key_values`, the name every transformers 5.x accepts (the newest
    # maps it to `cache` itself), so one engine runs on whichever 5.x an image pins.
    (
        r"`past_key_values` is deprecated and will be removed in version [\d.]+ for `Qwen3\w*\.forward`",
        FutureWarning,
        r"",
    ),
    # No Transformer Engine / Apex on CPU: the local spec uses torch's norms and optimizers, by design.
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, r"megatron\.core\."),
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core\."),
    # megatron-core's own TransformerConfig default (cuda_graph_modules="full") trips its own
    # deprecation; the actor captures no CUDA graphs.
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer\.transformer_config"),
    # megatron-core's distributed optimizer zero_grad asks for `.grad` of its fp32 shard views of the
    # parameters (optimizer.py, _zero_grad_group_helper); their gradients are copied in from the DDP
    # grad buffers, never written by autograd. On CPU the CPU shim's torch-function frame is the one
    # that runs the attribute access, so the warning is attributed to it.
    (
        r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
        UserWarning,
        r"(megatron\.core\.optimizer\.|srpo_megatron\.runtime\.cpu)",
    ),
    # megatron-core 0.19.2's grad and param buffers call torch's older names of these collectives,
    # which torch 2.14 still runs as before.
    (
        r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
        FutureWarning,
        r"torch\.distributed\.",
    ),
    # megatron-core's torch_dist checkpoints are built on torch's ShardedTensor and call its load
    # positionally; the converters load as a world of one process, which is what torch assumes.
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, r""),
    (r"The argument order of load has been changed", UserWarning, r"torch\.distributed\.checkpoint\."),
    (
        r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent is to load "
        r"in a single process",
        UserWarning,
        r"torch\.distributed\.checkpoint\.",
    ),
)

# logger name -> message prefixes: lines logged through the logging module.
_LOG_LINES = {
    # Printed by every GPTModel constructor: megatron-core 0.19 points new work at HybridModel;
    # GPTModel is its dense decoder, the one our checkpoints and schedules are built on (DESIGN.md).
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    # trainer/actor.py builds DDP with the distributed optimizer without a precomputed layout; DDP
    # then computes the same one itself (megatron-core keeps this path for such callers). Passing
    # DistributedOptimizer.compute_full_param_layout() would make this filter unnecessary.
    "megatron.core.distributed.distributed_data_parallel": (
        "DistributedDataParallel: full_param_layout not provided",
    ),
    # torch looks for a CUDA toolkit when its extension builder is imported; we build no extensions.
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
    # The logged twin of the `past_key_values` FutureWarning above (also on `out.past_key_values`).
    "transformers.utils.generic": ("`past_key_values`/`cache_params` are deprecated",),
    # dist_checkpointing's synchronous save runs through its "mcore" async request machinery and
    # warns that this machinery is deprecated; our saves are synchronous.
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def silence_known_noise() -> None:
    """Install the filters above in this process (idempotent). Call before importing megatron."""
    for message, category, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefixes in _LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))
