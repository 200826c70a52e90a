"""silence_known_noise drops exactly the listed third-party lines: the same text from elsewhere,
another category, or another message of the same library still shows."""

import logging
import warnings

import pytest

from srpo_megatron.runtime.quiet import silence_known_noise


def warn_from(module: str, message: str, category: type[Warning]) -> list[str]:
    """Messages that get through when `module` warns (as if the warning came from its code)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        silence_known_noise()
        exec("import warnings; warnings.warn(MESSAGE, CATEGORY)", {"__name__": module, "MESSAGE": message, "CATEGORY": category})  # fmt: skip
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("module", "message", "category"),
    [
        ("megatron.core.models.mimo.config.base_configs", "MimoModelConfig is experimental and still under active development.", UserWarning),
        ("megatron.core.tensor_parallel.layers", "When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup", UserWarning),
        ("torch.nn.modules.module", "`past_key_values` is deprecated and will be removed in version 5.40.0 for `Qwen3ForCausalLM.forward`. Use `cache` instead.", FutureWarning),
        ("megatron.core.models.backends", "Apex is not installed. Falling back to Torch Norm", UserWarning),
        ("megatron.core.optimizer", "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning),
        ("srpo_megatron.runtime.cpu", "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad attribute won't be populated", UserWarning),
        ("torch.distributed.c10d_logger", "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `torch.distributed.reduce_scatter_single` instead.", FutureWarning),
        ("megatron.core.transformer.transformer_config", "full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.", UserWarning),
    ],
)  # fmt: skip
def test_known_warnings_are_dropped_others_show(module, message, category):
    assert warn_from(module, message, category) == []
    other = "something else is deprecated"
    assert warn_from(module, other, category) == [other]  # the same library, another message
    # the same text from other code (the past_key_values filter takes any module: its text names Qwen3)
    if "past_key_values" not in message:
        assert warn_from("srpo_megatron.trainer.loop", message, category) == [message]
    assert warn_from(module, message, DeprecationWarning) == [message]  # another category


@pytest.mark.parametrize(
    ("logger", "message"),
    [
        ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes"),
        ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True."),
        ("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME='/usr/local'"),
        ("transformers.utils.generic", "`past_key_values`/`cache_params` are deprecated. Use `cache` instead."),
        ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated and will be removed"),
    ],
)  # fmt: skip
def test_known_log_lines_are_dropped_others_show(logger, message, caplog):
    silence_known_noise()
    silence_known_noise()  # idempotent: one filter per logger
    assert sum(type(f).__name__ == "_DropPrefixes" for f in logging.getLogger(logger).filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger(logger).warning(message)
        logging.getLogger(logger).warning("a new problem")
        logging.getLogger("srpo_megatron").warning(message)
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        (logger, "a new problem"),
        ("srpo_megatron", message),
    ]
