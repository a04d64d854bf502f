"""BentoML's adaptive batcher called in the process: the one module that touches BentoML's private API.

A batchable `@bentoml.api` is reached only over HTTP: called from the service's own handlers, each request made a
second HTTP exchange inside the worker (BentoML's aiohttp client, its middlewares, JSON and pydantic both ways),
which one request at a time doubled the runtime's latency (issue 27). Here the very dispatcher BentoML builds for a
batchable API (`CorkDispatcher`: its wait optimizer, and its shedding of work past `max_latency_ms`) is made
directly and given rows. Written for BentoML `PINNED`; `tests/test_bentoml.py` checks the contract it relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import bentoml
from bentoml._internal.marshal.dispatcher import CorkDispatcher, Optimizer

PINNED = "1.4.40"
if bentoml.__version__ != PINNED:
    raise ImportError(
        f"ml_serving.server.bento_batching uses BentoML {PINNED}'s private CorkDispatcher, found BentoML "
        f"{bentoml.__version__}: install bentoml=={PINNED} (serving_image/bentoml/requirements.txt), or check the "
        f"dispatcher's contract (tests/test_bentoml.py) against the new version and update PINNED"
    )


class Shed(Exception):
    """The dispatcher refused the rows: they would exceed the latency budget (BentoML's own overload verdict)."""


def _shed() -> Any:
    raise Shed


class _NoWait(Optimizer):
    """BentoML's optimizer without its wait. It holds a lone request back for the mean of past waits, so the waits
    feed themselves: on a busy machine, where a tick of the loop takes longer than asked, the wait grew far
    past the model's own time. Without it a batch leaves as soon as the previous one is done; what arrived
    meanwhile forms the next batch (over HTTP/1.1 a connection's next request waits for its answer: waiting
    longer gathers nothing). The fitted per-row and per-batch costs still decide what to shed."""

    def trigger_refresh(self) -> None:
        super().trigger_refresh()
        self.wait = 0


class RowBatcher:
    """Rows from concurrent requests predicted in one call: `predict` gets every row of a batch and answers one
    result per row, in anything sliced by rows (a list, an array, columns): each request gets its slice.

    `predict` runs in the event loop's own thread, one batch at a time, as the MLServer image runs its model. A
    worker thread per batch cost two thread wake-ups a request, each a wait for a CPU on a busy machine, where the
    runtime then answered slower than MLServer for the same CPU (bench/runtime_cost.py). What arrives meanwhile
    waits in the socket and forms the next batch; the latency budget counts from when a request is read."""

    def __init__(
        self,
        predict: Callable[[list[dict[str, Any]]], Any],
        max_batch_size: int,
        max_latency_ms: int,
        observe: Callable[[int], None] = lambda size: None,
    ) -> None:
        dispatcher: CorkDispatcher[list[dict[str, Any]], Any] = CorkDispatcher(
            max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size, fallback=_shed, get_batch_size=len
        )

        async def run(requests: Sequence[list[dict[str, Any]]]) -> list[Any]:
            rows = [row for request in requests for row in request]
            observe(len(rows))
            predicted = predict(rows)
            answers, start = [], 0
            for request in requests:
                answers.append(predicted[start : start + len(request)])
                start += len(request)
            return answers

        dispatcher.optimizer = _NoWait(dispatcher.max_latency)
        self.optimizer = dispatcher.optimizer
        self._call = dispatcher(run)

    async def __call__(self, rows: list[dict[str, Any]]) -> Any:
        """The predictions for `rows` (their slice of the batch's answer), batched with whatever else is waiting;
        raises `Shed` past the budget."""
        return await self._call(rows)
