"""HF-transformers rollout engine: the CPU default and a one-GPU debug engine.

It samples with its own decode loop over the HF model (KV cache, left padding) instead of
``model.generate``, for three reasons: the log-prob of each sampled token comes from the very
distribution it was drawn from (logits / temperature, then top-p renormalised), with no second
forward; only one step's ``[N, V]`` logits are alive at a time (``output_scores`` would keep
``[N, T, V]``: 20 GiB for 64 x 512 tokens of Qwen3's 151,936 vocabulary); and sampling draws from a
private ``torch.Generator``, so a seed fixes the samples without touching the global RNG.

With ``SamplingParams.record_routes`` a Qwen3-MoE's routers' choices are recorded at every position
the model reads (``_RouteRecorder``: routing replay, trainer/expert_routes.py).

Weights come in by HF name (``update_weights``, from ``weight_sync/in_process.py``), the same
stream SGLang receives, so a mapping bug in the exporter shows up here as a train/rollout log-prob
gap.
"""

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch

from srpo_megatron.models.qwen3.mapping import hf_checkpoint_views
from srpo_megatron.rollout.engine import FinishReason, RolloutBatch, SamplingParams

_BLOCK = 1024  # vocabulary entries per block of the two-level inverse CDF
_CANDIDATES = 64  # top tokens searched for the nucleus before falling back to a full sort


def sample_top_p(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return ``(token [N], logp [N])`` under the distribution sampled from.

    logits: [N, V]. Temperature first, then the smallest set of tokens whose probability reaches
    ``top_p`` is kept (at least one) and renormalised.

    One uniform per row, inverted through the CDF (``torch.multinomial`` draws an exponential per
    vocabulary entry instead: 152k random numbers per token, half of a tiny model's decode time on
    a CPU). The nucleus is looked for among the top ``_CANDIDATES`` tokens and the vocabulary is
    sorted only for the rows whose nucleus is larger.
    """
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature  # [N, V]
    peak = scaled.amax(-1, keepdim=True)  # [N, 1]
    weights = (scaled - peak).exp_()  # [N, V] unnormalised probabilities, 1 at the peak
    u = torch.rand(scaled.shape[0], generator=generator, dtype=torch.float64, device=scaled.device)
    if top_p < 1.0:
        token, mass = _sample_nucleus(weights, top_p, u)
    else:
        token, mass = _sample_all(weights, u)
    # log w - log(mass) with log w taken from the logits, not from its rounded exp
    logp = (scaled.gather(-1, token[:, None]) - peak).squeeze(-1).double() - mass.log()
    return token, logp.float()


def _sample_all(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF over the whole vocabulary in two levels: a block by the fp64 cumulative sum of
    the blocks' sums, then a token within it. Returns (token [N], total weight [N] fp64)."""
    n, vocab = weights.shape
    full = vocab - vocab % _BLOCK
    sums = weights[:, :full].view(n, -1, _BLOCK).sum(-1)  # [N, full / _BLOCK]
    if full < vocab:
        sums = torch.cat([sums, weights[:, full:].sum(-1, keepdim=True)], dim=-1)
    block_cdf = sums.cumsum(-1, dtype=torch.float64)  # [N, blocks]
    total = block_cdf[:, -1]
    target = u * total  # [N] in [0, total)
    block = torch.searchsorted(block_cdf, target[:, None], right=True).clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)  # [N, 1]
    ids = block * _BLOCK + torch.arange(_BLOCK, device=weights.device)  # [N, _BLOCK]
    inside = weights.gather(-1, ids.clamp(max=vocab - 1)).masked_fill(ids >= vocab, 0.0)
    cdf = inside.cumsum(-1, dtype=torch.float64) + before  # [N, _BLOCK]
    j = torch.searchsorted(cdf, target[:, None], right=True).clamp_(max=_BLOCK - 1)
    # the top end of a block (rounding): the block's last token of nonzero weight
    j = torch.minimum(j, (inside > 0).cumsum(-1).argmax(-1, keepdim=True))
    return ids.gather(-1, j).squeeze(-1), total


def _sample_nucleus(
    weights: torch.Tensor, top_p: float, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse CDF over the nucleus, found among the top ``_CANDIDATES`` tokens (rows whose nucleus
    is larger sort their whole vocabulary). Returns (token [N], the nucleus' weight [N] fp64)."""
    total = weights.sum(-1, dtype=torch.float64)  # [N]
    top_w, top_ids = weights.topk(min(_CANDIDATES, weights.shape[-1]), dim=-1)  # descending
    token, mass = _draw_sorted(top_w, top_ids, total, top_p, u)
    wide = (top_w.sum(-1, dtype=torch.float64) < top_p * total).nonzero().squeeze(-1)
    if wide.numel():
        w, ids = weights[wide].sort(-1, descending=True)
        token[wide], mass[wide] = _draw_sorted(w, ids, total[wide], top_p, u[wide])
    return token, mass


def _draw_sorted(w, ids, total, top_p: float, u):
    """w: [n, c] weights in descending order with the nucleus among them, ids: their tokens. A token
    stays when the weight before it is under top_p of the total (the first always stays)."""
    cum = w.cumsum(-1, dtype=torch.float64)  # [n, c]
    kept = torch.where(cum - w < top_p * total[:, None], cum, 0.0).amax(-1)  # [n] the nucleus' weight
    j = torch.searchsorted(cum, (u * kept)[:, None], right=True).clamp_(max=w.shape[-1] - 1)
    return ids.gather(-1, j).squeeze(-1), kept


class HFEngine:
    """Rollouts from an HF causal LM (e.g. ``Qwen3ForCausalLM``) held in this process.

    pad_token_id: any id; it only fills positions the attention mask hides.
    max_batch_size: samples per decode batch (``None``: all ``B * n`` at once).
    num_threads: torch's intra-op threads while generating (``None``: as they are). The trainer
    gives the engine the cores of the local ranks that wait for its rollouts.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int = 0,
        max_batch_size: int | None = None,
        num_threads: int | None = None,
    ):
        self.model = model.eval()
        self.num_threads = num_threads
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        # by checkpoint name (tied weights once, under the input name; a MoE model's fused experts
        # as per-expert views): the names weight syncs send
        self.params = hf_checkpoint_views(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        params: SamplingParams,
        on_done: Callable[[int], None] | None = None,
    ) -> RolloutBatch:
        """Samples in decode batches of ``max_batch_size``; ``on_done`` hears after each batch."""
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt: every prompt needs at least one token")
        prompt_index = [i for i in range(len(prompt_ids)) for _ in range(params.n)]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        step = self.max_batch_size or max(len(prompt_index), 1)
        responses, logps, reasons, routes = [], [], [], []
        threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads or threads)
        try:
            for start in range(0, len(prompt_index), step):
                chunk = [list(prompt_ids[i]) for i in prompt_index[start : start + step]]
                r, lp, fr, rt = self._generate_batch(chunk, params, generator)
                responses += r
                logps += lp
                reasons += fr
                routes += rt or []
                if on_done is not None:
                    on_done(len(chunk))
        finally:
            torch.set_num_threads(threads)
        return RolloutBatch(
            prompt_index=prompt_index,
            prompt_ids=[list(prompt_ids[i]) for i in prompt_index],
            response_ids=responses,
            rollout_logp=logps,
            finish_reasons=reasons,
            routed_experts=routes if params.record_routes else None,
        )

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, generator):
        n, device = len(prompts), self.device
        recorder = _RouteRecorder(self.model) if params.record_routes else None
        prompt_lens = torch.tensor([len(p) for p in prompts])
        if recorder is not None:  # [n, position, layers, k], -1 where the model reads nothing
            routes = torch.full(
                (n, int(prompt_lens.max()) + params.max_new_tokens, *recorder.shape), -1, dtype=torch.int16
            )
        width = max(len(p) for p in prompts)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        for row, p in enumerate(prompts):  # left padding: the next token is always at column -1
            input_ids[row, width - len(p) :] = torch.tensor(p, device=device)
            mask[row, width - len(p) :] = 1
        stop = torch.tensor(params.stop_token_ids or [-1], device=device)
        tokens = torch.zeros((n, params.max_new_tokens), dtype=torch.long)
        logps = torch.zeros((n, params.max_new_tokens))
        lengths = torch.zeros(n, dtype=torch.long)
        alive = torch.arange(n)  # the rows still generating: a finished row leaves the batch (and the cache)
        past = None
        step_ids = input_ids
        for t in range(params.max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            with recorder or contextlib.nullcontext():
                out = self.model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=position_ids,
                    past_key_values=past,
                    use_cache=True,
                    logits_to_keep=1,
                )
            if recorder is not None:
                chosen = recorder.take(step_ids.shape).cpu()  # [rows, tokens, layers, k]
                if t == 0:  # the prompts, left-padded
                    for row, length in enumerate(prompt_lens.tolist()):
                        routes[row, :length] = chosen[row, width - length :]
                else:  # the response token sampled at step t - 1
                    routes[alive, prompt_lens[alive] + t - 1] = chosen[:, 0]
            past = out.past_key_values
            token, logp = sample_top_p(out.logits[:, -1], params.temperature, params.top_p, generator)
            tokens[alive, t], logps[alive, t] = token.cpu(), logp.cpu()
            lengths[alive] += 1
            going = ~torch.isin(token, stop)
            if not going.any():
                break
            if not going.all():
                keep = going.nonzero().squeeze(-1)
                past.batch_select_indices(keep)
                alive, mask, token = alive[keep.cpu()], mask[keep], token[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            step_ids = token[:, None]
        responses = [tokens[i, : lengths[i]].tolist() for i in range(n)]
        logp_list = [logps[i, : lengths[i]].clone() for i in range(n)]
        stop_set = set(params.stop_token_ids)
        reasons: list[FinishReason] = ["stop" if r and r[-1] in stop_set else "length" for r in responses]
        if recorder is None:
            return responses, logp_list, reasons, None
        route_list = [routes[i, : prompt_lens[i] + lengths[i]].clone() for i in range(n)]
        return responses, logp_list, reasons, route_list

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model. Unknown names and shape mismatches are errors
        (tied models take ``model.embed_tokens.weight`` only; the exporter does not send lm_head)."""
        for name, tensor in named_tensors:
            param = self.params.get(name)
            if param is None:
                hint = " (tied to model.embed_tokens.weight)" if name == "lm_head.weight" else ""
                raise ValueError(f"engine model has no parameter {name!r}{hint}")
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: engine shape {tuple(param.shape)}, received {tuple(tensor.shape)}")
            param.copy_(tensor)

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """What the engine holds, by HF name (for ``weight_sync.verify``)."""
        return ((name, p.detach()) for name, p in self.params.items())

    def release_memory(self) -> None:
        """Nothing to release: the HF engine keeps its weights (CPU / debug use)."""

    def shutdown(self) -> None:
        """Nothing to stop: the model goes with this process."""


class _RouteRecorder:
    """Within ``with``: the experts each MoE layer's router of an HF Qwen3-MoE chooses, from a
    forward hook on its gate. The choice is re-derived from the gate's logits as HF's router makes
    it (top-k of their fp32 softmax: transformers 4.x's ``Qwen3MoeSparseMoeBlock`` and 5.x's
    ``Qwen3MoeTopKRouter`` alike, the gate returning the logits alone or first)."""

    def __init__(self, model: torch.nn.Module):
        config = model.config
        self.gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "experts")]
        if not self.gates:
            raise ValueError("record_routes: the engine's model has no mixture-of-experts layer")
        self.k = config.num_experts_per_tok
        self.shape = (len(self.gates), self.k)
        self._chosen: list[torch.Tensor] = []
        self._handles = []

    def _hook(self, module, args, output):
        logits = output[0] if isinstance(output, tuple) else output  # [tokens, experts]
        self._chosen.append(torch.topk(logits.float().softmax(-1), self.k, dim=-1).indices)

    def __enter__(self):
        self._chosen = []
        self._handles = [gate.register_forward_hook(self._hook) for gate in self.gates]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def take(self, input_shape: torch.Size) -> torch.Tensor:
        """The forward just run's choices: [rows, tokens, layers, k] for input ids of ``input_shape``."""
        assert len(self._chosen) == len(self.gates), (len(self._chosen), len(self.gates))
        chosen = torch.stack(self._chosen, dim=1).view(*input_shape, len(self.gates), self.k)
        self._chosen = []
        return chosen.to(torch.int16)
