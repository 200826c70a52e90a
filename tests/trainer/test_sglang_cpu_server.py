"""The HTTP adapter (``rollout/sglang_engine.py``) against a real SGLang 0.5.23 server on the CPU
(the ``sglang`` tier's shared server): what it answers and refuses, weights loaded from shared
memory inside a weight-update session, the memory routes, and the log-probs it reports."""

import pytest
import torch

from srpo_megatron.data.tokenizer import load_tokenizer
from srpo_megatron.models.qwen3.tiny import TinyQwen3Config, build_tiny_qwen3
from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.sglang_engine import EngineError, SGLangEngine, WeightSyncError, serialize_tensors

# the tiny model of tiny_training.make_tiny_inputs, another seed: weights the server has not seen
SHAPE = TinyQwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16)


@pytest.mark.sglang
def test_adapter_against_a_real_cpu_server(sglang_server):
    engine = SGLangEngine.connect(sglang_server.url, timeout_s=300)
    client = engine.client
    info = engine.server_info()
    assert info["version"] == "0.5.23" and info["device"] == "cpu" and info["skip_tokenizer_init"] is True

    # unknown top-level fields are ignored; unknown sampling parameters and a missing required
    # field are refused with a 400 (not FastAPI's 422: SGLang validates the body itself)
    out = client.generate(input_ids=[[1]], sampling_params={"max_new_tokens": 1}, return_logprob=True, typo=1)
    assert len(out) == 1 and len(out[0]["output_ids"]) == 1
    with pytest.raises(EngineError, match="HTTP 400: .*seed"):
        client.generate(input_ids=[[1]], sampling_params={"seed": 1}, return_logprob=True)
    with pytest.raises(EngineError, match="HTTP 400: .*master_port.*Field required"):
        client.init_weights_update_group(master_address="127.0.0.1", rank_offset=1, world_size=2)

    # every weight of another model, as CPU tensors in shared-memory files, inside one session
    model = build_tiny_qwen3(load_tokenizer(), seed=7, config=SHAPE).eval()
    torch.multiprocessing.set_sharing_strategy("file_system")  # CPU tensors to a process not ours
    payload = serialize_tensors([(n, p.detach()) for n, p in model.named_parameters()])
    with pytest.raises(WeightSyncError, match="refused update_weights_from_tensor"):
        engine.update_weights_serialized([payload])  # outside a session
    engine.begin_weight_update()
    with pytest.raises(WeightSyncError, match="refused begin_weight_update"):
        engine.begin_weight_update()
    engine.update_weights_serialized([payload])
    engine.end_weight_update()
    engine.flush_cache()  # a plain-text answer

    # the memory routes answer on the CPU (nothing to free without the memory saver); the release
    # ends in the device synchronise that rollout/sglang_cpu/sitecustomize.py sends to the CPU
    engine.release_memory()
    engine.resume_memory(["weights"])
    engine.resume_memory(["kv_cache", "cuda_graph"])

    prompts = [[9707, 11, 1879, 0], [785, 4226]]
    batch = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=6, seed=0))
    engine.shutdown()
    assert batch.prompt_index == [0, 0, 0, 1, 1, 1]
    assert all(
        len(r) == 6 and f == "length" for r, f in zip(batch.response_ids, batch.finish_reasons, strict=True)
    )
    with torch.no_grad():  # the log-probs are the loaded model's, at temperature 1
        for p, r, logp in zip(batch.prompt_ids, batch.response_ids, batch.rollout_logp, strict=True):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1 : -1].float()
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
            assert (logp - expected).abs().max() < 1e-4
