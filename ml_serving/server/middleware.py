"""The ASGI layer in front of MLServer's REST app: read, limit and validate every inference request.

A validated request goes straight to MLServer's data plane (the same call its V2 route makes, without parsing
the body a second time), so `/invocations` (MLflow's scoring protocol), turned into an Open Inference Protocol
request, shares adaptive batching and the `model_infer_*` metrics with V2 clients; its answer goes back in
MLflow's format.

The layer runs outermost, in front of MLServer's whole app: the requests it answers (inference, readiness,
refusals) skip MLServer's FastAPI stack, whose middlewares and route matching cost more per request than the
validation itself (issue #15: 14 % less CPU per request), and it records MLServer's own REST request metrics
for them (`RequestMetrics`: the same series, labels and route templates). When MLServer's app wraps requests in
something of its own (gzip, CORS, tracing), the layer sits innermost instead and MLServer's metrics count it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from ml_serving.server import INFER_ROUTE, INVOCATIONS_ROUTE, REFUSALS_METRIC, VERSION_INFER_ROUTE
from ml_serving.server import validation as v
from ml_serving.server.batching import BatchGate
from ml_serving.server.outputs import json_default

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

READY = "/v2/health/ready"
V2_MODELS = "/v2/models/"
CLIENT_CLOSED = 499  # what MLServer's request metrics record for a client gone before the answer
logger = logging.getLogger("ml_serving.server")


def runs_in_front(settings: Any) -> bool:
    """Whether the layer can run in front of MLServer's app: only if the app adds nothing to a request's way
    (gzip, CORS and tracing do), since the requests the layer answers never reach it."""
    return not (settings.gzip_enabled or settings.cors_settings or settings.tracing_server)


class RequestMetrics:
    """MLServer's REST request metrics (starlette_exporter's counter, histogram and in-progress gauge, the very
    objects its middleware uses), for the requests answered in front of MLServer's app."""

    def __init__(self, settings: Any, app_name: str = "mlserver") -> None:
        from starlette_exporter import PrometheusMiddleware

        exporter = PrometheusMiddleware(None, app_name=app_name, prefix=settings.metrics_rest_server_prefix)
        self.requests = exporter.request_count
        self.duration = exporter.request_time
        self.in_progress = exporter.requests_in_progress
        self.app_name = app_name
        # The labelled series, each looked up once (as many as the metrics' own series).
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._in_flight: dict[str, Any] = {}

    def started(self, method: str) -> None:
        gauge = self._in_flight.get(method)
        if gauge is None:
            gauge = self._in_flight[method] = self.in_progress.labels(method, self.app_name)
        gauge.inc()

    def finished(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """A request answered: counted under its route's template (a path no route matches is not counted, as
        MLServer's middleware does)."""
        self._in_flight[method].dec()
        if route is None:
            return
        key = (method, route, status)
        series = self._series.get(key)
        if series is None:
            labels = (method, route, status, self.app_name)
            series = self._series[key] = (self.requests.labels(*labels), self.duration.labels(*labels))
        series[0].inc()
        series[1].observe(seconds)


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


class ValidationMiddleware:
    """`app` is MLServer's app (the layer in front of it) or the rest of its middleware stack (the layer inside
    it). `metrics` records the requests answered here when the layer runs in front; None inside MLServer's app,
    whose own metrics middleware counts them, or when metrics are off. `gate`, if any, is told which requests are
    on their way to the data plane and which are in it (batching.BatchGate)."""

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        model_name: str,
        model_version: str | None,
        inputs: v.Inputs,
        limits: v.Limits,
        data_plane: Any,
        metrics: RequestMetrics | None = None,
        routes: list[Any] | None = None,
        gate: BatchGate | None = None,
    ) -> None:
        self.app = app
        self.data_plane = data_plane
        self.model_name = model_name
        self.model_version = model_version
        self.inputs = inputs
        self.limits = limits
        self.metrics = metrics
        self.routes = routes or []
        self.gate = gate or BatchGate()  # without connections to count, it never closes a batch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == READY:  # not a request metric, as in MLServer
            return await self._ready(send)
        if not (path == INVOCATIONS_ROUTE or (path.startswith(V2_MODELS) and self._answers(scope))):
            return await self.app(scope, receive, send)
        self.gate.arriving += 1
        try:
            if self.metrics is None:
                await self._answer(scope, receive, send)
                return None
            method = scope["method"]
            self.metrics.started(method)
            began = time.perf_counter()
            status = 500
            try:
                status = await self._answer(scope, receive, send)
            finally:
                self.metrics.finished(method, self._route(scope), status, time.perf_counter() - began)
        finally:
            self.gate.arriving -= 1

    def _answers(self, scope: Scope) -> bool:
        """A /v2/models/ request answered here: inference on the served model, or a refusal of any other model."""
        parts = scope["path"].split("/")
        if parts[3] != self.model_name:
            return True
        if len(parts) > 5 and parts[4] == "versions" and self.model_version and parts[5] != self.model_version:
            return True
        return parts[-1] == "infer" and len(parts) in (5, 7) and scope["method"] == "POST"

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer the request; the status sent."""
        try:
            if scope["path"] == INVOCATIONS_ROUTE:
                return await self._invocations(scope, receive, send)
            self._check_model(scope["path"])
            return await self._v2_infer(scope, receive, send)
        except v.RequestError as error:
            self._count_refusal(error.reason)
            return await self._send(scope, send, error.status, {"error": error.message})
        except ClientGone:
            return CLIENT_CLOSED

    def _route(self, scope: Scope) -> str | None:
        """The route template MLServer's metrics use for this path; known for inference, matched otherwise."""
        path = scope["path"]
        if path == INVOCATIONS_ROUTE:
            return INVOCATIONS_ROUTE
        if path.endswith("/infer"):
            return {5: INFER_ROUTE, 7: VERSION_INFER_ROUTE}.get(path.count("/") + 1)
        from starlette_exporter.middleware import get_matching_route_path

        return get_matching_route_path(scope, self.routes)

    async def _send(self, scope: Scope, send: Send, status: int, payload: Any, headers: Headers = ()) -> int:
        if self.metrics is None:
            _handled_here(scope)
        await _respond(send, status, payload, headers)
        return status

    def _count_refusal(self, reason: v.Refusal) -> None:
        refusals().labels(model=self.model_name, reason=reason.value).inc()

    def _check_model(self, path: str) -> None:
        """Only the served model exists here: other names must not reach MLServer (each would add metric series)."""
        parts = path.split("/")
        name = parts[3] if len(parts) > 3 else ""
        if name != self.model_name:
            raise v.RequestError(
                v.NOT_FOUND,
                v.Refusal.UNKNOWN_MODEL,
                f"model '{name}' is not served here; this server serves '{self.model_name}'",
            )
        if len(parts) > 5 and parts[4] == "versions" and self.model_version and parts[5] != self.model_version:
            raise v.RequestError(
                v.NOT_FOUND,
                v.Refusal.UNKNOWN_MODEL,
                f"model '{name}' version '{parts[5]}' is not served here; the version is '{self.model_version}'",
            )

    async def _ready(self, send: Send) -> None:
        """Readiness is "this model is loaded and can predict", not "the server is up": the probe's question."""
        try:
            ready = await self.data_plane.model_ready(self.model_name, self.model_version)
        except Exception:  # the model is not in the registry at all
            ready = False
        if ready:
            return await _respond(send, 200, {"ready": True})
        await _respond(send, 503, {"ready": False, "error": f"model '{self.model_name}' is not loaded"})

    async def _v2_infer(self, scope: Scope, receive: Receive, send: Send) -> int:
        _check_content_type(scope, required=False)
        payload = v.parse_json(await self._read_body(scope, receive), self.limits)
        status, answer, headers = await self._infer(v.check_v2(payload, self.inputs, self.limits))
        return await self._send(scope, send, status, answer, headers)

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> int:
        if scope["method"] != "POST":
            raise v.RequestError(v.NOT_ALLOWED, v.Refusal.METHOD, "use POST for /invocations")
        _check_content_type(scope, required=True)
        body = await self._read_body(scope, receive)
        request = v.invocation_request(v.parse_json(body, self.limits), self.inputs, self.limits)
        status, answer, headers = await self._infer(request)
        predictions = v.v2_to_predictions(answer) if status == 200 else answer
        return await self._send(scope, send, status, predictions, headers)

    async def _infer(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any], Headers]:
        """MLServer's own inference call: batching, workers, metrics. Its errors keep their status. The answer's
        headers (the CloudEvents `Ce-*` headers Seldon's request logger reads) go out as HTTP headers, not in the
        body, as MLServer's REST route sends them."""
        from mlserver.errors import MLServerError
        from mlserver.types import InferenceRequest
        from mlserver.utils import extract_headers

        try:
            request = _checked_request(payload) or InferenceRequest.model_validate(payload)
        except ValueError as exc:
            raise v.RequestError(
                v.UNPROCESSABLE, v.Refusal.BAD_STRUCTURE, f"not a valid inference request: {exc}"
            ) from None
        self.gate.handing(request)
        try:
            response = await self.data_plane.infer(request, self.model_name, self.model_version)
        except MLServerError as exc:
            if 400 <= exc.status_code < 500:
                raise v.RequestError(exc.status_code, v.Refusal.MODEL_REFUSED, str(exc)) from None
            return exc.status_code, {"error": str(exc)}, ()
        except Exception as exc:  # the model itself failed on valid input: the server's fault, and counted so
            logger.exception("inference failed")
            return 500, {"error": f"the model failed: {type(exc).__name__}: {exc}"}, ()
        finally:
            self.gate.answered(request)
        headers = extract_headers(response) or {}
        raw = [(name.lower().encode("latin-1"), str(value).encode("latin-1")) for name, value in headers.items()]
        return 200, response.model_dump(exclude_none=True), raw

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise v.RequestError(
                v.TOO_LARGE, v.Refusal.TOO_LARGE, f"body of {declared} bytes is over the limit of {limit} bytes"
            )
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_seconds):  # one timer for the whole body
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise v.RequestError(
                            v.TOO_LARGE, v.Refusal.TOO_LARGE, f"body is over the limit of {limit} bytes"
                        )
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise v.RequestError(
                v.TIMEOUT,
                v.Refusal.BODY_TIMEOUT,
                f"the body did not arrive within {self.limits.body_timeout_seconds:g} s",
            ) from None


def _checked_request(payload: dict[str, Any]) -> Any:
    """The validated request as MLServer's pydantic model without validating it a second time (the front's largest
    cost after the HTTP layer, bench/profile-front.txt); None for the rare shapes left to pydantic (an `id` that is
    not text, requested `outputs`, `headers` in parameters)."""
    from mlserver.types import InferenceRequest, Parameters, RequestInput, TensorData

    identifier = payload.get("id")
    if payload.get("outputs") is not None or not (identifier is None or isinstance(identifier, str)):
        return None
    tensors = payload["inputs"]
    every = [payload.get("parameters"), *(t.get("parameters") for t in tensors)]
    if any(p is not None and "headers" in p for p in every):
        return None

    def parameters(values: dict[str, Any] | None) -> Any:
        return None if values is None else Parameters.model_construct(**values)

    inputs = [
        RequestInput.model_construct(
            name=t["name"],
            shape=t["shape"],
            datatype=t["datatype"],  # MLServer keeps enum values (use_enum_values): the checked text
            parameters=parameters(t.get("parameters")),
            data=TensorData.model_construct(root=t["data"]),
        )
        for t in tensors
    ]
    return InferenceRequest.model_construct(
        id=identifier, parameters=parameters(payload.get("parameters")), inputs=inputs, outputs=None
    )


_refusals: Any = None


def refusals() -> Any:
    """The refusals counter, made on first use: MLServer switches prometheus_client to its multiprocess folder
    when it starts, and a counter made before that would never reach /metrics."""
    global _refusals
    if _refusals is None:
        from prometheus_client import Counter

        _refusals = Counter(
            REFUSALS_METRIC.removesuffix("_total"),
            "Requests refused as the client's mistake, by the check that refused them",
            ["model", "reason"],
        )
    return _refusals


def _handled_here(scope: Scope) -> None:
    """Inside MLServer's app: let its request metrics count a request answered here, under its route's template."""
    app = scope.get("app")
    if app is not None and hasattr(app, "router"):
        scope.setdefault("router", app.router)
        scope.setdefault("endpoint", _handled_here)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _check_content_type(scope: Scope, required: bool) -> None:
    header = _header(scope, b"content-type")
    if header is None:
        if required:
            raise v.RequestError(v.UNSUPPORTED, v.Refusal.MEDIA_TYPE, "missing Content-Type: send application/json")
        return
    mime, *parameters = [part.strip().lower() for part in header.split(";")]
    if mime != "application/json":
        raise v.RequestError(
            v.UNSUPPORTED, v.Refusal.MEDIA_TYPE, f"Content-Type {mime!r} is not supported: send application/json"
        )
    for parameter in parameters:
        key, _, value = parameter.partition("=")
        if key == "charset" and value.strip('"') not in ("utf-8", "utf8"):
            raise v.RequestError(v.UNSUPPORTED, v.Refusal.MEDIA_TYPE, f"charset {value!r} is not supported: send UTF-8")


async def _respond(send: Send, status: int, payload: Any, headers: Headers = ()) -> None:
    body = orjson.dumps(payload, default=json_default)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
