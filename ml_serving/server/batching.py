"""MLServer's adaptive batching, with a batch closed as soon as no request can join it.

MLServer's batcher waits `max_batch_time` for more requests unless `max_batch_size` is reached. Under load,
every open connection's request is often in the batch already: over HTTP/1.1 a connection sends its next request
only once it has its answer, so the wait can bring nothing, and the replica idles up to 4 ms a batch while its
clients wait (issue #15). `BatchGate` knows when that is: the validation layer counts the REST requests it reads
and hands to the data plane, and uvicorn knows the open connections. The batch size and time limits, the
merging, the model call and the metrics stay MLServer's own; what the gate changes is only when a batch closes,
and only for batches made of REST requests (gRPC multiplexes requests on a connection: its batches wait as they
always did). The batcher that asks the gate is mlserver_compat.ClosingBatcher (it copies a private loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


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


def uvicorn_connections(server: Any) -> Callable[[], int | None]:
    """The open connections of a uvicorn server (None before it has started)."""

    def count() -> int | None:
        return len(server.server_state.connections) if server.started else None

    return count
