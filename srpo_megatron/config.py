"""The run configuration: one typed dataclass per component, loaded from YAML through OmegaConf.

    cfg = load_config(["configs/qwen3_8b_srpo.yaml", "configs/grpo.yaml"], ["train.total_steps=5"])

Later files and then the overrides win.

Unknown keys and values of the wrong type are refused by OmegaConf's structured schema (the message
names the key); ``validate_config`` then checks values and combinations once, at start, with a
message that says which key is wrong and why. The layout against the world size is checked by
``validate_layout`` once torch.distributed is up.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from srpo_megatron.algorithms.config import AlgorithmConfig
from srpo_megatron.errors import UserError


@dataclass
class ModelConfig:
    hf_dir: str = "???"
    """HF checkpoint to start from (config.json + safetensors); a Megatron checkpoint of this
    trainer is loaded through ``ckpt.resume`` instead."""
    tokenizer_dir: str | None = None
    """Tokenizer files; defaults to ``hf_dir``."""
    tp: int = 1
    """Tensor-parallel size of the actor (and of the EMA teacher, sharded the same way)."""
    pp: int = 1
    """Pipeline-parallel size."""
    ep: int = 1
    """Expert-parallel size (MoE models): the experts of each MoE layer are split over ``ep`` ranks
    taken out of data parallelism (``ep`` must divide the data-parallel size); the attention and
    dense layers stay replicated over data parallel."""
    moe_aux_loss_coeff: float = 0.0
    """MoE router's load-balancing loss coefficient (Megatron's ``moe_aux_loss_coeff``). 0, as slime
    and verl run Qwen3-MoE RL: the pretrained router is balanced already, and the loss would pull the
    policy towards balance rather than reward."""
    moe_z_loss_coeff: float = 0.0
    """MoE router's z-loss coefficient (logit size; 0: off, as slime and verl)."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Parameter / compute dtype. The tiny CPU run uses float32."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this times TP; padded entries carry no probability."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Megatron layer spec: Transformer Engine's on GPUs, Megatron's local (pure PyTorch) one on CPU
    ("auto"). ``local`` runs on GPUs without Transformer Engine (slower; scripts/gpu_check.sh)."""
    teacher_offload: bool = False
    """Park the EMA teacher's weights in pinned host memory between uses (its forward and its EMA
    update): the device holds one copy of the model fewer while the actor trains and the engines
    generate. Checkpoint saves and loads bring it to the device for their duration."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism (needs tp > 1): the norms, residuals and the hidden states
    between the tensor-parallel regions are split over the sequence instead of replicated on every
    TP rank (the same communication volume: all-gather + reduce-scatter instead of all-reduce).
    Micro-batches are padded to a multiple of tp tokens."""
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    """Megatron's activation recomputation in the training pass: ``selective`` recomputes the
    ``recompute_modules`` of every layer in backward; ``full`` keeps only the input of each chunk
    of layers (``recompute_method``, ``recompute_num_layers``) and recomputes the chunk in backward.
    ``srpo-train --dry-run`` prints the memory of each choice."""
    recompute_method: Literal["uniform", "block"] | None = None
    """Full recompute only: ``uniform`` checkpoints every layer in chunks of
    ``recompute_num_layers``; ``block`` checkpoints the first ``recompute_num_layers`` layers of each
    pipeline stage, one by one, and keeps the others' activations."""
    recompute_num_layers: int | None = None
    """Full recompute only: layers per chunk (uniform) or checkpointed layers per stage (block)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """Selective recompute only: of ``core_attn`` (the attention kernel: its [s, s] scores on the
    local spec; next to nothing with TE's fused attention, which keeps no scores) and ``mlp`` (the
    whole MLP). Megatron's ``layernorm`` is not offered: TE fuses the norms into the linear layers
    (nothing to recompute), and megatron-core 0.19.2 cannot run it without TE (its
    ``CheckpointWithoutOutput`` always takes the FP8 path)."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet or JSON-lines files (ALGORITHM.md sec. 10)."""
    test_files: list[str] = field(default_factory=list)
    max_prompt_length: int = 2048
    """Prompts longer than this (after the chat template) are dropped and counted."""
    seed: int = 42
    """Shuffling seed; the data position is saved in checkpoints."""


@dataclass
class RolloutConfig:
    engine: Literal["hf", "sglang"] = "hf"
    """``hf``: the HF engine in the process of global rank 0 (CPU / debugging); ``sglang``: SGLang
    servers (GPU), launched by global rank 0 or reached at ``engine_urls``."""
    n: int = 8
    """Rollouts per prompt (the group size G)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 8192
    mode: Literal["colocated", "disaggregated"] = "colocated"
    """SGLang: engines on the training GPUs (memory released while the actor trains, weights by CUDA
    IPC), or on GPUs of their own (weights by NCCL broadcast)."""
    num_engines: int = 1
    """SGLang replicas; prompts are split evenly over them."""
    engine_tp: int = 1
    """GPUs per SGLang replica. Colocated: replica i runs on the GPUs of global ranks
    [i*tp, (i+1)*tp), and num_engines x engine_tp = the world size; launched disaggregated: on the
    GPUs after the training processes' on global rank 0's node."""
    mem_fraction: float = 0.6
    """SGLang ``--mem-fraction-static``: its share of each GPU (weights + KV cache)."""
    engine_urls: list[str] = field(default_factory=list)
    """SGLang servers already running (e.g. ``http://node3:30000``), one per replica, instead of
    launching them: the way to put engines on other nodes. Launch them with ``--skip-tokenizer-init``
    (and ``--enable-memory-saver`` when colocated)."""
    server_args: list[str] = field(default_factory=list)
    """Further ``sglang.launch_server`` flags for launched engines, e.g.
    ``[--cuda-graph-backend-decode=disabled,--cuda-graph-backend-prefill=disabled]``."""
    deterministic: bool = False
    """SGLang: engines run ``--enable-deterministic-inference`` (launched with it; servers at
    ``engine_urls`` must have it), the only mode in which they sample with the per-request seeds
    the trainer sends, so a resumed run samples what an uninterrupted one would. Costs rollout
    speed (README, "Rollout engines")."""
    server_module: str = "sglang.launch_server"
    """What launched engines run (``python -m <module>``); tests use a CPU stand-in."""
    server_python: str | None = None
    """The Python of launched engines: an environment with ``sglang==0.5.23`` (its own
    transformers pin), e.g. ``.venv-sglang/bin/python`` from ``scripts/install.sh --sglang``.
    Default: the trainer's own. Without CUDA the engines run on the CPU (README, "SGLang on the
    CPU")."""
    startup_timeout_s: float = 900.0
    """Launched engines must answer /health within this."""
    call_timeout_s: float = 3600.0
    """Deadline of one engine call (a whole step's generation on one replica, a weight bucket). The
    trainer's process groups wait 10 minutes longer than this and than startup_timeout_s."""
    sync_master_addr: str | None = None
    """Disaggregated: the address at which the engines reach the trainer's sending ranks on global
    rank 0's node (each pipeline stage's source rank hosts its stage's weight-update group);
    defaults to 127.0.0.1 for launched engines, else MASTER_ADDR. Sending ranks on other nodes
    are reached at their host name."""
    hf_batch_size: int = 256
    """HF engine: samples decoded together (bounds its [batch, vocab] logits memory)."""
    bucket_mb: int = 512
    """Weight-sync bucket size."""
    verify_sync: bool = False
    """After each sync, compare checksums of every tensor the engine holds with what it was sent
    (a hash over every byte: slow, for debugging a sync)."""


@dataclass
class OptimConfig:
    lr: float = 5e-6
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class TrainConfig:
    total_steps: int = 100
    prompts_per_step: int = 32
    """Question batch: prompts sampled per training step."""
    mini_batch_prompts: int = 32
    """Prompts per optimizer step: prompts_per_step / mini_batch_prompts optimizer steps per training step."""
    micro_batch_tokens: int = 16384
    """Token budget of one micro-batch (rollouts are packed up to it, at least one per micro-batch)."""
    ops_chunk_tokens: int = 1024
    """Token chunk of the vocab-parallel ops (memory O(chunk x V/tp))."""
    seed: int = 1234
    async_rollouts: bool = False
    """One step off policy: the engines generate step k+1's rollouts while the actor trains step k
    (each batch sampled by weights one update older than the synchronous loop's; the TIS weight
    corrects it). Needs engines on devices of their own: rollout.engine=sglang,
    rollout.mode=disaggregated (trainer/rollout_source.py)."""


@dataclass
class CkptConfig:
    save_every: int = 50
    """Save a training checkpoint every N steps (and after the last step); 0 = only after the last."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted once a newer one is complete."""
    resume: str = "auto"
    """"auto": continue from the newest complete checkpoint under <output_dir>/checkpoints (if any);
    "none": start fresh; or the path of a checkpoint directory."""
    export_hf: bool = True
    """After the last step, write <output_dir>/hf (HF safetensors + tokenizer) from the last checkpoint."""


@dataclass
class EvalConfig:
    every: int = 0
    """Evaluate on data.test_files every N steps and after the last step; 0 = only after the last,
    -1 = never."""
    n_samples: int = 16
    """Samples per test prompt; the metric is avg@n (mean accuracy over the n samples)."""
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None
    """Defaults to rollout.max_new_tokens."""
    max_prompts: int = 0
    """Evaluate on the first N test prompts of each file (0 = all)."""


@dataclass
class RewardConfig:
    tool_use_parser: Literal["balanced", "reference"] = "balanced"
    """How the tool-use verifier reads `Action Input: {...}` (rewards/tool_use.py), in training and
    evaluation alike: "balanced" parses the whole JSON object; "reference" is SDPO's parser exactly
    (up to the first `}`, Python ==), to reproduce its published tool-use numbers."""


@dataclass
class LogConfig:
    run_name: str = "srpo"
    output_dir: str | None = None
    """Defaults to outputs/<run_name>/."""
    tensorboard: bool = True
    wandb_project: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.log.output_dir or f"outputs/{self.log.run_name}")


def load_config(paths: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """YAML files (merged in order) + ``key=value`` overrides -> a validated ``Config``; UserError
    naming the key otherwise."""
    merged = OmegaConf.structured(Config)
    source = "overrides"
    try:
        for path in paths:
            source = str(path)
            if not Path(path).is_file():
                raise UserError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        source = "overrides"
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        source = "missing values"
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        # e.g. "Key 'lrr' not in 'OptimConfig'", "Value 'abc' of type 'str' could not be converted to
        # Float"; the lines after the first are OmegaConf's own (full_key: ..., object_type=...)
        message = str(err).splitlines()[0]
        key = f"{err.full_key}: " if getattr(err, "full_key", None) else ""
        raise UserError(f"bad config ({source}): {key}{message}") from None
    validate_config(cfg)
    return cfg


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"config: {key}: {message}")


def validate_config(cfg: Config) -> None:
    """Value and combination checks that need no process group."""
    _check(cfg.model.hf_dir not in ("", "???"), "model.hf_dir", "is required")
    _check(cfg.model.tp >= 1 and cfg.model.pp >= 1, "model.tp/pp", "must be >= 1")
    _check(bool(cfg.data.train_files), "data.train_files", "needs at least one file")
    _check(cfg.data.max_prompt_length > 0, "data.max_prompt_length", "must be > 0")
    _validate_memory_settings(cfg.model)
    r = cfg.rollout
    _check(r.n >= 1, "rollout.n", f"must be >= 1, got {r.n}")
    _check(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _check(r.bucket_mb >= 1, "rollout.bucket_mb", "must be >= 1")
    _check(r.hf_batch_size >= 1, "rollout.hf_batch_size", "must be >= 1")
    if r.engine == "sglang":
        _check(r.num_engines >= 1 and r.engine_tp >= 1, "rollout.num_engines/engine_tp", "must be >= 1")
        _check(0 < r.mem_fraction < 1, "rollout.mem_fraction", f"must be in (0, 1), got {r.mem_fraction}")
        _check(
            not r.engine_urls or len(r.engine_urls) == r.num_engines,
            "rollout.engine_urls",
            f"gives {len(r.engine_urls)} servers for rollout.num_engines={r.num_engines}",
        )
        _check(
            not r.verify_sync,
            "rollout.verify_sync",
            "reads the engine's tensors in process: HF engine only (rollout.engine=hf)",
        )
        _check(r.startup_timeout_s > 0 and r.call_timeout_s > 0, "rollout.*_timeout_s", "must be > 0")
        _check(
            r.mode != "colocated" or cfg.model.pp == 1,
            "rollout.mode",
            "colocated engines need model.pp=1 (each GPU's training rank hands its engine rank a full "
            "copy of the weights); with pipeline parallelism use rollout.mode=disaggregated",
        )
    _check(cfg.eval.max_prompts >= 0, "eval.max_prompts", "must be >= 0 (0 = all)")
    t = cfg.train
    _check(t.total_steps >= 1, "train.total_steps", "must be >= 1")
    _check(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
    _check(
        t.mini_batch_prompts >= 1 and t.prompts_per_step % t.mini_batch_prompts == 0,
        "train.mini_batch_prompts",
        f"must divide train.prompts_per_step ({t.prompts_per_step}), got {t.mini_batch_prompts}",
    )
    _check(t.micro_batch_tokens >= 1, "train.micro_batch_tokens", "must be >= 1")
    _check(t.ops_chunk_tokens >= 1, "train.ops_chunk_tokens", "must be >= 1")
    _check(
        not t.async_rollouts or r.engine == "sglang",
        "train.async_rollouts",
        "the HF engine generates in global rank 0's process, between its training passes, so there is "
        "nothing to overlap: use rollout.engine=sglang rollout.mode=disaggregated, or async_rollouts=false",
    )
    _check(
        not t.async_rollouts or r.mode == "disaggregated",
        "train.async_rollouts",
        "colocated engines share the training GPUs (their memory is released while the actor trains), "
        "so generation cannot overlap training: use rollout.mode=disaggregated (engines on GPUs of "
        "their own), or async_rollouts=false",
    )
    o = cfg.optim
    _check(
        o.lr > 0 and 0 <= o.min_lr <= o.lr,
        "optim.lr/min_lr",
        f"need 0 <= min_lr <= lr, lr > 0 (got {o.lr}, {o.min_lr})",
    )
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 = off)")
    _check(cfg.ckpt.save_every >= 0, "ckpt.save_every", "must be >= 0")
    _check(cfg.ckpt.keep_last >= 1, "ckpt.keep_last", "must be >= 1")
    _check(cfg.eval.every >= -1, "eval.every", "must be >= -1")
    _check(cfg.eval.n_samples >= 1, "eval.n_samples", "must be >= 1")
    _check(
        0 < cfg.eval.top_p <= 1 and cfg.eval.temperature > 0,
        "eval.temperature/top_p",
        "need temperature > 0, 0 < top_p <= 1",
    )
    try:
        cfg.algorithm.validate()
    except ValueError as err:  # algorithms/ raises plain ValueError (it imports nothing of ours)
        raise UserError(f"config: algorithm: {err}") from None
    if cfg.algorithm.variant != "grpo" and r.n < 2:
        raise UserError(f"config: rollout.n: {cfg.algorithm.variant} needs siblings, so n >= 2 (got {r.n})")


RECOMPUTE_MODULES = ("core_attn", "mlp")  # Megatron's for a dense model, but "layernorm" (see above)


def _validate_memory_settings(m: ModelConfig) -> None:
    """Sequence parallelism and recompute combinations that Megatron's TransformerConfig would refuse
    (or, for the first, accept and then fail on), named by our keys. The number of layers is checked
    against the model by ``check_recompute_layers``."""
    _check(
        not m.sequence_parallel or m.tp > 1,
        "model.sequence_parallel",
        "needs model.tp > 1: it splits the sequence over the tensor-parallel ranks (got tp=1)",
    )
    full = m.recompute_granularity == "full"
    if full:
        _check(
            m.recompute_method is not None,
            "model.recompute_method",
            "full recompute needs 'uniform' (every layer, in chunks of recompute_num_layers) or "
            "'block' (the first recompute_num_layers layers of each pipeline stage)",
        )
        _check(
            m.recompute_num_layers is not None and m.recompute_num_layers >= 1,
            "model.recompute_num_layers",
            f"full recompute needs a number of layers >= 1, got {m.recompute_num_layers}",
        )
    else:
        for key, value in (
            ("recompute_method", m.recompute_method),
            ("recompute_num_layers", m.recompute_num_layers),
        ):
            _check(
                value is None,
                f"model.{key}",
                f"applies to model.recompute_granularity=full only (it is {m.recompute_granularity})",
            )
    if m.recompute_granularity == "selective":
        unknown = sorted(set(m.recompute_modules) - set(RECOMPUTE_MODULES))
        _check(
            bool(m.recompute_modules) and not unknown,
            "model.recompute_modules",
            f"selective recompute needs one or more of {list(RECOMPUTE_MODULES)}, got {m.recompute_modules}",
        )


def check_recompute_layers(m: ModelConfig, num_layers: int) -> None:
    """Full recompute's number of layers against the layers of one pipeline stage."""
    per_stage = num_layers // m.pp
    _check(
        m.recompute_granularity != "full" or m.recompute_num_layers <= per_stage,
        "model.recompute_num_layers",
        f"must be at most the layers per pipeline stage, {per_stage} ({num_layers} layers / pp {m.pp}), "
        f"got {m.recompute_num_layers}",
    )


def validate_layout(cfg: Config, world_size: int, local_world_size: int | None = None) -> int:
    """The data-parallel size for this world; a clear error if TP x PP does not fit it, or the
    engines the trainer would launch do not fit global rank 0's node (local_world_size: processes
    on that node, default the whole world)."""
    model_parallel = cfg.model.tp * cfg.model.pp
    if world_size % model_parallel:
        raise UserError(
            f"config: model.tp x model.pp = {cfg.model.tp} x {cfg.model.pp} = {model_parallel} "
            f"does not divide the world size {world_size} (processes launched by torchrun)"
        )
    dp = world_size // model_parallel
    if cfg.model.ep < 1 or dp % cfg.model.ep:
        raise UserError(
            f"config: model.ep={cfg.model.ep} must divide the data-parallel size {dp} (world {world_size} "
            f"/ tp*pp {model_parallel}): expert parallelism splits the data-parallel ranks"
        )
    if cfg.train.mini_batch_prompts % dp:
        raise UserError(
            f"config: train.mini_batch_prompts ({cfg.train.mini_batch_prompts}) must be divisible by "
            f"the data-parallel size {dp} (world {world_size} / tp*pp {model_parallel})"
        )
    r = cfg.rollout
    local = local_world_size or world_size
    if r.engine == "sglang" and r.mode == "colocated":
        gpus = r.num_engines * r.engine_tp
        if gpus != world_size:
            raise UserError(
                f"config: rollout.num_engines x engine_tp = {gpus} GPUs, but colocated engines take every "
                f"training GPU, one engine rank each: it must equal the world size {world_size}"
            )
        if not r.engine_urls and local != world_size:
            raise UserError(
                "config: colocated engines are launched on global rank 0's node only; on several nodes "
                "start one server per engine yourself (engine i on the GPUs of global ranks i*engine_tp "
                "and up, with --enable-memory-saver) and pass rollout.engine_urls"
            )
    if r.engine == "sglang" and r.mode == "disaggregated" and not r.engine_urls and local != world_size:
        raise UserError(
            "config: disaggregated engines are launched on global rank 0's node, after its training "
            "GPUs; with several nodes start the servers yourself and pass rollout.engine_urls"
        )
    return dp


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
