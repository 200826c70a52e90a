"""HF-transformers rollout engine: the CPU default and a one-GPU debug engine.

It samples with its own decode loop over the HF model (KV cache, left padding) instead of
``model.generate``, for three reasons: the log-prob of each sampled token comes from the very
distribution it was drawn from (logits / temperature, then top-p renormalised), with no second
forward; only one step's ``[N, V]`` logits are alive at a time (``output_scores`` would keep
``[N, T, V]``: 20 GiB for 64 x 512 tokens of Qwen3's 151,936 vocabulary); and sampling draws from a
private ``torch.Generator``, so a seed fixes the samples without touching the global RNG.

Weights come in by HF name (``update_weights``, from ``weight_sync/in_process.py``), the same
stream SGLang receives, so a mapping bug in the exporter shows up here as a train/rollout log-prob
gap.
"""

from collections.abc import Callable, Iterable, Sequence

import torch

from srpo_megatron.rollout.engine import FinishReason, RolloutBatch, SamplingParams


def sample_top_p(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return ``(token [N], logp [N])`` under the distribution sampled from.

    logits: [N, V]. Temperature first, then the smallest set of tokens whose probability reaches
    ``top_p`` is kept (at least one) and renormalised.
    """
    scaled = logits.float() / temperature  # [N, V]
    if top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    # not log_softmax: on the CPU its fp32 sum drops much of the tail of a peaked distribution over a
    # large vocabulary (1.6e-4 too high at the peak of a 152k-vocab row with 2.6e-3 tail mass);
    # logsumexp keeps it (4e-7), as the actor's vocab-parallel op does
    logp_all = scaled - scaled.logsumexp(-1, keepdim=True)  # [N, V]
    token = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)  # [N]
    return token, logp_all.gather(-1, token[:, None]).squeeze(-1)


class HFEngine:
    """Rollouts from an HF causal LM (e.g. ``Qwen3ForCausalLM``) held in this process.

    pad_token_id: any id; it only fills positions the attention mask hides.
    max_batch_size: samples per decode batch (``None``: all ``B * n`` at once).
    """

    def __init__(self, model: torch.nn.Module, *, pad_token_id: int = 0, max_batch_size: int | None = None):
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.params = dict(model.named_parameters())  # tied weights appear once, under the input name

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
        responses, logps, reasons = [], [], []
        for start in range(0, len(prompt_index), step):
            chunk = [list(prompt_ids[i]) for i in prompt_index[start : start + step]]
            r, lp, fr = self._generate_batch(chunk, params, generator)
            responses += r
            logps += lp
            reasons += fr
            if on_done is not None:
                on_done(len(chunk))
        return RolloutBatch(
            prompt_index=prompt_index,
            prompt_ids=[list(prompt_ids[i]) for i in prompt_index],
            response_ids=responses,
            rollout_logp=logps,
            finish_reasons=reasons,
        )

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, generator):
        n, device = len(prompts), self.device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        for row, p in enumerate(prompts):  # left padding: the next token is always at column -1
            input_ids[row, width - len(p) :] = torch.tensor(p, device=device)
            mask[row, width - len(p) :] = 1
        stop = torch.tensor(params.stop_token_ids or [-1], device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        tokens, logps = [], []
        past = None
        step_ids = input_ids
        for _ in range(params.max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
            )
            past = out.past_key_values
            token, logp = sample_top_p(out.logits[:, -1], params.temperature, params.top_p, generator)
            token = token.masked_fill(done, self.pad_token_id)
            tokens.append(token)
            logps.append(logp)
            mask = torch.cat([mask, (~done).long()[:, None]], dim=-1)
            done = done | torch.isin(token, stop)
            step_ids = token[:, None]
            if done.all():
                break
        tokens_t = torch.stack(tokens, 1).cpu()  # [N, T]
        logps_t = torch.stack(logps, 1).cpu()  # [N, T]
        lengths = (mask[:, width:].sum(-1)).cpu()  # tokens generated before (and including) the stop
        responses = [tokens_t[i, : lengths[i]].tolist() for i in range(n)]
        logp_list = [logps_t[i, : lengths[i]].clone() for i in range(n)]
        stop_set = set(params.stop_token_ids)
        reasons: list[FinishReason] = ["stop" if r and r[-1] in stop_set else "length" for r in responses]
        return responses, logp_list, reasons

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
