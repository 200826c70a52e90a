"""A stand-in SGLang server for CPU tests: sglang 0.5.23's HTTP routes and weight-update protocol,
answered by the HF engine. Not an inference engine (one request at a time, a small HF model).

What the tests check against the real server (0.5.23 on the CPU, the ``sglang`` test tier) they
do not check here. The stand-in is for what a real server cannot give a CPU test: deaths on
demand (one real start per death costs 30-90 s), and ``--enable-deterministic-inference`` and
``--enable-memory-saver``, which SGLang has only on GPUs.

    python -m srpo_megatron.testing.fake_sglang_server --model-path DIR --port 30000 [sglang flags]

It takes ``launch_server``'s flags (``rollout/sglang_server.py``) and is as strict and as lax as
SGLang 0.5.23 (read in its wheel: ``srt/entrypoints/http_server.py``, ``srt/managers/io_struct.py``,
``api/v1/api_types.py``, ``srt/managers/scheduler_components/weight_updater.py``):

- unknown top-level fields are ignored on every route; a missing required field is a 400 naming
  it (SGLang validates the request class itself: seen on the real server, not FastAPI's 422); an
  unknown sampling parameter is a 400 (``/generate``'s contract check);
- refused with a 400, as SGLang refuses them: weight loads outside a begin/end_weight_update
  session, a second begin, an end without a begin, a weight-update group name already held, a
  broadcast to a group never joined, payloads naming anything outside torch;
- where SGLang's scheduler raises, and so dies and takes the server down, the stand-in prints why
  (``DIED <route>: <reason>``) and exits without answering: a weight load that fails, resuming
  memory that was not released, and, with ``--enable-memory-saver``, generating or loading weights
  into memory that is released (on a GPU: an access to unmapped memory);
- without ``--enable-memory-saver`` releasing memory succeeds and frees nothing, as in SGLang;
- ``sampling_seed`` is used only with ``--enable-deterministic-inference``, each request then
  sampled alone from its own seed (SGLang's mode is batch-invariant); otherwise the stand-in
  samples from a counter of its own, so a restarted server samples otherwise, as a real one does.

Weights: ``update_weights_from_tensor``
(ForkingPickler payloads, base64) and the broadcast protocol through ``BroadcastWeightReceiver``
(the trainer's own receive-side reference). It serves one request at a time, so it is never busy
when asked to release memory (SGLang's scheduler asserts that it is idle then).
"""

import argparse
import base64
import io
import json
import os
import pickle
import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.hf_engine import HFEngine
from srpo_megatron.rollout.sglang_engine import MEMORY_TAGS
from srpo_megatron.rollout.sglang_server import CPU_FLAGS
from srpo_megatron.rollout.weight_sync.broadcast import BroadcastWeightReceiver

VERSION = "0.5.23"
# the POST routes served, each with the fields its sglang 0.5.23 request class requires (the rest
# have defaults); tests/rollout/fixtures/sglang_0.5.23_routes.json holds every field name
REQUIRED = {
    "generate": set(),
    "init_weights_update_group": {"master_address", "master_port", "rank_offset", "world_size"},
    "update_weights_from_distributed": {"names", "dtypes", "shapes"},
    "destroy_weights_update_group": set(),
    "update_weights_from_tensor": {"serialized_named_tensors"},
    "begin_weight_update": set(),
    "end_weight_update": set(),
    "release_memory_occupation": set(),
    "resume_memory_occupation": set(),
    "flush_cache": set(),
}
# api/v1/api_types.py SamplingParams (0.5.23): "unknown keys rejected"
SAMPLING_FIELDS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
}  # fmt: skip
DEFAULT_SEED = 42  # srt/sampling/sampling_batch_info.py: a request without a seed, deterministic mode


class Refused(Exception):
    """A call SGLang answers with a 400 and this message."""


class Died(Exception):
    """A call on which SGLang's scheduler raises: the server dies without answering."""


class TorchOnlyUnpickler(pickle.Unpickler):
    """Like SGLang's SafeUnpickler: a weight payload may only name torch's tensor-rebuilding
    functions and types (a module outside torch is refused)."""

    def find_class(self, module, name):
        if module == "torch" or module.startswith("torch."):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a weight payload")


class FakeSGLang:
    def __init__(self, args: argparse.Namespace):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=getattr(torch, args.dtype))
        self.engine = HFEngine(model)
        self.receiver = BroadcastWeightReceiver(self.engine.update_weights)
        self.args = args
        self.offload_tags: set[str] = set()  # what SGLang's scheduler records as released
        self.session = False  # inside begin_weight_update .. end_weight_update
        self.counter = 0

    def server_info(self) -> dict:
        a = self.args
        return {
            "model_path": a.model_path,
            "tp_size": a.tp_size,
            "base_gpu_id": a.base_gpu_id,
            "mem_fraction_static": a.mem_fraction_static,
            "dtype": a.dtype,
            "skip_tokenizer_init": a.skip_tokenizer_init,
            "enable_memory_saver": a.enable_memory_saver,
            "enable_deterministic_inference": a.enable_deterministic_inference,
            "device": a.device,
            "version": VERSION,
        }

    def _need(self, route: str, *tags: str) -> None:
        released = set(tags) & self.offload_tags if self.args.enable_memory_saver else set()
        if released:
            raise Died(f"{route} touched released memory {sorted(released)} (illegal memory access)")

    def generate(self, input_ids, sampling_params=None, return_logprob=False, **_):
        self._need("generate", *MEMORY_TAGS)
        if not return_logprob:
            raise Refused("this stand-in always needs return_logprob=true")
        requests = (
            sampling_params if isinstance(sampling_params, list) else [sampling_params or {}] * len(input_ids)
        )
        for sampling in requests:
            unknown = sorted(set(sampling) - SAMPLING_FIELDS)
            if unknown:  # the text of SGLang's contract check
                raise Refused(f"unknown field `{unknown[0]}`, expected one of {sorted(SAMPLING_FIELDS)}")
        if self.args.enable_deterministic_inference:
            parts = [
                self.engine.generate([ids], _params(sampling, sampling.get("sampling_seed", DEFAULT_SEED)))
                for ids, sampling in zip(input_ids, requests, strict=True)
            ]
            outputs = [(b.response_ids[0], b.rollout_logp[0], b.finish_reasons[0]) for b in parts]
        else:
            self.counter += 1
            batch = self.engine.generate(input_ids, _params(requests[0], self.counter))
            outputs = zip(batch.response_ids, batch.rollout_logp, batch.finish_reasons, strict=True)
        return [
            {
                "output_ids": ids,
                "meta_info": {
                    "output_token_logprobs": [
                        [float(lp), t, None] for lp, t in zip(logp.tolist(), ids, strict=True)
                    ],
                    "finish_reason": {"type": reason},
                },
            }
            for ids, logp, reason in outputs
        ]

    def begin_weight_update(self, selector="all", **_):
        if self.session:
            raise Refused("a weight-update session is already open; call end_weight_update() first")
        self.session = True
        return {"success": True, "message": "Success"}

    def end_weight_update(self, **_):
        if not self.session:
            raise Refused("no weight-update session is open; call begin_weight_update() first")
        self.session = False
        return {"success": True, "message": "Success"}

    def _loading(self, route: str) -> None:
        if not self.session:
            raise Refused(f"{route} must run between begin_weight_update() and end_weight_update()")
        self._need(route, "weights")

    def update_weights_from_tensor(self, serialized_named_tensors, load_format=None, **_):
        self._loading("update_weights_from_tensor")
        if load_format is not None or len(serialized_named_tensors) != 1:
            raise Refused("this stand-in takes load_format=None and one TP rank")
        named = TorchOnlyUnpickler(
            io.BytesIO(base64.b64decode(serialized_named_tensors[0], validate=True))
        ).load()
        try:  # SGLang calls model.load_weights without catching what it raises
            self.engine.update_weights(named)
        except Exception as e:
            raise Died(f"update_weights_from_tensor: load_weights raised {e!r}") from e
        return {"success": True, "message": "Success"}

    def init_weights_update_group(
        self, master_address, master_port, rank_offset, world_size, group_name="weight_update_group",
        backend="nccl", **_,
    ):  # fmt: skip
        return _result(
            self.receiver.init_weights_update_group(
                master_address, master_port, rank_offset, world_size, group_name, backend
            )
        )

    def update_weights_from_distributed(
        self, names, dtypes, shapes, group_name="weight_update_group", flush_cache=True, load_format=None, **_
    ):
        self._loading("update_weights_from_distributed")
        return _result(
            self.receiver.update_weights_from_distributed(
                names, dtypes, shapes, group_name, flush_cache, load_format
            )
        )

    def destroy_weights_update_group(self, group_name="weight_update_group", **_):
        return _result(self.receiver.destroy_weights_update_group(group_name))

    def release_memory_occupation(self, tags=None, **_):
        self.offload_tags |= set(tags or MEMORY_TAGS)

    def resume_memory_occupation(self, tags=None, **_):
        missing = set(tags or MEMORY_TAGS) - self.offload_tags
        if missing:  # SGLang: KeyError in offload_tags.remove
            raise Died(f"resume_memory_occupation: {sorted(missing)} were not released (KeyError)")
        self.offload_tags -= set(tags or MEMORY_TAGS)

    def flush_cache(self, **_):
        return "Cache flushed.\n"


def _params(sampling: dict, seed: int) -> SamplingParams:
    return SamplingParams(
        temperature=sampling.get("temperature", 1.0),
        top_p=sampling.get("top_p", 1.0),
        max_new_tokens=sampling.get("max_new_tokens", 128),
        stop_token_ids=tuple(sampling.get("stop_token_ids") or ()),
        seed=seed,
    )


def _result(answer: tuple[bool, str]) -> dict:
    if not answer[0]:
        raise Refused(answer[1])
    return {"success": True, "message": answer[1]}


def make_handler(fake: FakeSGLang):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                self._send(200, b"")
            elif self.path == "/server_info":
                self._send(200, json.dumps(fake.server_info()).encode())
            else:
                self._send(404, b"not found")

        def do_POST(self):
            route = self.path.strip("/")
            if route not in REQUIRED:
                return self._send(404, b"not found")
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            missing = sorted(REQUIRED[route] - set(body))
            if missing:  # SGLang's answer to a body its request class does not validate
                detail = "\n".join(
                    f"{{'type': 'missing', 'loc': ('body', {m!r}), 'msg': 'Field required'}}" for m in missing
                )
                answer = {"object": "error", "message": f"validation errors:\n{detail}", "code": 400}
                return self._send(400, json.dumps(answer).encode())
            try:
                answer = getattr(fake, route)(**body)
            except Refused as e:
                print(f"REFUSED {route}: {e}", flush=True)
                answer = {"error": str(e)} if route == "generate" else {"success": False, "message": str(e)}
                return self._send(400, json.dumps(answer).encode())
            except Died as e:
                print(f"DIED {route}: {e}", flush=True)
                os._exit(1)  # no answer: the connection drops, as when SGLang's scheduler dies
            if isinstance(answer, str):
                return self._send(200, answer.encode())
            self._send(200, json.dumps(answer).encode())

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # refusals and deaths are printed above
            pass

    return Handler


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--base-gpu-id", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--mem-fraction-static", type=float, default=0.9)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--enable-deterministic-inference", action="store_true")
    parser.add_argument("--device", default="cuda")
    # the rest of what a launched CPU server is given: taken, nothing to do with them here
    for i, flag in enumerate(CPU_FLAGS):
        if flag.startswith("--") and flag != "--device":
            takes_value = i + 1 < len(CPU_FLAGS) and not CPU_FLAGS[i + 1].startswith("--")
            parser.add_argument(flag, **({} if takes_value else {"action": "store_true"}))
    args = parser.parse_args(argv)
    if args.tp_size != 1:
        sys.exit("fake_sglang_server: only --tp-size 1")
    fake = FakeSGLang(args)
    server = HTTPServer((args.host, args.port), make_handler(fake))
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"fake SGLang server on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
