"""SGLang rollout engine: a thin adapter over ``sglang.Engine`` (in-process) or a launched server.

Checked against the pinned release itself, the sglang 0.5.23 wheel: ``srt/entrypoints/engine.py``
class ``Engine``, ``srt/entrypoints/http_server.py`` (the routes, their bodies and status codes),
``srt/managers/io_struct.py`` (the request fields), ``srt/model_executor/model_runner_components/
weight_updater.py`` (the receive side) and ``srt/utils/common.py`` ``MultiprocessingSerializer``.
Re-read these when sglang is upgraded. What we use:

- ``generate(input_ids=[[...]], sampling_params=[{...}], return_logprob=True)`` -> one dict per
  input with ``output_ids`` and ``meta_info`` (``output_token_logprobs``: ``(logprob, token_id,
  text)`` per generated token, temperature applied unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is
  set; ``finish_reason``: ``{"type": "stop" | "length", ...}``). No ``sampling_seed``: the default
  flashinfer sampling backend asserts that none is given. With top_p < 1 the log-probs are of the
  distribution before the top-p cut (the HF engine's after it): SRPO rollouts sample at top_p 1;
- ``init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name,
  backend)`` and ``update_weights_from_distributed(names, dtypes, shapes, group_name, flush_cache,
  load_format)`` (disaggregated; protocol in ``weight_sync/broadcast.py``);
- ``begin_weight_update()`` / ``end_weight_update()``: 0.5.23 refuses weight updates outside such
  a session (``scheduler_components/weight_updater.py``); one session per sync;
- ``update_weights_from_tensor(named_tensors, load_format, flush_cache)`` (colocated; CUDA IPC
  handles of the trainer's tensors, serialised once per engine TP rank, as the engine itself does:
  each rank then drops its own handle);
- ``release_memory_occupation(tags)`` / ``resume_memory_occupation(tags)`` (colocated; needs
  ``enable_memory_saver=True`` at launch; no tags = every kind, ``MEMORY_TAGS``),
  ``pause_generation`` / ``continue_generation``, ``flush_cache``, ``shutdown``.
Each returns ``(success, message)`` (in-process) or, over HTTP, JSON ``{"success", "message"}``
with status 200 or 400 (a refusal is a 400 whose body still says why); ``flush_cache`` answers
plain text, the memory routes ``null``.

Every call goes through one worker thread with a deadline: a dead or stuck engine becomes an
``EngineError`` naming the engine and the call, not a hang; a refused update becomes a
``WeightSyncError`` carrying SGLang's message. sglang is imported only when an engine is launched,
so this module (and its CPU tests against a fake client) needs no GPU.
"""

import asyncio
import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's tensor reductions with ForkingPickler)

from srpo_megatron.rollout.engine import FinishReason, RolloutBatch, SamplingParams
from srpo_megatron.rollout.weight_sync.broadcast import WeightSyncError, as_result

# sglang.srt.constants (0.5.23): what release/resume_memory_occupation take as tags
WEIGHTS_TAG = "weights"
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


class EngineError(RuntimeError):
    """An SGLang engine died, timed out or answered a call with an error."""


def serialize_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> str:
    """``[(name, tensor)]`` as the base64 text the HTTP ``update_weights_from_tensor`` route takes:
    the bytes of SGLang's ``MultiprocessingSerializer.serialize`` (torch's ForkingPickler, under
    which a CUDA tensor travels as an IPC handle and a CPU tensor as shared memory, never its
    data). The tensors must stay alive until the engine has answered."""
    if any(t.is_cuda for _, t in named_tensors):
        # as SGLang's own producers do: the device travels as its UUID, not as this process's index
        # (the engine may number its GPUs otherwise, e.g. another CUDA_VISIBLE_DEVICES)
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()
    buffer = io.BytesIO()
    ForkingPickler(buffer).dump(named_tensors)
    return base64.b64encode(buffer.getvalue()).decode()


def import_sglang():
    try:
        import sglang
    except ImportError as e:
        raise ImportError(
            "the SGLang rollout engine needs sglang (GPU only): pip install 'srpo_megatron[gpu]'; "
            "on a CPU machine use the HF engine (rollout.engine: hf)"
        ) from e
    return sglang


def sampling_params_dict(params: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams as SGLang's per-request ``sampling_params``. ``n`` is handled by sending
    each prompt ``n`` times (one request per sample keeps the output order ours)."""
    out = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": -1,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "skip_special_tokens": False,
        "no_stop_trim": True,  # keep the stop token in output_ids: it is a sampled, trained token
    }
    return out


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


class SGLangHTTPClient:
    """The same method names as ``sglang.Engine``, as POSTs to a launched server's routes."""

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
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return _parse_body(response.read(), ok=True)
        except urllib.error.HTTPError as e:  # a 400 carries the engine's reason in its body
            answer = _parse_body(e.read(), ok=False)
            if isinstance(answer, dict) and "success" in answer:
                return answer
            raise EngineError(f"{self.url}/{route}: HTTP {e.code}: {answer}") from None

    def health(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def generate(self, **kwargs):
        return self._post("generate", kwargs)

    def init_weights_update_group(self, **kwargs):
        return self._post("init_weights_update_group", kwargs)

    def update_weights_from_distributed(self, **kwargs):
        return self._post("update_weights_from_distributed", kwargs)

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

    def pause_generation(self):
        return self._post("pause_generation")

    def continue_generation(self):
        return self._post("continue_generation")

    def flush_cache(self):
        return self._post("flush_cache")

    def get_weights_by_name(self, name, truncate_size=100):
        return self._post("get_weights_by_name", {"name": name, "truncate_size": truncate_size})

    def shutdown(self):
        pass  # the server's owner stops it


def _parse_body(body: bytes, ok: bool) -> Any:
    """JSON when it is JSON (``null`` -> None); a plain-text answer (``flush_cache``) as a result."""
    text = body.decode(errors="replace")
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return {"success": ok, "message": text.strip()}


class SGLangEngine:
    """One SGLang replica (``tp_size`` GPUs) behind the ``RolloutEngine`` interface.

    client: an ``sglang.Engine`` or ``SGLangHTTPClient``; use ``launch`` / ``connect``.
    It is also a ``WeightReceiverHandle`` (``request_join`` / ``request_receive``) for
    ``BroadcastWeightSender``. With PP > 1 every stage's source rank sends to the engines itself,
    so each needs a handle: use servers (``connect``) there; an in-process engine belongs to one
    process.
    """

    def __init__(self, client: Any, *, tp_size: int = 1, name: str = "sglang", timeout_s: float = 600.0):
        self.client = client
        self.world_size = tp_size
        self.name = name
        self.timeout_s = timeout_s
        loop = getattr(client, "loop", None)  # sglang.Engine drives an asyncio loop it created
        self._worker = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"{name}-calls",
            initializer=(lambda: asyncio.set_event_loop(loop)) if loop is not None else None,
        )

    @classmethod
    def launch(
        cls,
        model_path: str,
        *,
        tp_size: int = 1,
        base_gpu_id: int = 0,
        colocated: bool = False,
        name: str = "sglang",
        timeout_s: float = 600.0,
        **server_args: Any,
    ) -> "SGLangEngine":
        """Start an in-process ``sglang.Engine`` on GPUs ``base_gpu_id .. base_gpu_id + tp_size - 1``.
        colocated=True turns on SGLang's memory saver (needed by ``release_memory``)."""
        sglang = import_sglang()
        engine = sglang.Engine(
            model_path=model_path,
            tp_size=tp_size,
            base_gpu_id=base_gpu_id,
            skip_tokenizer_init=True,
            enable_memory_saver=colocated,
            **server_args,
        )
        return cls(engine, tp_size=tp_size, name=name, timeout_s=timeout_s)

    @classmethod
    def connect(cls, url: str, *, tp_size: int = 1, timeout_s: float = 600.0) -> "SGLangEngine":
        client = SGLangHTTPClient(url, tp_size=tp_size, timeout_s=timeout_s)
        return cls(client, tp_size=tp_size, name=url, timeout_s=timeout_s)

    # -- calls ---------------------------------------------------------------------------------
    def submit(self, method: str, **kwargs: Any) -> Future:
        return self._worker.submit(getattr(self.client, method), **kwargs)

    def call(self, method: str, *, timeout_s: float | None = None, **kwargs: Any) -> Any:
        timeout_s = timeout_s or self.timeout_s
        try:
            return self.submit(method, **kwargs).result(timeout=timeout_s)
        except FutureTimeout:
            raise EngineError(
                f"engine {self.name!r}: {method} did not return within {timeout_s:g} s"
            ) from None
        except Exception as e:
            raise EngineError(f"engine {self.name!r}: {method} failed: {e!r}") from e

    def _checked(
        self, method: str, error: type[Exception] = EngineError, timeout_s: float | None = None, **kwargs: Any
    ) -> None:
        ok, message = as_result(self.call(method, timeout_s=timeout_s, **kwargs))
        if not ok:
            raise error(f"engine {self.name!r} refused {method}: {message}")

    # -- RolloutEngine -------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> RolloutBatch:
        prompt_index = [i for i in range(len(prompt_ids)) for _ in range(params.n)]
        inputs = [list(prompt_ids[i]) for i in prompt_index]
        sampling = sampling_params_dict(params)
        outputs = self.call(
            "generate", input_ids=inputs, sampling_params=[sampling] * len(inputs), return_logprob=True
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
        return RolloutBatch(
            prompt_index=prompt_index,
            prompt_ids=inputs,
            response_ids=[p[0] for p in parsed],
            rollout_logp=[p[1] for p in parsed],
            finish_reasons=[p[2] for p in parsed],
        )

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Hand a bucket of HF-named tensors held by this process to every engine TP rank (CUDA IPC
        handles; an in-process ``sglang.Engine`` serialises them itself). The cache is flushed once
        at the end of a sync (``flush_cache``), not per bucket."""
        named_tensors = list(named_tensors)
        if isinstance(self.client, SGLangHTTPClient):
            self.update_weights_serialized([serialize_tensors(named_tensors) for _ in range(self.world_size)])
        else:
            self._checked(
                "update_weights_from_tensor",
                WeightSyncError,
                named_tensors=named_tensors,
                load_format=None,
                flush_cache=False,
            )

    def update_weights_serialized(self, payloads: Sequence[str]) -> None:
        """One ``serialize_tensors`` payload per engine TP rank, rank ``j``'s made by the process on
        that rank's GPU (colocated: each engine rank opens IPC handles of memory on its own GPU)."""
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

    def pause_generation(self) -> None:
        self.call("pause_generation")

    def continue_generation(self) -> None:
        self.call("continue_generation")

    def shutdown(self) -> None:
        try:
            self.client.shutdown()
        finally:
            self._worker.shutdown(wait=False)

    # -- WeightReceiverHandle (disaggregated) ----------------------------------------------------
    def request_join(self, **kwargs: Any) -> Future:
        return self.submit("init_weights_update_group", **kwargs)

    def request_receive(self, message: dict[str, Any]) -> Future:
        return self.submit("update_weights_from_distributed", **message)
