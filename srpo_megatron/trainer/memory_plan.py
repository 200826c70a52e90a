"""Memory per GPU of a run, term by term: what ``srpo-train --dry-run`` prints, and what
``benchmarks/activation_memory.py`` checks against measured peaks on CPU.

Two peaks, per GPU (P = this rank's parameters, dp = data-parallel size, p = bytes of model.dtype):

    static     = params P*p + fp32 grads 4P + Adam (fp32 main params with bf16, m, v) (12 or 8)P/dp
                 + EMA teacher P*p + its fp32 EMA values 4P/dp (trainer/teacher.py; 0 if offloaded)
    training   = static + activations of the largest micro-batch + the fused vocab op's buffers
    generating = static + rollout.mem_fraction x GPU memory (colocated engines; they free it before
                 training, SGLang's memory saver)
    teacher    = static with the teacher on the device + one layer's forward (model.teacher_offload:
                 its forward and its EMA update bring all of it back, fp32 EMA values included)
    engine GPU = rollout.mem_fraction x GPU memory, of which the weights (model.dtype) / engine_tp
                 (disaggregated engines, on GPUs of their own: held all run, async or not)

Mixture of experts (Qwen3-MoE; runtime/distributed.py's ParallelLayout): expert parallelism is
carved out of data parallelism and the experts are tensor-parallel over the same TP ranks, so
Megatron's expert data-parallel size is dp/ep (world / (ep*tp*pp)): each expert is held by dp/ep
ranks, each dense parameter (attention, embeddings, norms, routers, dense MLPs) by dp. With
E_all the expert parameters and D the rest of the model:

    P          = D/(tp*pp) + E_all/(ep*tp*pp)        (P_e: the second term, this rank's experts)
    Adam, EMA  = (P - P_e)/dp + P_e/(dp/ep)          in place of P/dp (distributed optimizer and
                                                     trainer/teacher.py shard each part over its
                                                     own data-parallel group)

so Adam and the fp32 EMA values of the experts cost 16*E_all/world bytes per GPU whatever the
split, and only the replicated terms (params, grads, teacher weights: 8 bytes a parameter in bf16)
shrink as ep*tp*pp grows. Activations of a MoE layer, per token of the micro-batch, with routing
assumed balanced (T*k routed tokens reach each rank: the all-to-all over EP, then the all-gather
over TP of the alltoall dispatcher; a rank whose experts are busier gets more, Megatron drops
none): the dispatched tokens saved by the experts' fc1, k*h*p; the experts' SwiGLU k*6F*p
(F = moe_intermediate_size/tp: the dense MLP's 5 tensors and the output scaled by the router's
probability); the router's fp32 scores E*4*r. In backward the layer also holds the dispatched
tokens' gradient and its re-sorted copy, 2*k*h*p, next to the experts' gradients in flight
(k*4F*p). Megatron's selective ``mlp`` recompute leaves MoE layers alone (its ``moe`` module
would take them; not offered by ModelConfig), so full recompute is what shrinks them here.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (sec. 4): a layer keeps s*b*h*(34 + 5*a*s/h) bytes at TP=1 in 16-bit with dropout, of
which 10*s*b*h stay replicated on every TP rank unless sequence parallelism splits them too. We
count, tensor by tensor, what each Megatron op of Qwen3's layer saves for backward (checked with
``torch.autograd.graph.saved_tensors_hooks`` on megatron-core 0.19.2), per token of the micro-batch
and per TP rank (h: hidden; q = heads*head_dim/tp, kv = kv_heads*head_dim/tp, a = heads/tp,
f = ffn/tp; r = 1/tp with sequence parallelism, else 1; d = head_dim; S = sequence length):

    shared by both specs          RoPE's cos/sin for q and k 4d*p; the attention output q*p (the
                                  proj's input); SwiGLU MLP 5f*p (fc1 output 2f, silu(gate) f,
                                  up + glu_linear_offset f, fc2 input f)
    local spec (Megatron's own,   2 norms x (x and x/rms in fp32 + output p) h*r; q/k norms: inputs
    torch ops; CPU, and GPUs      and outputs in fp32 (the views of the QKV output in fp32, which keep
    without TE)                   all of it); Q, K and V repeated to every head (GQA) 3q*p; the
                                  [s, s] scores: softmax output fp32 (+ its p copy) a*S, bool mask
    transformer_engine (GPU)      2 fused norm+linear x (input + normalised input) 2h*r*p (TE keeps
                                  its shard under sequence parallelism and gathers again in
                                  backward); the QKV output (q + 2kv)*p, kept by the views the q/k
                                  norms and attention save; flash attention: rotated Q, K (q + kv)*p
                                  and its fp32 log-sum-exp a*4; no scores, no repeated K/V

No dropout masks (Qwen3 trains without dropout). Recompute (Megatron's own):
    selective core_attn   keeps the attention kernel's inputs instead of what it saves (local: the
                          scores and the repeated K/V; TE: only the log-sum-exp);
    selective mlp         keeps the MLP's input instead of its tensors (TE: also fc1's norm);
    full uniform k        keeps each chunk's input h*r*p and recomputes one chunk of k layers;
    full block k          keeps the input of the first k layers of the stage, the rest as usual.
The backward of a recomputed part holds it once more, for one layer (chunk) at a time, with the
layer's gradients in flight (the MLP's 4f*p, or the local spec's two [s, s] fp32 gradients of the
softmax backward): the peak is at that moment or at the fused op's backward, whichever is larger.

Outside the layers: the final norm; the scored hidden states [N, h] that the fused op saves, and
their gradient; the op's chunk buffers [C, V/tp] (fp32 statistics + the compute-dtype logits or
logits gradient) and its fp32 weight-gradient accumulator [V/tp, h] (ops/token_stats.py); with
sequence parallelism on the local spec, Megatron's persistent all-gather buffer [T, h].

Assumed, not counted: the largest micro-batch is max(train.micro_batch_tokens, prompt + response
length) tokens, all of them scored (an upper bound); forward-only passes (old log-probs, the
teacher) free each layer's activations as they go and stay below the training pass; the CUDA
context, NCCL buffers and the caching allocator's fragmentation (keep some GiB free for them).
The local-spec inventory is measured on CPU (benchmarks/activation_memory.py); the TE one is read
from TE's source and has not been measured (no GPU with TE so far).
"""

from dataclasses import dataclass, replace
from typing import Literal

from srpo_megatron.config import Config
from srpo_megatron.models.qwen3.config import Qwen3Arch
from srpo_megatron.models.vocab import padded_vocab_size

GIB = 2**30
Spec = Literal["local", "transformer_engine"]


@dataclass(frozen=True)
class Recompute:
    """Megatron's activation recompute, as ``model.recompute_*`` set it."""

    granularity: Literal["none", "selective", "full"] = "none"
    method: Literal["uniform", "block"] | None = None
    num_layers: int | None = None
    modules: tuple[str, ...] = ("core_attn",)

    def describe(self) -> str:
        if self.granularity == "selective":
            return f"selective [{', '.join(self.modules)}]"
        if self.granularity == "full":
            return f"full ({self.method}, {self.num_layers} layer{'s' if self.num_layers > 1 else ''})"
        return "no recompute"

    def overrides(self) -> str:
        """The ``model.*`` overrides that select this recompute."""
        keys = [f"model.recompute_granularity={self.granularity}"]
        if self.granularity == "selective":
            keys.append(f"model.recompute_modules=[{','.join(self.modules)}]")
        if self.granularity == "full":
            keys += [f"model.recompute_method={self.method}", f"model.recompute_num_layers={self.num_layers}"]
        return " ".join(keys)


@dataclass(frozen=True)
class ActivationShape:
    """One training micro-batch on one rank: the model's shape, its layout and the token counts."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int  # of this pipeline stage
    padded_vocab: int
    tp: int
    sequence_parallel: bool
    tokens: int  # B x S of the micro-batch
    seq_len: int  # S, the row length (the [S, S] scores of the local spec)
    scored_tokens: int  # positions that go through the fused vocab op
    chunk_tokens: int  # train.ops_chunk_tokens
    dtype_bytes: int  # 2 (bf16) or 4 (fp32)
    spec: Spec
    # mixture of experts: of this stage's ``layers``, those whose MLP is the experts (0: dense)
    moe_layers: int = 0
    moe_ffn: int = 0  # moe_intermediate_size of one expert
    topk: int = 0  # experts per token
    num_experts: int = 0


def _layer_parts(s: ActivationShape, moe: bool = False) -> dict[str, float]:
    """Bytes one layer (a MoE layer with ``moe``) saves for backward, by part; the parts recompute
    can drop are separate."""
    p, t, n = s.dtype_bytes, s.tp, s.tokens
    r = 1 / t if s.sequence_parallel else 1.0
    h, q, kv, a, f, d = (
        s.hidden,
        s.heads * s.head_dim / t,
        s.kv_heads * s.head_dim / t,
        s.heads / t,
        s.ffn / t,
        s.head_dim,
    )
    shared_attention = 4 * d * p + q * p  # RoPE's cos/sin (q and k), the attention output (proj input)
    if s.spec == "local":
        # torch's RMSNorm computes in fp32: saves x and x/rms in fp32 (copies when p = 2), output in p
        norm = (8 + p) * h * r
        if p == 4:  # q/k norms save views of the QKV output: all of it stays, plus q when reshaped
            qk_norms = (q + 2 * kv) * 4 + (q + kv) * 4 + (q * 4 if s.kv_heads / t > 1 else 0)
        else:  # fp32 copies of q and k, and their normalised values
            qk_norms = (q + kv) * 8
        # Q, K and V repeated to every head, the softmax output (fp32, + a p copy), the bool mask
        core_attention = 3 * q * p + a * s.seq_len * (4 + (p if p < 4 else 0)) + s.seq_len * s.seq_len / n
        core_attention_inputs = (q + kv) * p + (0 if p == 4 else (q + 2 * kv) * p)  # rotated Q, K; V's QKV
        mlp_input = 0.0  # the pre-MLP norm's output, counted with the norm
        mlp_norm = norm
    else:
        norm = 2 * h * r * p  # TE's norm + linear: its input and the normalised input
        qk_norms = (q + 2 * kv) * p  # the QKV output, kept by the views saved
        core_attention = (q + kv) * p + a * 4  # flash attention: rotated Q and K, the fp32 lse
        core_attention_inputs = (q + kv) * p
        mlp_input = h * r * p  # the residual stream, before fc1's fused norm
        mlp_norm = norm
    if moe:  # the dispatched tokens (fc1's input), the experts' SwiGLU, the router's fp32 scores
        mlp = s.topk * (h + 6 * s.moe_ffn / t) * p + s.num_experts * 4 * r
    else:
        mlp = 5 * f * p
    return {
        "attention_norm": norm * n,
        "attention": (qk_norms + shared_attention) * n,
        "core_attention": core_attention * n,
        "core_attention_inputs": core_attention_inputs * n,
        "mlp_norm": mlp_norm * n,
        "mlp": mlp * n,
        "mlp_input": mlp_input * n,
    }


def layer_bytes(
    s: ActivationShape, recompute: Recompute = Recompute(), moe: bool = False
) -> tuple[float, float]:
    """(bytes one layer keeps until its backward, bytes its backward recomputes) under ``recompute``
    at selective or no granularity; ``moe``: a MoE layer (selective ``mlp`` leaves it alone)."""
    parts = _layer_parts(s, moe)
    kept = (
        parts["attention_norm"]
        + parts["attention"]
        + parts["core_attention"]
        + parts["mlp_norm"]
        + parts["mlp"]
    )
    again = 0.0
    if recompute.granularity == "selective" and "core_attn" in recompute.modules:
        kept += parts["core_attention_inputs"] - parts["core_attention"]
        again += parts["core_attention"]
    if recompute.granularity == "selective" and "mlp" in recompute.modules and not moe:
        dropped = parts["mlp"] + (parts["mlp_norm"] if s.spec == "transformer_engine" else 0.0)
        kept += parts["mlp_input"] - dropped
        again += dropped
    return kept, again


def _backward_working_bytes(s: ActivationShape, moe: bool = False) -> float:
    """Gradients in flight inside one layer's backward, beyond what the layer saved: the MLP's
    (fc2 input, the SwiGLU halves, fc1 output: 4f*p; a MoE layer's for its k routed copies of each
    token, plus the dispatched tokens' gradient and its re-sorted copy) or, on the local spec, the
    softmax backward's two [s, s] gradients (of the probabilities and of the scores, fp32),
    whichever is larger."""
    p, t = s.dtype_bytes, s.tp
    mlp = s.topk * (4 * s.moe_ffn / t + 2 * s.hidden) * p if moe else 4 * s.ffn / t * p
    if s.spec == "local":
        attention = 2 * s.heads / t * s.seq_len * (4 + (p if p < 4 else 0))
    else:  # flash attention's backward: dQ, dK, dV and dO
        attention = 2 * (s.heads + 2 * s.kv_heads) * s.head_dim / t * p
    return max(mlp, attention) * s.tokens


def _layer_kinds(s: ActivationShape) -> list[tuple[int, bool]]:
    """The stage's layers by kind, (count, MoE?). A mixed stage lists its MoE layers first: where
    only some layers keep their activations (block recompute) they count as MoE, an upper bound."""
    kinds = [(s.moe_layers, True), (s.layers - s.moe_layers, False)]
    return [(count, moe) for count, moe in kinds if count]


def activation_terms(s: ActivationShape, recompute: Recompute = Recompute()) -> dict[str, float]:
    """Bytes of the training pass at its peak, by term. Two moments compete (the larger is the peak):
    the start of the backward, when the fused op holds its chunk buffers, its fp32 weight gradient
    and the hidden states' gradient while every layer holds what it keeps; and the backward of the
    first layer (chunk) to recompute, which holds its recomputed activations and its gradients in
    flight next to what the other layers still keep (for block recompute: only the first layers')."""
    p, n = s.dtype_bytes, s.tokens
    r = 1 / s.tp if s.sequence_parallel else 1.0
    kinds = _layer_kinds(s)
    full_layer = max(layer_bytes(s, moe=moe)[0] for _, moe in kinds)  # the largest kind
    layer_input = s.hidden * r * p * n
    if recompute.granularity == "full":
        k = recompute.num_layers
        if recompute.method == "uniform":
            layers = -(-s.layers // k) * layer_input
            at_recompute, again = layers, min(k, s.layers) * full_layer
        else:  # the last layers' backward frees their activations before the first k recompute
            rest, kept_rest = s.layers - k, 0.0
            for count, moe in kinds:
                kept_rest += min(count, rest) * layer_bytes(s, moe=moe)[0]
                rest -= min(count, rest)
            layers = k * layer_input + kept_rest
            at_recompute, again = k * layer_input, full_layer
    else:
        per_kind = [(count, *layer_bytes(s, recompute, moe)) for count, moe in kinds]
        layers = at_recompute = sum(count * kept for count, kept, _ in per_kind)
        again = max(again for _, _, again in per_kind)  # one layer recomputes at a time
    vocab_shard = s.padded_vocab / s.tp
    extra_copy = p if p < 4 else 0  # a compute-dtype copy next to the fp32 buffer
    terms = {
        "layers": layers,
        "final_norm": ((8 + p) if s.spec == "local" else p) * s.hidden * r * n,
        "scored_hidden": s.scored_tokens * s.hidden * p,  # saved by the fused op
        # two fp32 [C, V/tp] buffers (logits, then their exp / gradient), ops/shard_math.py
        "vocab_chunks": s.chunk_tokens * vocab_shard * (8 + extra_copy),
        "vocab_weight_grad": vocab_shard * s.hidden * (4 + extra_copy),
        "vocab_hidden_grad": s.scored_tokens * s.hidden * p,
    }
    at_vocab_op = sum(terms.values())
    # + the gradient of the residual stream [T, h] reaching the layer
    working = max(_backward_working_bytes(s, moe) for _, moe in kinds)
    at_layer_backward = at_recompute + again + layer_input + working
    terms["layer_backward_beyond_vocab_op"] = max(0.0, at_layer_backward - at_vocab_op)
    if s.sequence_parallel and s.spec == "local":
        terms["sp_gather_buffer"] = n * s.hidden * p  # Megatron's global memory buffer, persistent
    return terms


def _training_shape(cfg: Config, arch: Qwen3Arch) -> ActivationShape:
    m, t = cfg.model, cfg.train
    longest = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    tokens = max(t.micro_batch_tokens, longest)  # at least one sequence per micro-batch
    if m.sequence_parallel:
        tokens = -(-tokens // m.tp) * m.tp
    per_stage = arch.num_layers // m.pp
    moe_layers = max(  # the stage with the most MoE layers
        sum(stage * per_stage <= i < (stage + 1) * per_stage for i in arch.moe_layers)
        for stage in range(m.pp)
    )
    return ActivationShape(
        hidden=arch.hidden_size,
        ffn=arch.intermediate_size,
        heads=arch.num_heads,
        kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        layers=arch.num_layers // m.pp,
        padded_vocab=padded_vocab_size(arch.vocab_size, m.tp, m.make_vocab_size_divisible_by),
        tp=m.tp,
        sequence_parallel=m.sequence_parallel,
        tokens=tokens,
        seq_len=min(longest, tokens),
        scored_tokens=tokens,
        chunk_tokens=t.ops_chunk_tokens,
        dtype_bytes=2 if m.dtype == "bfloat16" else 4,
        # "auto" plans for what a GPU run builds: Transformer Engine's spec
        spec="local" if m.transformer_impl == "local" else "transformer_engine",
        moe_layers=moe_layers,
        moe_ffn=arch.moe_intermediate_size,
        topk=arch.num_experts_per_tok,
        num_experts=arch.num_experts,
    )


def _static_terms(cfg: Config, params: float, dp: int, teacher_on_device: bool) -> dict[str, float]:
    """Bytes of ``params`` parameters of this rank whose main copies (Adam) and fp32 EMA values are
    sharded over ``dp`` ranks: the whole model's, or for a MoE model its dense part's (over dp) and
    its experts' (over dp / ep) apart."""
    bf16 = cfg.model.dtype == "bfloat16"
    p = 2 if bf16 else 4
    teacher = params if teacher_on_device else 0.0
    return {
        "params": params * p,
        "grads": params * 4,
        "optimizer": params * (12 if bf16 else 8) / dp,
        "teacher_weights": teacher * p,
        "teacher_fp32": teacher * 4 / dp,
    }


def _rank_state(
    cfg: Config, params_per_rank: float, experts_per_rank: float, dp: int, teacher_on_device: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """(every static term of this rank, the experts' share of each)."""
    dense = _static_terms(cfg, params_per_rank - experts_per_rank, dp, teacher_on_device)
    experts = _static_terms(cfg, experts_per_rank, dp // cfg.model.ep, teacher_on_device)
    return {k: dense[k] + experts[k] for k in dense}, experts


def _options(cfg: Config, layers: int) -> list[tuple[bool, Recompute]]:
    """(sequence parallel, recompute) choices to compare: each recompute without sequence
    parallelism, and with it where tp > 1 makes it possible."""
    recomputes = [
        Recompute(),
        Recompute("selective", modules=("core_attn",)),
        Recompute("selective", modules=("core_attn", "mlp")),
        Recompute("full", "uniform", 1),
    ]
    sp_settings = [False, True] if cfg.model.tp > 1 else [False]
    return [
        (sp, rc)
        for sp in sp_settings
        for rc in recomputes
        if rc.num_layers is None or rc.num_layers <= layers
    ]


def memory_plan_lines(
    cfg: Config,
    arch: Qwen3Arch,
    params_per_rank: float,
    dp: int,
    gpu_memory_gib: float,
    experts_per_rank: float = 0.0,
) -> list[str]:
    """The dry run's memory lines: both peaks with every term, the experts' share (MoE), the
    teacher's pass when it is offloaded, the alternatives, and a warning naming the settings that
    fit when the chosen ones do not. ``params_per_rank``: all of this rank's parameters, of which
    ``experts_per_rank`` are experts (sharded over the expert data-parallel size dp / model.ep)."""
    m = cfg.model
    assert (experts_per_rank > 0) == arch.is_moe, "a MoE model's experts are sharded apart: pass them"
    shape = _training_shape(cfg, arch)
    chosen = Recompute(
        m.recompute_granularity, m.recompute_method, m.recompute_num_layers, tuple(m.recompute_modules)
    )
    static, experts = _rank_state(cfg, params_per_rank, experts_per_rank, dp, not m.teacher_offload)
    static_total = sum(static.values())

    def training_total(sp: bool, recompute: Recompute) -> float:
        terms = activation_terms(replace(shape, sequence_parallel=sp, tokens=_tokens(shape, sp)), recompute)
        return (static_total + sum(terms.values())) / GIB

    terms = activation_terms(shape, chosen)
    activations = sum(v for k, v in terms.items() if not k.startswith("vocab_")) / GIB
    vocab_op = sum(v for k, v in terms.items() if k.startswith("vocab_")) / GIB
    total = training_total(m.sequence_parallel, chosen)
    g = {k: v / GIB for k, v in static.items()}
    offloaded = " (offloaded)" if m.teacher_offload else ""
    experts_dp = f"; the experts' over dp/ep {dp // m.ep}" if experts_per_rank else ""
    attention = "local spec, unfused attention" if shape.spec == "local" else "TE spec, fused attention"
    moe = (
        f" ({shape.moe_layers} MoE: top-{shape.topk} routing, {shape.tokens * shape.topk:,} expert tokens)"
        if shape.moe_layers
        else ""
    )
    lines = [
        f"memory per GPU while training (estimate, GiB): params {g['params']:.1f} + fp32 grads {g['grads']:.1f} "
        f"+ Adam {g['optimizer']:.1f} (over dp {dp}{experts_dp}) + EMA teacher "
        f"{g['teacher_weights'] + g['teacher_fp32']:.1f}{offloaded} (weights {g['teacher_weights']:.1f}, "
        f"fp32 EMA values {g['teacher_fp32']:.1f} over dp {dp}{experts_dp}) "
        f"+ activations {activations:.1f} (micro-batch of {shape.tokens:,} tokens, {shape.layers} layers{moe}, "
        f"{attention}, sequence parallel {'on' if m.sequence_parallel else 'off'}, {chosen.describe()}) "
        f"+ vocab op {vocab_op:.1f} (chunks of {shape.chunk_tokens:,} x {shape.padded_vocab // shape.tp:,}, "
        f"its fp32 weight gradient, the hidden gradient) = {total:.1f} of {gpu_memory_gib:g} GiB"
    ]
    if experts_per_rank:
        lines.append(_experts_line(cfg, params_per_rank, experts_per_rank, dp, static_total, experts))
    r = cfg.rollout
    if r.engine == "sglang" and r.mode == "colocated":
        engines = r.mem_fraction * gpu_memory_gib
        generating = static_total / GIB + engines
        line = (
            f"memory per GPU while generating (estimate, GiB): actor + teacher {static_total / GIB:.1f} + the "
            f"engines' rollout.mem_fraction={r.mem_fraction:g} {engines:.1f} = {generating:.1f} of "
            f"{gpu_memory_gib:g} GiB, leaving {gpu_memory_gib - generating:.1f} GiB for their activations and CUDA graphs"
        )
        if static_total / GIB >= gpu_memory_gib:
            line += " (the actor and the teacher alone do not fit)"
        elif gpu_memory_gib - generating < 0.1 * gpu_memory_gib:
            offload = "" if m.teacher_offload else " or set model.teacher_offload=true"
            line += f" (tight: lower rollout.mem_fraction{offload})"
        lines.append(line)
    if r.engine == "sglang" and r.mode == "disaggregated":
        dense = params_per_rank - experts_per_rank
        lines.append(_engine_gpu_line(cfg, (dense + experts_per_rank * m.ep) * m.tp * m.pp, gpu_memory_gib))
    teacher_pass = None
    if m.teacher_offload:
        teacher_pass, line = _teacher_pass_line(
            cfg, shape, params_per_rank, experts_per_rank, dp, gpu_memory_gib
        )
        lines.append(line)
    options = [(sp, rc, training_total(sp, rc)) for sp, rc in _options(cfg, shape.layers)]
    lines.append(
        "memory options, training total: "
        + "; ".join(
            f"{rc.describe()}{', sequence parallel' if sp else ''}: {gib:.1f} GiB" for sp, rc, gib in options
        )
    )
    if total > gpu_memory_gib:
        fitting = [
            f"{rc.overrides()} model.sequence_parallel={str(sp).lower()} ({gib:.1f} GiB)"
            for sp, rc, gib in options
            if gib <= gpu_memory_gib
        ]
        state = (
            f" (the state alone, params + grads + Adam + teacher, is {static_total / GIB:.1f} GiB: "
            "it needs more GPUs or larger ones)"
            if static_total / GIB > gpu_memory_gib
            else ""
        )
        lines.append(
            f"WARNING: memory: training needs about {total:.1f} GiB per GPU, more than --gpu-memory-gib "
            f"{gpu_memory_gib:g}; "
            + (
                "these fit: " + "; ".join(fitting)
                if fitting
                else f"no recompute / sequence-parallel setting fits{state}"
            )
        )
    if teacher_pass is not None and teacher_pass > gpu_memory_gib:
        lines.append(
            f"WARNING: memory: the offloaded teacher's forward and EMA update need about {teacher_pass:.1f} "
            f"GiB per GPU, more than --gpu-memory-gib {gpu_memory_gib:g}; recompute settings do not change it"
        )
    return lines


def _experts_line(
    cfg: Config, params_per_rank: float, experts_per_rank: float, dp: int, static_total: float, experts: dict
) -> str:
    """A MoE model: how much of each static term is the experts', and over which ranks."""
    m = cfg.model
    g = {k: v / GIB for k, v in experts.items()}
    all_experts = experts_per_rank * m.ep * m.tp * m.pp
    return (
        f"experts per GPU (estimate, GiB): {experts_per_rank / 1e9:.3f} B of this rank's "
        f"{params_per_rank / 1e9:.3f} B parameters ({all_experts / 1e9:.2f} B experts / (ep {m.ep} x tp {m.tp} "
        f"x pp {m.pp}); the other {(params_per_rank - experts_per_rank) / 1e9:.3f} B: the rest / (tp x pp)): "
        f"params {g['params']:.1f} + fp32 grads {g['grads']:.1f} + Adam {g['optimizer']:.1f} + EMA teacher "
        f"{g['teacher_weights'] + g['teacher_fp32']:.1f} (weights {g['teacher_weights']:.1f}, fp32 EMA values "
        f"{g['teacher_fp32']:.1f}) = {sum(g.values()):.1f} of the state's {static_total / GIB:.1f}; their Adam "
        f"and fp32 EMA values over the expert data-parallel size dp/ep = {dp}/{m.ep} = {dp // m.ep} (the ranks "
        f"holding the same experts), the rest's over dp {dp}"
    )


def _teacher_pass_line(
    cfg: Config,
    shape: ActivationShape,
    params_per_rank: float,
    experts_per_rank: float,
    dp: int,
    gpu_memory_gib: float,
) -> tuple[float, str]:
    """model.teacher_offload: the peak of the teacher's forward and EMA update, which bring all of it
    (weights and fp32 EMA values) back next to the actor's state. (GiB, the line)"""
    actor, _ = _rank_state(cfg, params_per_rank, experts_per_rank, dp, teacher_on_device=False)
    with_teacher, _ = _rank_state(cfg, params_per_rank, experts_per_rank, dp, teacher_on_device=True)
    teacher = sum(with_teacher.values()) - sum(actor.values())
    # a forward without grad keeps nothing: at most one layer's tensors and the vocab op's chunks
    one_layer = max(layer_bytes(shape, moe=moe)[0] for _, moe in _layer_kinds(shape))
    working = one_layer + activation_terms(shape)["vocab_chunks"]
    total = (sum(with_teacher.values()) + working) / GIB
    return total, (
        f"memory per GPU while the teacher runs (estimate, GiB; model.teacher_offload brings it back for its "
        f"forward and EMA update): actor {sum(actor.values()) / GIB:.1f} + teacher {teacher / GIB:.1f} "
        f"(weights {with_teacher['teacher_weights'] / GIB:.1f}, fp32 EMA values "
        f"{with_teacher['teacher_fp32'] / GIB:.1f}) + one layer's forward and the vocab op's chunks "
        f"{working / GIB:.1f} = {total:.1f} of {gpu_memory_gib:g} GiB"
    )


def _engine_gpu_line(cfg: Config, params: float, gpu_memory_gib: float) -> str:
    """Disaggregated engines: what each of their GPUs holds (``params``: the model's, padded)."""
    r = cfg.rollout
    held = r.mem_fraction * gpu_memory_gib
    weights = params * (4 if cfg.model.dtype == "float32" else 2) / r.engine_tp / GIB
    line = (
        f"memory per engine GPU (estimate, GiB; disaggregated, held all run): rollout.mem_fraction="
        f"{r.mem_fraction:g} {held:.1f} of {gpu_memory_gib:g} = weights {weights:.1f} (engine TP "
        f"{r.engine_tp}) + KV cache {held - weights:.1f}"
    )
    if weights > 0.8 * held:
        line += " (WARNING: little KV cache left: raise rollout.mem_fraction or rollout.engine_tp)"
    return line


def _tokens(shape: ActivationShape, sequence_parallel: bool) -> int:
    """The micro-batch's tokens, padded to a multiple of tp under sequence parallelism."""
    return -(-shape.tokens // shape.tp) * shape.tp if sequence_parallel else shape.tokens
