"""The SGLang adapter against a fake client (messages, parsing, errors, timeouts) on CPU; a real
server in tests marked ``gpu``."""

import importlib.util
import time

import pytest
import torch
from tiny_qwen3 import tiny_qwen3_config

from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.sglang_engine import (
    MEMORY_TAGS,
    EngineError,
    SGLangEngine,
    WeightSyncError,
    request_seed,
    sampling_params_dict,
    serialize_tensors,
)
from srpo_megatron.rollout.sglang_fleet import SGLangFleet
from srpo_megatron.rollout.weight_sync.broadcast import _wait, update_message
from srpo_megatron.rollout.weight_sync.buckets import flatten_bucket

HAS_SGLANG = importlib.util.find_spec("sglang") is not None


class FakeEngine:
    """Answers like an SGLang server's routes (shapes of their return values), records every call."""

    def __init__(self, finish="length", answer=(True, "ok"), delay=0.0, **server_args):
        self.calls, self.finish, self.answer, self.delay = [], finish, answer, delay
        self.info = {"tp_size": 1, "enable_memory_saver": True, "enable_deterministic_inference": False}
        self.info |= server_args

    def server_info(self):
        return self.info

    def generate(self, input_ids, sampling_params, return_logprob):
        self.calls.append(("generate", input_ids, sampling_params, return_logprob))
        out = []
        for i in range(len(input_ids)):
            tokens = [100 + i, 7]
            out.append(
                {
                    "output_ids": tokens,
                    "meta_info": {
                        "output_token_logprobs": [(-0.5 * (i + 1), t, None) for t in tokens],
                        "finish_reason": {"type": self.finish, "matched": 7} if self.finish else None,
                    },
                }
            )
        return out

    def update_weights_from_distributed(self, **kwargs):
        time.sleep(self.delay)
        self.calls.append(("update_weights_from_distributed", kwargs))
        return self.answer

    def update_weights_from_tensor(self, **kwargs):
        self.calls.append(("update_weights_from_tensor", kwargs))
        return self.answer

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tags))

    def begin_weight_update(self, selector="all"):
        self.calls.append(("begin",))
        return self.answer

    def end_weight_update(self):
        self.calls.append(("end",))
        return self.answer

    def shutdown(self):
        raise ConnectionRefusedError("engine process is gone")


def test_generate_sends_one_request_per_sample_and_parses_logprobs():
    fake = FakeEngine(finish="stop")
    engine = SGLangEngine(fake, name="e0")
    params = SamplingParams(n=2, temperature=0.8, top_p=0.9, max_new_tokens=5, stop_token_ids=(7,), seed=4)
    batch = engine.generate([[1, 2], [3]], params, first_prompt=10)
    _, input_ids, sampling, return_logprob = fake.calls[0]
    assert input_ids == [[1, 2], [1, 2], [3], [3]] and return_logprob
    # one seed per (call seed, prompt's place in the step, sample)
    seeds = [request_seed(4, 10, 0), request_seed(4, 10, 1), request_seed(4, 11, 0), request_seed(4, 11, 1)]
    assert sampling == [sampling_params_dict(params, s) for s in seeds]
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert request_seed(4, 10, 1) == 8653874027683772221  # fixed across runs and processes
    assert sampling[0] == {
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": -1,
        "max_new_tokens": 5,
        "stop_token_ids": [7],
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "sampling_seed": seeds[0],
    }
    assert batch.prompt_index == [0, 0, 1, 1] and batch.response_ids[1] == [101, 7]
    assert torch.equal(batch.rollout_logp[1], torch.tensor([-1.0, -1.0]))
    assert batch.finish_reasons == ["stop"] * 4
    with pytest.raises(EngineError, match="unexpected SGLang finish_reason"):
        SGLangEngine(FakeEngine(finish=None)).generate([[1]], SamplingParams(seed=0))


def test_weight_update_requests_carry_the_protocol_message():
    fake = FakeEngine()
    engine = SGLangEngine(fake, tp_size=2, name="e0")
    _, meta = flatten_bucket([("model.norm.weight", torch.ones(4))])
    message = update_message(meta, "weights_pp0")
    _wait([("e0", engine.request_receive(message))], "bucket 0", timeout_s=5)
    assert fake.calls[-1] == ("update_weights_from_distributed", message)
    assert engine.world_size == 2
    engine.update_weights_serialized(["rank0", "rank1"])
    _, kwargs = fake.calls[-1]
    assert kwargs == {
        "serialized_named_tensors": ["rank0", "rank1"],
        "load_format": None,
        "flush_cache": False,
    }
    with pytest.raises(ValueError, match="'e0' has 2 TP ranks, got 1 payloads"):
        engine.update_weights_serialized(["rank0"])
    engine.release_memory()
    assert fake.calls[-1] == ("release", None)


def test_fleet_splits_prompts_over_engines_and_tracks_released_memory():
    fakes = [FakeEngine(finish="stop"), FakeEngine(finish="stop")]
    fleet = SGLangFleet([SGLangEngine(f, name=f"e{i}") for i, f in enumerate(fakes)], colocated=True)
    finished = []  # progress: each engine's samples as its share comes back
    batch = fleet.generate(
        [[1], [2, 2], [3, 3, 3]], SamplingParams(n=2, max_new_tokens=4, seed=3), finished.append
    )
    assert sorted(finished) == [2, 4]
    assert [c[1] for c in fakes[0].calls] == [[[1], [1]]]  # contiguous shares: prompt 0 | prompts 1, 2
    assert [c[1] for c in fakes[1].calls] == [[[2, 2], [2, 2], [3, 3, 3], [3, 3, 3]]]
    # the seeds follow the prompts' places in the step, not in an engine's share
    assert [p["sampling_seed"] for p in fakes[1].calls[0][2]] == [
        request_seed(3, prompt, sample) for prompt in (1, 2) for sample in (0, 1)
    ]
    assert batch.prompt_index == [0, 0, 1, 1, 2, 2]
    assert batch.prompt_ids == [[1], [1], [2, 2], [2, 2], [3, 3, 3], [3, 3, 3]]
    assert batch.response_ids[2] == [100, 7]  # the second engine's first output

    fleet.resume_weights()  # a fresh engine has released nothing: nothing to resume
    fleet.resume_rest()
    assert all(len(f.calls) == 1 for f in fakes)
    fleet.release_memory()
    fleet.release_memory()  # once only
    fleet.resume_weights()
    fleet.resume_rest()
    for f in fakes:
        assert f.calls[1:] == [
            ("release", list(MEMORY_TAGS)),
            ("resume", ["weights"]),
            ("resume", ["kv_cache", "cuda_graph"]),
        ]
    # colocated loads: engine i gets the payloads made on its own GPUs, in rank order
    wide = [FakeEngine(), FakeEngine()]
    fleet = SGLangFleet([SGLangEngine(f, tp_size=2) for f in wide], colocated=True)
    fleet.load_serialized(["gpu0", "gpu1", "gpu2", "gpu3"])
    assert [f.calls[-1][1]["serialized_named_tensors"] for f in wide] == [["gpu0", "gpu1"], ["gpu2", "gpu3"]]
    with pytest.raises(ValueError, match="3 payloads for 2 engines x TP 2"):
        fleet.load_serialized(["gpu0", "gpu1", "gpu2"])
    # every session is closed even when one engine refuses; the first refusal is raised
    refusing, fine = FakeEngine(answer=(False, "no session open")), FakeEngine()
    fleet = SGLangFleet([SGLangEngine(refusing, name="r"), SGLangEngine(fine)], colocated=True)
    with pytest.raises(WeightSyncError, match="'r' refused end_weight_update: no session open"):
        fleet.end_weight_update(flush=False)
    assert refusing.calls == [("end",)] and fine.calls == [("end",)]
    fleet.connect()  # servers started elsewhere: a session left open by a crashed run is closed, quietly
    assert refusing.calls == [("end",)] * 2 and fine.calls == [("end",)] * 2


def test_fleet_refuses_servers_started_without_the_flags_the_run_needs():
    """Without the memory saver SGLang's release frees nothing, without deterministic inference it
    ignores the sampling seeds: both would pass silently, so connect() refuses, naming the flag."""
    cases = [
        (
            {"enable_memory_saver": False},
            {},
            "enable_memory_saver=False: start it with --enable-memory-saver",
        ),
        (
            {},
            {"deterministic": True},
            "enable_deterministic_inference=False: start it with --enable-deterministic-inference \\(rollout.deterministic\\)",
        ),
        ({"tp_size": 2}, {}, "tp_size=2: start it with --tp-size 1 \\(rollout.engine_tp\\)"),
    ]
    for server_args, fleet_args, message in cases:
        fake = FakeEngine(**server_args)
        fleet = SGLangFleet([SGLangEngine(fake, name="e0")], colocated=True, **fleet_args)
        with pytest.raises(EngineError, match=f"engine 'e0' runs with {message}"):
            fleet.connect()
        assert fake.calls == []  # refused before anything else was asked of it
    deterministic = FakeEngine(enable_deterministic_inference=True)
    SGLangFleet([SGLangEngine(deterministic)], colocated=True, deterministic=True).connect()


def test_refusal_death_and_timeout_are_clear_errors():
    refusing = SGLangEngine(FakeEngine(answer=(False, "shape mismatch for q_proj")), name="e1")
    with pytest.raises(WeightSyncError, match="'e1' refused bucket 3: shape mismatch for q_proj"):
        _wait([("e1", refusing.request_receive({"names": []}))], "bucket 3", timeout_s=5)
    with pytest.raises(WeightSyncError, match="'e1' refused update_weights_from_tensor: shape mismatch"):
        refusing.update_weights_serialized(["rank0"])
    with pytest.raises(EngineError, match="'e1': shutdown failed: ConnectionRefusedError"):
        refusing.call("shutdown")
    slow = SGLangEngine(FakeEngine(delay=2.0), name="e2", timeout_s=0.2)
    with pytest.raises(WeightSyncError, match="'e2' did not answer bucket 0 within 0.2 s"):
        _wait([("e2", slow.request_receive({}))], "bucket 0", timeout_s=0.2)


def test_serialising_weights_leaves_tensor_pickling_of_the_process_alone():
    """SGLang's own producers patch torch's tensor reduction for the whole process, after which a
    CPU tensor no longer pickles (IndexError); ours changes only the pickler of the payload."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    from torch.multiprocessing import reductions

    torch.multiprocessing.set_sharing_strategy("file_system")
    payload = serialize_tensors([("w", torch.arange(6.0))])
    assert payload
    assert ForkingPickler._extra_reducers[torch.Tensor] is reductions.reduce_tensor
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(torch.ones(3))
    assert torch.equal(pickle.loads(buffer.getvalue()), torch.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_payload_names_the_device_by_uuid_and_cpu_tensors_still_pickle():
    import base64
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    seen = []

    class Peek(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
                return lambda *args: seen.append(args[6])
            return super().find_class(module, name)

    weight = torch.ones(4, device="cuda")
    Peek(io.BytesIO(base64.b64decode(serialize_tensors([("w", weight)])))).load()
    assert seen == [str(torch.cuda.get_device_properties(weight.device).uuid)]
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(torch.ones(3))  # IndexError after SGLang's process-wide patch
    assert torch.equal(pickle.loads(buffer.getvalue()), torch.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_SGLANG, reason="needs CUDA and sglang")
def test_real_sglang_colocated_update_release_resume_generate(tmp_path):
    """One GPU: a tiny random Qwen3 saved as HF, served by sglang.launch_server; new weights
    through update_weights_from_tensor must change the engine's log-probs to the HF model's."""
    from transformers import Qwen3ForCausalLM

    from srpo_megatron.rollout.sglang_server import ServerSpec, launch_server, wait_until_healthy
    from srpo_megatron.runtime.distributed import find_free_port

    config = tiny_qwen3_config()
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    target = Qwen3ForCausalLM(config).cuda().eval()
    spec = ServerSpec(
        str(tmp_path / "model"), port=find_free_port(), mem_fraction=0.3, memory_saver=True, dtype="float32"
    )
    server = launch_server(spec, tmp_path)
    try:
        wait_until_healthy([server], timeout_s=900)
        engine = SGLangEngine.connect(server.url)
        engine.release_memory()
        engine.resume_memory(tags=["weights"])
        engine.begin_weight_update()
        named = [(n, p.detach()) for n, p in target.named_parameters()]
        engine.update_weights_serialized([serialize_tensors(named)])
        engine.end_weight_update()
        engine.resume_memory(tags=[t for t in MEMORY_TAGS if t != "weights"])
        engine.flush_cache()
        batch = engine.generate([[5, 6, 7]], SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=0))
        for prompt, ids, logp in zip(batch.prompt_ids, batch.response_ids, batch.rollout_logp, strict=True):
            seq = torch.tensor([prompt + ids], device="cuda")
            with torch.no_grad():
                ref = target(seq).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
            ref = ref.gather(-1, seq[0, len(prompt) :, None]).squeeze(-1).cpu()
            torch.testing.assert_close(logp, ref, atol=2e-3, rtol=0)
    finally:
        server.stop()
