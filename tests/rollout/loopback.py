"""An engine endpoint in another local process, reached through multiprocessing queues (a test
helper, also imported by ``benchmarks/weight_sync.py``).

The CPU stand-in for the HTTP channel to an SGLang engine: the sending rank holds a
``LoopbackEngineHandle`` (a ``WeightReceiverHandle``), the engine process runs ``serve_requests``
in front of a ``BroadcastWeightReceiver`` (or anything with the same method names); the
collectives themselves are real. (The trainer's HTTP path runs against the stand-in server,
``srpo_megatron/testing/fake_sglang_server.py``.)
"""

import queue
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

SHUTDOWN = "shutdown"


class LoopbackEngineHandle:
    """Sender-side handle. ``requests`` is shared by every client of one engine process;
    ``replies[client_id]`` is this client's own answer queue."""

    def __init__(
        self,
        requests,
        replies,
        client_id: int,
        *,
        name: str = "loopback",
        world_size: int = 1,
        timeout_s: float = 120.0,
    ):
        self.name = name
        self.world_size = world_size
        self.requests = requests
        self.reply_queue = replies[client_id]
        self.client_id = client_id
        self.timeout_s = timeout_s
        # one thread: answers arrive in request order, so they are read in that order
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-replies")

    def _call(self, method: str, kwargs: dict[str, Any]) -> Future:
        self.requests.put((self.client_id, method, kwargs))
        return self._reader.submit(self.reply_queue.get, timeout=self.timeout_s)

    def request_join(self, **kwargs) -> Future:
        return self._call("init_weights_update_group", kwargs)

    def request_receive(self, message: dict[str, Any]) -> Future:
        return self._call("update_weights_from_distributed", message)

    def request_leave(self, group_name: str) -> Future:
        return self._call("destroy_weights_update_group", {"group_name": group_name})

    def shutdown(self) -> None:
        self._call(SHUTDOWN, {}).result()
        self._reader.shutdown()


def serve_requests(engine, requests, replies, num_clients: int = 1, timeout_s: float = 300.0) -> None:
    """Engine-side loop: run each request on ``engine`` in arrival order (an SGLang scheduler also
    serves weight updates one at a time) until every client has sent ``shutdown``."""
    remaining = num_clients
    while remaining:
        try:
            client_id, method, kwargs = requests.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no request from the trainer within {timeout_s:.0f} s") from None
        if method == SHUTDOWN:
            remaining -= 1
            replies[client_id].put((True, "bye"))
            continue
        replies[client_id].put(getattr(engine, method)(**kwargs))
