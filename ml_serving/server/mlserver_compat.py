"""Every access to MLServer's private parts, in one place, for the MLServer version it was written for.

Written for MLServer 1.7.1. Another minor version refuses to start (`check_version`) unless
`ML_SERVING_ALLOW_MLSERVER=<its version>` says someone has run tests/test_mlserver_compat.py against it, which
has a contract test per access below. Everything else in `ml_serving.server` uses MLServer's public classes and
functions only (`DataPlane`, `MultiModelRegistry`, `load_batching`, the gRPC converters and servicer bases).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

from mlserver.batching.adaptive import AdaptiveBatcher
from mlserver.batching.requests import BatchedRequests

MLSERVER_VERSION = "1.7.1"
OVERRIDE_ENV = "ML_SERVING_ALLOW_MLSERVER"
# Where MLServer's load_batching keeps a model's batcher (mlserver.batching.hooks._AdaptiveBatchingAttr).
BATCHER_ATTRIBUTE = "__adaptive_batching__"
RECHECK_SECONDS = 0.001


class IncompatibleMLServer(RuntimeError):
    """The installed MLServer is not the minor version this module was written for."""


def check_version(installed: str | None = None) -> None:
    """Refuse an MLServer of another minor version than MLSERVER_VERSION, unless OVERRIDE_ENV names it."""
    installed = installed or version("mlserver")
    if installed.split(".")[:2] == MLSERVER_VERSION.split(".")[:2] or os.environ.get(OVERRIDE_ENV) == installed:
        return
    raise IncompatibleMLServer(
        f"MLServer {installed} is installed, but ml_serving.server.mlserver_compat was written for "
        f"{MLSERVER_VERSION}: run tests/test_mlserver_compat.py against {installed}, then set "
        f"{OVERRIDE_ENV}={installed} to start anyway (or install mlserver=={MLSERVER_VERSION})"
    )


# The MLflow runtime's state (mlserver_mlflow.MLflowRuntime.load sets these) -----------------------------------


def pyfunc(runtime: Any) -> Any:
    """The loaded MLflow pyfunc model."""
    return runtime._model


def signature(runtime: Any) -> Any:
    """The loaded model's MLflow signature (None: logged without one)."""
    return runtime._signature


def inputs_index(runtime: Any) -> dict[str, Any]:
    """The model's input metadata by name, which MLServer's decode_request_input reads."""
    return runtime._inputs_index


def content_type(request: Any, runtime: Any) -> str | None:
    """The request codec MLServer's own decode_request would pick: the request's, else the model's."""
    from mlserver.codecs.utils import _get_content_type

    return _get_content_type(request, runtime.settings)


# Adaptive batching: a batch closes when the gate says no request can join it (batching.BatchGate) -------------


class ClosingBatcher(AdaptiveBatcher):
    """MLServer 1.7.1's `AdaptiveBatcher._batch_requests`, plus the gate: stop waiting when it says no request can
    join. tests/test_mlserver_compat.py pins the source this copies, so an MLServer upgrade re-checks it."""

    gate: Any

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


def close_batches_early(model: Any, gate: Any) -> bool:
    """Let the loaded model's batcher (made by MLServer's load_batching) close batches by the gate; False if the
    model does not batch."""
    batcher = getattr(model, BATCHER_ATTRIBUTE, None)
    if not isinstance(batcher, AdaptiveBatcher):
        return False
    batcher.__class__ = ClosingBatcher  # the same batcher (queue, futures, metrics), its loop as above
    batcher.gate = gate
    return True
