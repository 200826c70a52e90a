"""What this project sends to SGLang, route by route, and a check of it against one SGLang version's
request classes.

SGLang ignores unknown top-level fields on every route (its request classes are parsed with
``extra="ignore"``), so a misspelt field would not fail: it would silently take its default. Only
unknown sampling parameters are refused (``/generate``'s contract check). Hence this check, run by
``tests/rollout/test_sglang_protocol.py`` against a fixture written from 0.5.23's source and by
``tools/check_sglang_protocol.py`` against any unzipped wheel.

A spec is ``{"version": str, "routes": {route: {"class": str | None, "fields": [...], "required":
[...]}}, "sampling_params": {"class": str, "fields": [...]}}``; ``class`` is None for a route that
reads no JSON body.
"""

import base64
from typing import Any

import numpy as np
import torch

from srpo_megatron.rollout.engine import SamplingParams
from srpo_megatron.rollout.sglang_engine import MEMORY_TAGS, SGLangEngine, SGLangHTTPClient, serialize_tensors
from srpo_megatron.rollout.weight_sync.broadcast import update_message
from srpo_megatron.rollout.weight_sync.buckets import bucket_meta


class _RecordingClient(SGLangHTTPClient):
    """Posts nowhere: records each body and answers the way the route does."""

    def __init__(self):
        super().__init__("http://recording")
        self.sent: dict[str, list[dict[str, Any]]] = {}

    def _post(self, route: str, payload: dict[str, Any] | None = None) -> Any:
        self.sent.setdefault(route, []).append(dict(payload or {}))
        if route == "generate":
            n = len(payload["input_ids"])
            meta = {"output_token_logprobs": [[-0.1, 7, None]], "finish_reason": {"type": "stop"}}
            if payload.get("return_routed_experts"):  # 2 prompt tokens + 1 output - 1 rows, 1 layer, k 2
                meta["routed_experts"] = base64.b64encode(np.zeros(4, dtype=np.int32).tobytes()).decode()
            return [{"output_ids": [7], "meta_info": meta}] * n
        return {"success": True, "message": ""}


def project_payloads() -> dict[str, list[dict[str, Any]]]:
    """The JSON bodies this project's SGLang adapter posts, by route, from one call of each kind."""
    client = _RecordingClient()
    engine = SGLangEngine(client, name="recording", layers=(1, (0,)))
    try:
        engine.generate([[1, 2]], SamplingParams(n=2, max_new_tokens=4, stop_token_ids=(7,), seed=0))
        engine.generate([[1, 2]], SamplingParams(max_new_tokens=4, seed=0, record_routes=True))
        engine.request_join(
            master_address="127.0.0.1",
            master_port=29600,
            rank_offset=1,
            world_size=2,
            group_name="srpo_weights_0",
            backend="nccl",
        ).result()
        tensors = [("model.norm.weight", torch.ones(4))]
        engine.request_receive(update_message(bucket_meta(tensors), "srpo_weights_0")).result()
        engine.request_leave("srpo_weights_0").result()
        engine.begin_weight_update()
        torch.multiprocessing.set_sharing_strategy("file_system")
        engine.update_weights_serialized([serialize_tensors(tensors)])
        engine.end_weight_update()
        engine.release_memory(list(MEMORY_TAGS))
        engine.resume_memory(["weights"])
        engine.flush_cache()
    finally:
        engine.shutdown()
    return client.sent


def check_payloads(
    payloads: dict[str, list[dict[str, Any]]], spec: dict[str, Any]
) -> list[tuple[str, bool, str]]:
    """``(route, matches, what)`` per route: every field sent is one of the route's request class,
    every required field is sent, and every sampling parameter is one SGLang knows."""
    report = []
    for route in sorted(payloads):
        known = spec["routes"].get(route)
        if known is None:
            report.append((route, False, f"no such route in SGLang {spec['version']}"))
            continue
        fields, problems = set(known["fields"]), []
        sent = set().union(*(p.keys() for p in payloads[route]))
        if known["class"] is None and sent:
            problems.append(f"fields {sorted(sent)} sent to a route that reads no JSON body (ignored)")
        elif unknown := sorted(sent - fields):
            problems.append(
                f"fields {unknown} are not in {known['class']} (ignored: they take their defaults)"
            )
        for body in payloads[route]:
            if missing := sorted(set(known["required"]) - body.keys()):
                problems.append(f"required fields {missing} are not sent (SGLang answers 400)")
        what = f"{known['class']}: sends {len(sent)} of its {len(fields)} fields"
        if known["class"] is None:
            what = "no JSON body: sends none"
        if route == "generate":
            sampling = set(spec["sampling_params"]["fields"])
            used = set().union(*(s.keys() for p in payloads[route] for s in p.get("sampling_params", [])))
            if unknown := sorted(used - sampling):
                problems.append(
                    f"sampling parameters {unknown} are not in {spec['sampling_params']['class']} (400)"
                )
            what += f"; sampling_params: {len(used)} of {len(sampling)}"
        report.append((route, not problems, "; ".join(problems) or what))
    return report
