"""The HF rollout engine: seeded sampling, log-probs of the sampled distribution, stop/length,
strict weight loading."""

import pytest
import torch
from tiny_qwen3 import TINY_QWEN3

from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.hf_engine import HFEngine, sample_top_p
from srpo_megatron.rollout.weight_sync.buckets import iter_buckets
from srpo_megatron.rollout.weight_sync.verify import compare_checksums, weight_checksums

TINY = {**TINY_QWEN3, "tie_word_embeddings": True}
PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 9], [42]]


def tiny_model(seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**TINY)).eval()


@pytest.fixture(scope="module")
def engine():
    return HFEngine(tiny_model(0))


def full_forward_logp(model, prompt, response, temperature):
    """Reference: one unpadded forward over prompt + response, logits / temperature."""
    seq = torch.tensor([prompt + response], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt) - 1 : -1].float() / temperature  # [T, V]
    return logits.log_softmax(-1).gather(-1, seq[0, len(prompt) :, None]).squeeze(-1).cpu()


def test_same_seed_same_samples_and_logp_of_the_sampled_distribution(engine):
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=6, seed=11)
    a, b = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    c = engine.generate(PROMPTS, SamplingParams(n=3, temperature=0.7, max_new_tokens=6, seed=12))
    assert a.response_ids == b.response_ids and a.response_ids != c.response_ids
    assert len(a) == 9 and a.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert a.prompt_ids[3] == PROMPTS[1]
    for i in range(len(a)):
        # batched, left-padded, KV-cached decoding == one plain forward, at the temperature
        ref = full_forward_logp(engine.model, a.prompt_ids[i], a.response_ids[i], 0.7)
        torch.testing.assert_close(a.rollout_logp[i], ref, atol=1e-5, rtol=0)
    # the global RNG is untouched by seeded sampling
    state = torch.get_rng_state()
    engine.generate(PROMPTS, params)
    assert torch.equal(state, torch.get_rng_state())


def test_stop_and_length_finish_reasons(engine):
    stop = tuple(range(200))  # a fifth of the vocabulary: a near-uniform model stops now and then
    batch = engine.generate(PROMPTS, SamplingParams(n=4, max_new_tokens=5, stop_token_ids=stop, seed=0))
    assert set(batch.finish_reasons) == {"stop", "length"}
    assert len({len(ids) for ids in batch.response_ids}) > 2  # rows left the decode batch at different steps
    for prompt, ids, logp, reason in zip(
        batch.prompt_ids, batch.response_ids, batch.rollout_logp, batch.finish_reasons, strict=True
    ):
        assert len(ids) == logp.numel() >= 1
        # the rows that stay decode on with the finished ones gone from the batch and the KV cache
        torch.testing.assert_close(logp, full_forward_logp(engine.model, prompt, ids, 1.0), atol=1e-5, rtol=0)
        assert all(t not in stop for t in ids[:-1])  # nothing after the stop token
        if reason == "stop":
            assert ids[-1] in stop
        else:
            assert len(ids) == 5 and ids[-1] not in stop


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = [sample_top_p(logits, 1.0, 0.7, gen) for _ in range(200)]
    tokens = {int(t) for t, _ in draws}
    assert tokens == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    for t, logp in draws:
        assert float(logp) == pytest.approx(
            float(torch.log(torch.tensor([0.5, 0.3]) / 0.8)[int(t)]), abs=1e-6
        )
    t, logp = sample_top_p(logits, 1.0, 0.4, gen)  # the top token alone already reaches p
    assert int(t) == 0 and float(logp) == pytest.approx(0.0, abs=1e-6)


def draw(logits, top_p, rows, seed=0):
    """``rows`` samples from the one distribution ``logits`` [V]."""
    return sample_top_p(logits.expand(rows, -1), 1.0, top_p, torch.Generator().manual_seed(seed))


def test_sampled_frequencies_match_the_distribution_across_vocabulary_blocks():
    """3,000 tokens: two full blocks of the two-level inverse CDF and a partial one; the heavy
    tokens sit at the blocks' edges and at the last id."""
    probs = torch.full((3000,), 0.2 / 2995)
    heavy = {0: 0.1, 1023: 0.15, 1024: 0.2, 2047: 0.05, 2999: 0.3}
    for token, p in heavy.items():
        probs[token] = p
    rows = 20_000
    tokens, logp = draw(probs.log(), 1.0, rows)
    torch.testing.assert_close(logp, probs.log()[tokens], atol=1e-6, rtol=0)
    counts = torch.bincount(tokens, minlength=3000).double()
    for token, p in heavy.items():  # within 5 standard deviations of the expected count
        assert abs(counts[token] - rows * p) < 5 * (rows * p * (1 - p)) ** 0.5, token
    light = counts.sum() - sum(counts[t] for t in heavy)
    assert abs(light - rows * 0.2) < 5 * (rows * 0.2 * 0.8) ** 0.5


def test_a_nucleus_wider_than_the_candidates_is_found_by_a_full_sort():
    """top-p 0.5 of a gently sloped distribution over 3,000 tokens: 645 tokens, far more
    than the top candidates searched first. Next to it, a peaked row, whose nucleus is among them."""
    flat = -torch.arange(3000.0) / 1000  # token 0 most likely
    peaked = torch.full((3000,), -20.0)
    peaked[[7, 8, 9]] = torch.tensor([0.0, 0.0, -3.0])
    for logits, nucleus_size in ((flat, None), (peaked, 2)):
        probs = logits.softmax(-1).double()
        order = probs.argsort(descending=True)
        keep = (probs[order].cumsum(0) - probs[order]) < 0.5
        nucleus = order[keep]
        if nucleus_size is not None:
            assert len(nucleus) == nucleus_size
        else:
            assert len(nucleus) == 645
        tokens, logp = draw(logits, 0.5, 4000)
        assert set(tokens.tolist()) <= set(nucleus.tolist())
        assert len(set(tokens.tolist())) > 0.5 * len(nucleus)
        renorm = (probs / probs[nucleus].sum()).log().float()
        torch.testing.assert_close(logp, renorm[tokens], atol=1e-5, rtol=0)
    both = torch.stack([flat, peaked])
    tokens, _ = sample_top_p(both, 1.0, 0.5, torch.Generator().manual_seed(1))
    assert int(tokens[0]) < 645 and int(tokens[1]) in (7, 8)


def test_logp_is_exact_on_a_peaked_distribution_over_a_large_vocabulary():
    """A confident model over Qwen3's 151,936 tokens: the sampled token's log-prob must keep the
    tail mass (torch's fp32 CPU log_softmax was 1.6e-4 off here, the train/rollout gap we saw)."""
    logits = (
        torch.full((4, 151936), -18.0)
        + torch.randn(4, 151936, generator=torch.Generator().manual_seed(0)) * 0.5
    )
    logits[:, 5] = 0.0  # tail mass about 2.6e-3
    token, logp = sample_top_p(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    exact = torch.log_softmax(logits.double(), -1).gather(-1, token[:, None])[:, 0]
    assert (logp.double() - exact).abs().max() < 2e-6


def test_update_weights_is_strict_and_makes_engines_identical(engine):
    other = HFEngine(tiny_model(1))
    buckets = list(iter_buckets(engine.named_weights(), bucket_bytes=50_000))
    assert len(buckets) > 1
    for bucket in buckets:
        other.update_weights(bucket)
    assert (
        compare_checksums(weight_checksums(engine.named_weights()), weight_checksums(other.named_weights()))
        == []
    )
    params = SamplingParams(n=2, max_new_tokens=4, seed=3)
    assert other.generate(PROMPTS, params).response_ids == engine.generate(PROMPTS, params).response_ids
    with pytest.raises(ValueError, match="no parameter 'lm_head.weight' \\(tied"):
        other.update_weights([("lm_head.weight", torch.zeros(1000, 64))])
    with pytest.raises(ValueError, match=r"model.norm.weight: engine shape \(64,\), received \(63,\)"):
        other.update_weights([("model.norm.weight", torch.zeros(63))])


def test_bad_sampling_params_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_gpu_debug_engine_matches_a_plain_forward():
    engine = HFEngine(tiny_model(0).cuda())
    batch = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.9, max_new_tokens=8, seed=0))
    for prompt, ids, logp in zip(batch.prompt_ids, batch.response_ids, batch.rollout_logp, strict=True):
        assert logp.device.type == "cpu"
        torch.testing.assert_close(logp, full_forward_logp(engine.model, prompt, ids, 0.9), atol=1e-4, rtol=0)


def test_progress_reports_each_decode_batch():
    """9 samples in decode batches of 4: progress hears 4, 4, 1."""
    batched = HFEngine(tiny_model(0), max_batch_size=4)
    params = SamplingParams(n=3, max_new_tokens=4, seed=5)
    finished = []
    batch = batched.generate(PROMPTS, params, on_done=finished.append)
    assert finished == [4, 4, 1]
    assert len(batch) == 9


def test_recorded_routes_are_the_routers_choices_of_a_plain_forward():
    """``record_routes`` on a Qwen3-MoE with a dense layer: per position the experts its routers chose
    in the left-padded, KV-cached decode equal those of one plain forward over prompt + response
    (rows leaving the batch included); the response's last token, never read, is -1."""
    from tiny_qwen3 import tiny_qwen3_moe_config
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(tiny_qwen3_moe_config(num_hidden_layers=3, mlp_only_layers=[1])).eval()
    engine = HFEngine(model, max_batch_size=4)
    stop = tuple(range(200))
    params = SamplingParams(n=3, max_new_tokens=5, stop_token_ids=stop, seed=0, record_routes=True)
    batch = engine.generate(PROMPTS, params)
    assert len({len(ids) for ids in batch.response_ids}) > 1
    gates = [model.model.layers[i].mlp.gate for i in (0, 2)]
    for prompt, response, routes in zip(
        batch.prompt_ids, batch.response_ids, batch.routed_experts, strict=True
    ):
        assert routes.shape == (len(prompt) + len(response), 2, 2) and routes.dtype == torch.int16
        chosen: list[torch.Tensor] = []
        hooks = [g.register_forward_hook(lambda m, a, out, c=chosen: c.append(out[2])) for g in gates]
        with torch.no_grad():
            model(torch.tensor([prompt + response]))
        for h in hooks:
            h.remove()
        reference = torch.stack(chosen, dim=1)  # [positions, layers, k], HF's own top-k
        assert torch.equal(routes[:-1].sort(-1).values, reference[:-1].sort(-1).values.to(torch.int16))
        assert (routes[-1] == -1).all()
    assert engine.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=2, seed=0)).routed_experts is None
