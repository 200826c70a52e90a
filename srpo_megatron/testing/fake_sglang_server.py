"""A stand-in SGLang server for CPU tests: sglang 0.5.23's HTTP routes and weight-update protocol,
answered by the HF engine. Not an inference engine (one request at a time, a small HF model).

    python -m srpo_megatron.testing.fake_sglang_server --model-path DIR --port 30000 [sglang flags]

It takes ``launch_server``'s flags (``rollout/sglang_server.py``) and is strict where SGLang is:
unknown request fields and sampling parameters are refused (400); so are generation and weight
loads while the memory they need is released, weight loads outside a begin/end_weight_update
session, resuming memory that was not released, and payloads naming anything outside torch. Each request is logged to stdout as ``CALL <route> <detail>`` so a test can check
the order of the trainer's calls (release -> resume weights -> update -> resume the rest), and on
SIGTERM the checksums of the weights it holds as ``CHECKSUMS <json>``.
Weights: ``update_weights_from_tensor`` (ForkingPickler payloads, base64) and the broadcast
protocol through ``BroadcastWeightReceiver`` (the trainer's own receive-side reference).
"""

import argparse
import base64
import io
import json
import pickle
import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.hf_engine import HFEngine
from srpo_megatron.rollout.sglang_engine import MEMORY_TAGS
from srpo_megatron.rollout.weight_sync.broadcast import BroadcastWeightReceiver
from srpo_megatron.rollout.weight_sync.verify import weight_checksums

# fields of sglang 0.5.23's request structs (srt/managers/io_struct.py, srt/sampling/sampling_params.py)
FIELDS = {
    "generate": {"input_ids", "sampling_params", "return_logprob", "rid", "stream"},
    "init_weights_update_group": {
        "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend",
    },
    "update_weights_from_distributed": {
        "names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests",
        "weight_version", "load_format", "selector", "torch_empty_cache",
    },
    "update_weights_from_tensor": {
        "serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests",
        "weight_version", "selector", "torch_empty_cache",
    },
    "begin_weight_update": {"selector"},
    "end_weight_update": set(),
    "release_memory_occupation": {"tags"},
    "resume_memory_occupation": {"tags"},
    "flush_cache": set(),
    "weights_checksums": set(),  # ours, not SGLang's: what the engine holds, for tests
}  # fmt: skip
SAMPLING_FIELDS = {
    "max_new_tokens", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
    "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "sampling_seed", "logit_bias",
}  # fmt: skip


class Refused(Exception):
    pass


class TorchOnlyUnpickler(pickle.Unpickler):
    """Like SGLang's SafeUnpickler: a weight payload may only name torch's tensor-rebuilding
    functions and types (a module outside torch is refused)."""

    def find_class(self, module, name):
        if module == "torch" or module.startswith("torch."):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a weight payload")


class FakeSGLang:
    def __init__(self, model_path: str, dtype: str, memory_saver: bool):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.engine = HFEngine(model)
        self.receiver = BroadcastWeightReceiver(self.engine.update_weights)
        self.memory_saver = memory_saver
        self.released: set[str] = set()
        self.session = False  # inside begin_weight_update .. end_weight_update
        self.seed = 0

    def _need(self, *tags: str) -> None:
        missing = sorted(set(tags) & self.released)
        if missing:
            raise Refused(f"memory {missing} is released; resume_memory_occupation first")

    def generate(self, input_ids, sampling_params, return_logprob=False, **_):
        self._need(*MEMORY_TAGS)
        if not return_logprob:
            raise Refused("this stand-in always needs return_logprob=true")
        sampling = sampling_params[0] if isinstance(sampling_params, list) else sampling_params
        unknown = set(sampling) - SAMPLING_FIELDS
        if unknown:
            raise Refused(f"unknown sampling parameters {sorted(unknown)}")
        self.seed += 1
        params = SamplingParams(
            temperature=sampling.get("temperature", 1.0),
            top_p=sampling.get("top_p", 1.0),
            max_new_tokens=sampling.get("max_new_tokens", 128),
            stop_token_ids=tuple(sampling.get("stop_token_ids") or ()),
            seed=self.seed,
        )
        batch = self.engine.generate(input_ids, params)
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
            for ids, logp, reason in zip(
                batch.response_ids, batch.rollout_logp, batch.finish_reasons, strict=True
            )
        ]

    def begin_weight_update(self, selector="all"):
        if self.session:
            raise Refused("a weight-update session is already open; call end_weight_update() first")
        self.session = True
        return {"success": True, "message": "Success"}

    def end_weight_update(self):
        if not self.session:
            raise Refused("no weight-update session is open; call begin_weight_update() first")
        self.session = False
        return {"success": True, "message": "Success"}

    def _loading(self, route: str) -> None:
        self._need("weights")
        if not self.session:
            raise Refused(f"{route} must run between begin_weight_update() and end_weight_update()")

    def update_weights_from_tensor(self, serialized_named_tensors, load_format=None, **_):
        self._loading("update_weights_from_tensor")
        if load_format is not None or len(serialized_named_tensors) != 1:
            raise Refused("this stand-in takes load_format=None and one TP rank")
        named = TorchOnlyUnpickler(
            io.BytesIO(base64.b64decode(serialized_named_tensors[0], validate=True))
        ).load()
        self.engine.update_weights(named)
        return {"success": True, "message": f"loaded {len(named)} tensors"}

    def init_weights_update_group(self, **kwargs):
        return _result(self.receiver.init_weights_update_group(**kwargs))

    def update_weights_from_distributed(
        self, names, dtypes, shapes, group_name, flush_cache=True, load_format=None, **_
    ):
        self._loading("update_weights_from_distributed")
        return _result(
            self.receiver.update_weights_from_distributed(
                names, dtypes, shapes, group_name, flush_cache, load_format
            )
        )

    def release_memory_occupation(self, tags=None):
        if not self.memory_saver:
            raise Refused("release_memory_occupation needs --enable-memory-saver")
        self.released |= set(tags or MEMORY_TAGS)

    def resume_memory_occupation(self, tags=None):
        tags = set(tags or MEMORY_TAGS)
        if tags - self.released:  # SGLang's scheduler dies on this (KeyError in offload_tags.remove)
            raise Refused(f"resuming {sorted(tags - self.released)}, which were not released")
        self.released -= tags

    def flush_cache(self):
        return "Cache flushed.\n"

    def weights_checksums(self):
        return weight_checksums(self.engine.named_weights())


def _result(answer: tuple[bool, str]) -> dict:
    if not answer[0]:
        raise Refused(answer[1])
    return {"success": True, "message": answer[1]}


def make_handler(fake: FakeSGLang):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                self._send(200, b"")
            else:
                self._send(404, b"not found")

        def do_POST(self):
            route = self.path.strip("/")
            if route not in FIELDS:
                return self._send(404, b"not found")
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            unknown = set(body) - FIELDS[route]
            try:
                if unknown:
                    raise Refused(f"unknown fields {sorted(unknown)}")
                print(f"CALL {route} {_detail(route, body)}", flush=True)
                answer = getattr(fake, route)(**body)
            except Exception as e:  # SGLang answers a failed call with 400 and its reason
                print(f"REFUSED {route}: {e}", flush=True)
                return self._send(400, json.dumps({"success": False, "message": str(e)}).encode())
            if isinstance(answer, str):
                return self._send(200, answer.encode())
            self._send(200, json.dumps(answer).encode())

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the CALL lines say enough
            pass

    return Handler


def _detail(route: str, body: dict) -> str:
    if route.endswith("memory_occupation"):
        return ",".join(body.get("tags") or MEMORY_TAGS)
    if route == "generate":
        return f"{len(body['input_ids'])} requests"
    if route == "update_weights_from_distributed":
        return f"{len(body['names'])} tensors"
    return ""


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
    args = parser.parse_args(argv)
    if args.tp_size != 1:
        sys.exit("fake_sglang_server: only --tp-size 1")
    fake = FakeSGLang(args.model_path, args.dtype, args.enable_memory_saver)
    server = HTTPServer((args.host, args.port), make_handler(fake))

    def stop(signum, frame):  # what it held at the end, for tests of runs that stop their servers
        print(f"CHECKSUMS {json.dumps(fake.weights_checksums())}", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"fake SGLang server on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
