"""MLServer's adaptive batching, with a batch closed as soon as no request can join it.

MLServer's batcher waits `max_batch_time` for more requests unless `max_batch_size` is reached. Under load,
every open connection's request is often in the batch already: over HTTP/1.1 a connection sends its next request
only once it has its answer, so the wait can bring nothing, and the replica idles up to 4 ms a batch while its
clients wait (issue #15). `BatchGate` knows when that is: the validation layer counts the REST requests it reads
and hands to the data plane, and uvicorn knows the open connections. The batch size and time limits, the
merging, the model call and the metrics stay MLServer's own; what the gate changes is only when a batch closes,
and only for batches made of REST requests (gRPC multiplexes requests on a connection: its batches wait as they
always did).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from mlserver.batching.adaptive import AdaptiveBatcher
from mlserver.batching.requests import BatchedRequests

# Where MLServer keeps a model's batcher (mlserver.batching.hooks._AdaptiveBatchingAttr), found per call.
BATCHER_ATTRIBUTE = "__adaptive_batching__"
RECHECK_SECONDS = 0.001


class BatchGate:
    """Whether a batch may close before `max_batch_time`: every open REST connection has its request in the data
    plane, and none is on its way there. `connections` gives the open connections (None: unknown, never close)."""

    def __init__(self, connections: Callable[[], int | None] = lambda: None) -> None:
        self.connections = connections
        self.arriving = 0  # REST inference requests read, not yet handed to the data plane (or refused)
        self.handed: set[int] = set()  # id() of the REST requests inside the data plane

    def handing(self, request: Any) -> None:
        """A request read earlier goes into the data plane now."""
        self.arriving -= 1
        self.handed.add(id(request))

    def answered(self, request: Any) -> None:
        """The data plane answered it; counted as arriving again until the layer is done with it."""
        self.handed.discard(id(request))
        self.arriving += 1

    def complete(self, batch: Iterable[Any]) -> bool:
        if self.arriving:
            return False
        open_connections = self.connections()
        if open_connections is None or open_connections > len(self.handed):
            return False  # a connection without a request in flight may send one any moment
        return all(id(request) in self.handed for request in batch)


class ClosingBatcher(AdaptiveBatcher):
    """MLServer 1.7.1's `AdaptiveBatcher._batch_requests`, plus the gate: stop waiting when it says no request can
    join. tests/test_batching.py pins the source this copies, so an MLServer upgrade re-checks it."""

    gate: BatchGate

    async def _batch_requests(self) -> AsyncIterator[BatchedRequests]:
        while not self._requests.empty():
            to_batch: dict[str, Any] = {}
            start = time.time()
            timeout = self._max_batch_time
            try:
                while len(to_batch) < self._max_batch_size:
                    if to_batch and self._requests.empty() and self.gate.complete(to_batch.values()):
                        break  # nothing can arrive before these are answered
                    # A connection closing or a request refused can complete the batch without a request
                    # arriving: the gate is asked again every RECHECK_SECONDS of the wait.
                    wait = min(timeout, RECHECK_SECONDS) if to_batch else timeout
                    try:
                        internal_id, inference_request = await self._get_request(timeout=wait)
                    except TimeoutError:
                        if wait >= timeout:
                            raise
                    else:
                        to_batch[internal_id] = inference_request
                    timeout = self._max_batch_time - (time.time() - start)
            except TimeoutError:
                pass
            yield BatchedRequests(to_batch)


def close_batches_early(model: Any, gate: BatchGate) -> bool:
    """Let the loaded model's batcher close batches by the gate; False if the model does not batch."""
    batcher = getattr(model, BATCHER_ATTRIBUTE, None)
    if not isinstance(batcher, AdaptiveBatcher):
        return False
    batcher.__class__ = ClosingBatcher  # the same batcher (queue, futures, metrics), its loop as above
    batcher.gate = gate
    return True


def uvicorn_connections(rest_server: Any) -> Callable[[], int | None]:
    """The open connections of MLServer's REST server (its uvicorn server exists once it has started)."""

    def count() -> int | None:
        server = getattr(rest_server, "_server", None)
        state = getattr(server, "server_state", None)
        return None if state is None else len(state.connections)

    return count
