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
    for ids, logp, reason in zip(batch.response_ids, batch.rollout_logp, batch.finish_reasons, strict=True):
        assert len(ids) == logp.numel() >= 1
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
