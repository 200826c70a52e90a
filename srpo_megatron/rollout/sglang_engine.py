"""SGLang rollout engine: a thin adapter over a launched server's HTTP routes.

Checked against the pinned release itself, the sglang 0.5.23 wheel: ``srt/entrypoints/
http_server.py`` (the routes, their bodies and status codes), ``srt/managers/io_struct.py`` and
``api/v1/api_types.py`` (the request fields; ``tools/check_sglang_protocol.py`` compares our
payloads with any version's), ``srt/managers/scheduler_components/weight_updater.py`` and
``srt/model_executor/model_runner_components/weight_updater.py`` (the receive side) and
``srt/utils/common.py`` ``MultiprocessingSerializer``. Re-read these when sglang is upgraded. What
we use:

- ``generate(input_ids=[[...]], sampling_params=[{...}], return_logprob=True)`` -> one dict per
  input with ``output_ids`` and ``meta_info`` (``output_token_logprobs``: ``(logprob, token_id,
  text)`` per generated token, temperature applied unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is
  set; ``finish_reason``: ``{"type": "stop" | "length", ...}``). Unknown top-level fields are
  ignored, unknown sampling parameters refused (400). Every request carries a ``sampling_seed``
  (``request_seed``); the server uses it only when it runs ``--enable-deterministic-inference``
  (``srt/sampling/sampling_batch_info.py``), otherwise it is ignored. With top_p < 1 the log-probs
  are of the distribution before the top-p cut (the HF engine's after it): SRPO samples at top_p 1.
  With ``return_routed_experts=True`` (a server started ``--enable-return-routed-experts``) the
  ``meta_info`` also holds each input position's experts (``parse_routed_experts``);
- ``init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name,
  backend)``, ``update_weights_from_distributed(names, dtypes, shapes, group_name, flush_cache,
  load_format)`` and ``destroy_weights_update_group(group_name)`` (disaggregated: one group per
  pipeline stage, each driven by that stage's source rank over its own ``SGLangEngine``; protocol in
  ``weight_sync/broadcast.py``);
- ``begin_weight_update()`` / ``end_weight_update()``: 0.5.23 refuses weight updates outside such
  a session; one session per sync;
- ``update_weights_from_tensor(serialized_named_tensors, load_format, flush_cache)`` (colocated;
  CUDA IPC handles of the trainer's tensors, serialised once per engine TP rank, as the engine
  itself does: each rank then drops its own handle);
- ``release_memory_occupation(tags)`` / ``resume_memory_occupation(tags)`` (colocated; only with
  ``--enable-memory-saver`` do they free anything: without it they succeed and do nothing, which
  ``SGLangFleet.connect`` refuses; no tags = every kind, ``MEMORY_TAGS``), ``flush_cache``;
  ``GET /server_info``: the server's resolved arguments.
Each answers JSON ``{"success", "message"}`` with status 200 or 400 (a refusal is a 400 whose body
says why); ``flush_cache`` answers plain text, the memory routes ``null``. Where SGLang's
scheduler raises instead (a failing weight load, resuming memory never released, releasing it while
busy) the scheduler process dies and takes the server with it: the request gets no answer.

Every call goes through one worker thread with a deadline: a dead or stuck engine becomes an
``EngineError`` naming the engine and the call, not a hang; a refused update becomes a
``WeightSyncError`` carrying SGLang's message. Nothing here imports sglang: the trainer talks to
servers only, so this module and its CPU tests need no GPU.
"""

import base64
import hashlib
import http.client
import io
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing import reductions  # also registers torch's tensor reductions with ForkingPickler

from srpo_megatron.errors import ServiceError
from srpo_megatron.rollout.engine import FinishReason, RolloutBatch, SamplingParams

# sglang.srt.constants (0.5.23): what release/resume_memory_occupation take as tags
WEIGHTS_TAG = "weights"
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
# where torch's reduce_tensor puts a CUDA tensor's device index (torch 2.14; SGLang's
# patch_torch.py relies on the same slot)
_CUDA_DEVICE_ARG = 6


class EngineError(ServiceError):
    """An SGLang engine died, timed out or answered a call with an error."""


class WeightSyncError(ServiceError):
    """An engine died, timed out or refused a weight update; the engine's weights are suspect."""


def as_result(answer: Any) -> tuple[bool, str]:
    """SGLang answers ``(success, message)`` (in-process), ``{"success", "message"}`` (HTTP) or an
    output object with those fields; ``None`` is a plain success."""
    if answer is None:
        return True, ""
    if isinstance(answer, tuple):
        return bool(answer[0]), str(answer[1]) if len(answer) > 1 else ""
    if isinstance(answer, dict):
        return bool(answer.get("success", True)), str(answer.get("message", ""))
    if hasattr(answer, "success"):
        return bool(answer.success), str(getattr(answer, "message", ""))
    return True, str(answer)


def _reduce_with_device_uuid(tensor: torch.Tensor):
    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda:
        uuid = str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid)
        args = (*args[:_CUDA_DEVICE_ARG], uuid, *args[_CUDA_DEVICE_ARG + 1 :])
    return rebuild, args


def serialize_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """``[(name, tensor)]`` as the base64 text the HTTP ``update_weights_from_tensor`` route takes:
    the bytes of SGLang's ``MultiprocessingSerializer.serialize`` (torch's ForkingPickler, under
    which a CUDA tensor travels as an IPC handle and a CPU tensor as shared memory, never its
    data). A CUDA tensor's device travels as its UUID, not as this process's index, as SGLang's own
    producers send it (the engine may number its GPUs otherwise, e.g. another
    CUDA_VISIBLE_DEVICES; its ranks map the UUID back). SGLang does this by patching torch's
    tensor reduction for the whole process (``monkey_patch_torch_reductions``), after which a CPU
    tensor no longer pickles anywhere in it; here it is this pickler's alone. The tensors must be
    plain ``torch.Tensor`` s and stay alive until the engine has answered."""
    buffer = io.BytesIO()
    pickler = ForkingPickler(buffer)
    pickler.dispatch_table[torch.Tensor] = _reduce_with_device_uuid  # a copy owned by this pickler
    pickler.dump(named_tensors)
    return base64.b64encode(buffer.getvalue()).decode()


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """The ``sampling_seed`` of sample ``sample`` of prompt ``prompt`` (its place in the step's
    prompts) under the call's seed (the run seed plus the step): the same request gets the same
    seed in a resumed run, on whichever engine it lands. 63 bits: SGLang takes int64."""
    digest = hashlib.blake2b(f"{seed}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampling_params_dict(params: SamplingParams, seed: int) -> dict[str, Any]:
    """Our SamplingParams as SGLang's per-request ``sampling_params``. ``n`` is handled by sending
    each prompt ``n`` times (one request per sample keeps the output order ours)."""
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": -1,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "skip_special_tokens": False,
        "no_stop_trim": True,  # keep the stop token in output_ids: it is a sampled, trained token
        "sampling_seed": seed,
    }


def parse_output(output: dict[str, Any]) -> tuple[list[int], torch.Tensor, FinishReason]:
    """One SGLang ``generate`` result -> ``(response_ids, rollout_logp [T], finish_reason)``."""
    meta = output["meta_info"]
    token_logprobs = meta["output_token_logprobs"]
    ids = [int(t[1]) for t in token_logprobs]
    if "output_ids" in output and list(output["output_ids"]) != ids:
        raise EngineError("SGLang output_ids and output_token_logprobs disagree")
    logp = torch.tensor([float(t[0]) for t in token_logprobs], dtype=torch.float32)
    reason = (meta.get("finish_reason") or {}).get("type")
    if reason not in ("stop", "length"):
        raise EngineError(f"unexpected SGLang finish_reason {meta.get('finish_reason')!r} (aborted request?)")
    return ids, logp, reason


def parse_routed_experts(
    output: dict[str, Any], prompt_len: int, response_len: int, num_layers: int, moe_layers, *, engine: str
) -> torch.Tensor:
    """A ``return_routed_experts`` result -> ``RolloutBatch.routed_experts``' [P + O, MoE layers, k]
    int16. SGLang 0.5.23 (``srt/state_capturer/routed_experts.py``, ``batch_result_processor.py``):
    base64 of int32 [P + O - 1, num_hidden_layers, k], row i the experts of input position i (the
    last output token is never an input), every layer a slot (a dense layer's holds zeros)."""
    encoded = output["meta_info"].get("routed_experts")
    if encoded is None:
        raise EngineError(
            f"engine {engine!r} returned no routed experts: start it with --enable-return-routed-experts"
        )
    flat = torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.int32)
    rows = prompt_len + response_len - 1
    if not num_layers or flat.numel() % (rows * num_layers):
        raise EngineError(
            f"engine {engine!r}: {flat.numel()} routed-expert ids for {rows} positions x {num_layers} layers"
        )
    routes = flat.view(rows, num_layers, -1)[:, list(moe_layers)].to(torch.int16)
    return torch.cat([routes, torch.full_like(routes[:1], -1)])


class SGLangHTTPClient:
    """SGLang's control and generate routes as Python methods (POST, JSON bodies)."""

    def __init__(self, url: str, *, tp_size: int = 1, timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.tp_size = tp_size
        self.timeout_s = timeout_s

    def _post(self, route: str, payload: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}/{route}",
            data=json.dumps(payload or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return self._send(request, route)

    def _send(self, request: urllib.request.Request, route: str) -> Any:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return _parse_body(response.read(), ok=True)
        except urllib.error.HTTPError as e:  # a 400 carries the engine's reason in its body
            answer = _parse_body(e.read(), ok=False)
            if isinstance(answer, dict) and "success" in answer:
                return answer
            raise EngineError(f"{self.url}/{route}: HTTP {e.code}: {answer}") from None
        except (http.client.RemoteDisconnected, ConnectionResetError) as e:
            raise EngineError(
                f"the server closed the connection without answering ({type(e).__name__}): SGLang's "
                "scheduler dies on a call that raises, and takes the server with it"
            ) from None

    def health(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def server_info(self) -> dict[str, Any]:
        return self._send(urllib.request.Request(f"{self.url}/server_info"), "server_info")

    def generate(self, **kwargs):
        return self._post("generate", kwargs)

    def init_weights_update_group(self, **kwargs):
        return self._post("init_weights_update_group", kwargs)

    def update_weights_from_distributed(self, **kwargs):
        return self._post("update_weights_from_distributed", kwargs)

    def destroy_weights_update_group(self, group_name):
        return self._post("destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_tensor(self, serialized_named_tensors, load_format=None, flush_cache=True):
        """serialized_named_tensors: one ``serialize_tensors`` payload per engine TP rank."""
        return self._post(
            "update_weights_from_tensor",
            {
                "serialized_named_tensors": list(serialized_named_tensors),
                "load_format": load_format,
                "flush_cache": flush_cache,
            },
        )

    def begin_weight_update(self, selector="all"):
        return self._post("begin_weight_update", {"selector": selector})

    def end_weight_update(self):
        return self._post("end_weight_update")

    def release_memory_occupation(self, tags=None):
        return self._post("release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags=None):
        return self._post("resume_memory_occupation", {"tags": tags})

    def flush_cache(self):
        return self._post("flush_cache")


def _parse_body(body: bytes, ok: bool) -> Any:
    """JSON when it is JSON (``null`` -> None); a plain-text answer (``flush_cache``) as a result."""
    text = body.decode(errors="replace")
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return {"success": ok, "message": text.strip()}


class SGLangEngine:
    """One SGLang replica (``tp_size`` GPUs), driven over HTTP: generation, memory and weight-update
    calls (``SGLangFleet`` puts the run's replicas behind the ``RolloutEngine`` interface).

    client: an ``SGLangHTTPClient`` (``connect``), or anything with its method names (tests).
    It is also a ``WeightReceiverHandle`` (``request_join`` / ``request_receive`` /
    ``request_leave``) for ``BroadcastWeightSender``.
    """

    def __init__(
        self,
        client: Any,
        *,
        tp_size: int = 1,
        name: str = "sglang",
        timeout_s: float = 600.0,
        log_path: Path | None = None,
        layers: tuple[int, tuple[int, ...]] = (0, ()),
    ):
        self.client = client
        self.world_size = tp_size
        self.name = name
        self.timeout_s = timeout_s
        self.log_path = log_path  # a launched server's: named in errors
        self.layers = layers  # the model's (num_hidden_layers, MoE layers): to read routed experts
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-calls")

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        tp_size: int = 1,
        timeout_s: float = 600.0,
        log_path: Path | None = None,
        layers: tuple[int, tuple[int, ...]] = (0, ()),
    ) -> "SGLangEngine":
        client = SGLangHTTPClient(url, tp_size=tp_size, timeout_s=timeout_s)
        return cls(client, tp_size=tp_size, name=url, timeout_s=timeout_s, log_path=log_path, layers=layers)

    # -- calls ---------------------------------------------------------------------------------
    def submit(self, method: str, **kwargs: Any) -> Future:
        return self._worker.submit(getattr(self.client, method), **kwargs)

    def call(self, method: str, *, timeout_s: float | None = None, **kwargs: Any) -> Any:
        timeout_s = timeout_s or self.timeout_s
        try:
            return self.submit(method, **kwargs).result(timeout=timeout_s)
        except FutureTimeout:
            raise EngineError(
                f"engine {self.name!r}: {method} did not return within {timeout_s:g} s{self._log()}"
            ) from None
        except Exception as e:
            detail = str(e) if isinstance(e, EngineError) else repr(e)
            raise EngineError(f"engine {self.name!r}: {method} failed: {detail}{self._log()}") from e

    def _log(self) -> str:
        return f" (its log: {self.log_path})" if self.log_path is not None else ""

    def _checked(
        self, method: str, error: type[Exception] = EngineError, timeout_s: float | None = None, **kwargs: Any
    ) -> None:
        ok, message = as_result(self.call(method, timeout_s=timeout_s, **kwargs))
        if not ok:
            raise error(f"engine {self.name!r} refused {method}: {message}")

    def server_info(self) -> dict[str, Any]:
        """The server's resolved arguments (``enable_memory_saver``, ``tp_size``, ...) and version."""
        return self.call("server_info")

    # -- generation, weights, memory ---------------------------------------------------------------
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *, first_prompt: int = 0
    ) -> RolloutBatch:
        """first_prompt: the place of ``prompt_ids[0]`` among the step's prompts (an engine of a
        fleet gets a share), which the per-request seeds are derived from."""
        if params.seed is None:
            raise ValueError("SGLang rollouts need SamplingParams.seed: the per-request seeds come from it")
        prompt_index = [i for i in range(len(prompt_ids)) for _ in range(params.n)]
        inputs = [list(prompt_ids[i]) for i in prompt_index]
        sampling = [
            sampling_params_dict(params, request_seed(params.seed, first_prompt + i, k))
            for i in range(len(prompt_ids))
            for k in range(params.n)
        ]
        routes = {"return_routed_experts": True} if params.record_routes else {}
        outputs = self.call(
            "generate", input_ids=inputs, sampling_params=sampling, return_logprob=True, **routes
        )
        if isinstance(outputs, dict):  # one request, or an error ({"error": ...} / {"success": false, ...})
            if "meta_info" not in outputs:
                raise EngineError(f"engine {self.name!r}: generate failed: {outputs}")
            outputs = [outputs]
        if len(outputs) != len(inputs):
            raise EngineError(
                f"engine {self.name!r} returned {len(outputs)} outputs for {len(inputs)} requests"
            )
        parsed = [parse_output(o) for o in outputs]
        routed = None
        if params.record_routes:
            routed = [
                parse_routed_experts(o, len(prompt), len(p[0]), *self.layers, engine=self.name)
                for o, prompt, p in zip(outputs, inputs, parsed, strict=True)
            ]
        return RolloutBatch(
            prompt_index=prompt_index,
            prompt_ids=inputs,
            response_ids=[p[0] for p in parsed],
            rollout_logp=[p[1] for p in parsed],
            finish_reasons=[p[2] for p in parsed],
            routed_experts=routed,
        )

    def update_weights_serialized(self, payloads: Sequence[str]) -> None:
        """One ``serialize_tensors`` payload per engine TP rank, rank ``j``'s made by the process on
        that rank's GPU (colocated: each engine rank opens IPC handles of memory on its own GPU).
        The cache is flushed once at the end of a sync (``flush_cache``), not per bucket."""
        if len(payloads) != self.world_size:
            raise ValueError(
                f"engine {self.name!r} has {self.world_size} TP ranks, got {len(payloads)} payloads"
            )
        self._checked(
            "update_weights_from_tensor",
            WeightSyncError,
            serialized_named_tensors=list(payloads),
            load_format=None,
            flush_cache=False,
        )

    def begin_weight_update(self) -> None:
        self._checked("begin_weight_update", WeightSyncError)

    def end_weight_update(self, timeout_s: float | None = None) -> None:
        self._checked("end_weight_update", WeightSyncError, timeout_s=timeout_s)

    def flush_cache(self) -> None:
        self._checked("flush_cache")

    def release_memory(self, tags: list[str] | None = None) -> None:
        """Free the engine's GPU memory (``None``: weights, KV cache and CUDA graphs)."""
        self._checked("release_memory_occupation", tags=tags)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self._checked("resume_memory_occupation", tags=tags)

    def shutdown(self) -> None:
        """Stop this adapter's worker (the server's owner stops the server)."""
        self._worker.shutdown(wait=False)

    # -- WeightReceiverHandle (disaggregated) ----------------------------------------------------
    def request_join(self, **kwargs: Any) -> Future:
        return self.submit("init_weights_update_group", **kwargs)

    def request_receive(self, message: dict[str, Any]) -> Future:
        return self.submit("update_weights_from_distributed", **message)

    def request_leave(self, group_name: str) -> Future:
        return self.submit("destroy_weights_update_group", group_name=group_name)
