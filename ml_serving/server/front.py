"""The serving front: an ASGI app that owns every REST route (routes.ROUTES) and checks every inference request.

A validated request goes straight to MLServer's data plane (the call its V2 route makes, without parsing the
body a second time), so `/invocations` (MLflow's scoring protocol), turned into an Open Inference Protocol
request, shares adaptive batching and the `model_infer_*` metrics with V2 clients; its answer goes back in
MLflow's format (validation.protocols.predictions). Paths and methods outside the route table are answered
here (404, 405): nothing reaches MLServer unchecked. MLServer's FastAPI app is not used at all; the front
records MLServer's own REST request metrics (`RequestMetrics`: the same series, labels and route templates).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any

import orjson

from ml_serving.server import LATENCY_BUCKETS, REFUSALS_METRIC, protocols
from ml_serving.server import validation as v
from ml_serving.server.batching import BatchGate
from ml_serving.server.outputs import json_default
from ml_serving.server.routes import Answer, Route, match

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

CLIENT_CLOSED = 499  # what MLServer's request metrics record for a client gone before the answer
logger = logging.getLogger("ml_serving.server")


class RequestMetrics:
    """MLServer's REST request metrics (starlette_exporter's counter, histogram and in-progress gauge, the very
    objects its middleware uses), for the requests answered in front of MLServer's app; latency in
    LATENCY_BUCKETS, like the BentoML runtime's."""

    def __init__(self, settings: Any, app_name: str = "mlserver") -> None:
        from starlette_exporter import PrometheusMiddleware

        exporter = PrometheusMiddleware(
            None, app_name=app_name, prefix=settings.metrics_rest_server_prefix, buckets=LATENCY_BUCKETS
        )
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


class Front:
    """The REST front of one served model. `data_plane` is MLServer's (`DataPlane`); `metrics` records MLServer's
    REST request metrics (None: metrics off); `gate` is told which requests are on their way to the data plane
    and which are in it (batching.BatchGate)."""

    def __init__(
        self,
        model_name: str,
        model_version: str | None,
        inputs: v.Inputs,
        limits: v.Limits,
        data_plane: Any,
        metrics: RequestMetrics | None = None,
        gate: BatchGate | None = None,
    ) -> None:
        self.data_plane = data_plane
        self.model_name = model_name
        self.model_version = model_version
        self.inputs = inputs
        self.limits = limits
        self.metrics = metrics
        self.gate = gate or BatchGate()  # without connections to count, it never closes a batch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # websockets (uvicorn runs without lifespan)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        method = scope["method"]
        found = match(method, scope["path"])
        route = found.route
        if route is None or not route.counted or self.metrics is None:
            await self._answer(scope, receive, send, route, found.params, found.allowed)
            return
        self.metrics.started(method)
        began = time.perf_counter()
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        try:
            status = await self._answer(scope, receive, send, route, found.params, found.allowed)
        finally:
            self.metrics.finished(method, route.template, status, time.perf_counter() - began)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, route: Route | None, params: dict, allowed: frozenset
    ) -> int:
        """Answer the request; the status sent."""
        inference = route is not None and route.answer in (Answer.INFER, Answer.INVOCATIONS)
        if inference:
            self.gate.arriving += 1
        try:
            if route is None:
                raise self._no_route(scope, allowed)
            if route.answer is Answer.READ_ONLY:
                raise v.RequestError(
                    HTTPStatus.FORBIDDEN,
                    v.Refusal.READ_ONLY,
                    "loading and unloading models is disabled here: this server serves "
                    f"'{self.model_name}', as its stack declares",
                )
            self.check_model(params)
            if not route.takes_body:
                _check_no_body(scope)
            handler = getattr(self, f"_{route.answer.value}")
            return await handler(scope, receive, send)
        except v.RequestError as error:
            self._count_refusal(error.reason)
            headers = [(b"allow", ", ".join(sorted(allowed)).encode())] if allowed else []
            return await _respond(send, error.status, {"error": error.message}, headers)
        except ClientGone:
            return CLIENT_CLOSED
        finally:
            if inference:
                self.gate.arriving -= 1

    def _no_route(self, scope: Scope, allowed: frozenset) -> v.RequestError:
        where = f"{scope['method']} {scope['path']}"
        if allowed:
            return v.RequestError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                v.Refusal.METHOD,
                f"{where}: use {' or '.join(sorted(allowed - {'HEAD'}))}",
            )
        return v.RequestError(
            HTTPStatus.NOT_FOUND,
            v.Refusal.NO_ROUTE,
            f"{where} is not served here; inference is POST /v2/models/{self.model_name}/infer or POST /invocations",
        )

    def _count_refusal(self, reason: v.Refusal) -> None:
        refusals().labels(model=self.model_name, reason=reason.value).inc()

    def check_model(self, params: dict[str, str]) -> None:
        """Only the served model exists here: other names must not reach MLServer (each would add metric series)."""
        name, version = params.get("model_name"), params.get("model_version")
        if name is not None and name != self.model_name:
            raise v.RequestError(
                HTTPStatus.NOT_FOUND,
                v.Refusal.UNKNOWN_MODEL,
                f"model '{name}' is not served here; this server serves '{self.model_name}'",
            )
        if version is not None and self.model_version and version != self.model_version:
            raise v.RequestError(
                HTTPStatus.NOT_FOUND,
                v.Refusal.UNKNOWN_MODEL,
                f"model '{name}' version '{version}' is not served here; the version is '{self.model_version}'",
            )

    async def is_ready(self) -> bool:
        try:
            return bool(await self.data_plane.model_ready(self.model_name, self.model_version))
        except Exception:  # the model is not in the registry at all
            return False

    async def _ready(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Readiness is "this model is loaded and can predict", not "the server is up": the probe's question."""
        if await self.is_ready():
            return await _respond(send, HTTPStatus.OK, {"ready": True})
        error = f"model '{self.model_name}' is not loaded"
        return await _respond(send, HTTPStatus.SERVICE_UNAVAILABLE, {"ready": False, "error": error})

    async def _live(self, scope: Scope, receive: Receive, send: Send) -> int:
        return await _respond(send, HTTPStatus.OK, {"live": await self.data_plane.live()})

    async def _ping(self, scope: Scope, receive: Receive, send: Send) -> int:
        return await _respond_raw(send, HTTPStatus.OK, b"\n")  # as MLflow's scoring server answers

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> int:
        from mlflow.version import VERSION

        return await _respond_raw(send, HTTPStatus.OK, VERSION.encode())

    async def _server_metadata(self, scope: Scope, receive: Receive, send: Send) -> int:
        metadata = await self.data_plane.metadata()
        return await _respond(send, HTTPStatus.OK, metadata.model_dump(exclude_unset=True, exclude_none=True))

    async def _model_metadata(self, scope: Scope, receive: Receive, send: Send) -> int:
        metadata = await self.data_plane.model_metadata(self.model_name, self.model_version)
        return await _respond(send, HTTPStatus.OK, metadata.model_dump(exclude_unset=True, exclude_none=True))

    async def _index(self, scope: Scope, receive: Receive, send: Send) -> int:
        """The repository index: the one model this server serves (MLServer's own scan of its folder finds none)."""
        body = await self._read_body(scope, receive)
        only_ready = protocols.index_request(v.parse_json(body, self.limits) if body.strip() else {})
        ready = await self.is_ready()
        entry = {"name": self.model_name, "state": "READY" if ready else "UNAVAILABLE", "reason": ""}
        if self.model_version:
            entry["version"] = self.model_version
        return await _respond(send, HTTPStatus.OK, [] if only_ready and not ready else [entry])

    async def _infer(self, scope: Scope, receive: Receive, send: Send) -> int:
        _check_content_type(scope, required=False)
        payload = v.parse_json(await self._read_body(scope, receive), self.limits)
        status, answer, headers = await self.run(checked_request(v.check_v2(payload, self.inputs, self.limits)))
        if status == HTTPStatus.OK:
            protocols.strip_output_kind(answer)
        return await _respond(send, status, answer, headers)

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> int:
        _check_content_type(scope, required=True)
        body = await self._read_body(scope, receive)
        request = v.invocation_request(v.parse_json(body, self.limits), self.inputs, self.limits)
        status, answer, headers = await self.run(checked_request(request))
        predictions = protocols.predictions(answer) if status == HTTPStatus.OK else answer
        return await _respond(send, status, predictions, headers)

    async def run(self, request: Any, rest: bool = True) -> tuple[int, dict[str, Any], Headers]:
        """MLServer's own inference call: batching, metrics. Its errors keep their status. The answer's headers
        (the CloudEvents `Ce-*` headers Seldon's request logger reads) go out as HTTP headers, not in the body,
        as MLServer's REST route sends them. `rest`: a request the batch gate counts (gRPC's are not)."""
        from mlserver.errors import MLServerError
        from mlserver.utils import extract_headers

        if rest:
            self.gate.handing(request)
        try:
            response = await self.data_plane.infer(request, self.model_name, self.model_version)
        except MLServerError as exc:
            if 400 <= exc.status_code < 500:
                raise v.RequestError(HTTPStatus(exc.status_code), v.Refusal.MODEL_REFUSED, str(exc)) from None
            return exc.status_code, {"error": str(exc)}, ()
        except Exception as exc:  # the model itself failed on valid input: the server's fault, and counted so
            logger.exception("inference failed")
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the model failed: {type(exc).__name__}: {exc}"}, ()
        finally:
            if rest:
                self.gate.answered(request)
        headers = extract_headers(response) or {}
        raw = [(name.lower().encode("latin-1"), str(value).encode("latin-1")) for name, value in headers.items()]
        return HTTPStatus.OK, response.model_dump(exclude_none=True), raw

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise v.RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                v.Refusal.TOO_LARGE,
                f"body of {declared} bytes is over the limit of {limit} bytes",
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
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            v.Refusal.TOO_LARGE,
                            f"body is over the limit of {limit} bytes",
                        )
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise v.RequestError(
                HTTPStatus.REQUEST_TIMEOUT,
                v.Refusal.BODY_TIMEOUT,
                f"the body did not arrive within {self.limits.body_timeout_seconds:g} s",
            ) from None


def checked_request(payload: dict[str, Any]) -> Any:
    """A checked payload as MLServer's request model. Pydantic's validating constructor, not `model_construct`:
    in pydantic 2.14 it is the faster of the two for a request of a few tensors (bench/ab_front.py)."""
    from mlserver.types import InferenceRequest

    try:
        return InferenceRequest.model_validate(payload)
    except ValueError as exc:
        raise v.RequestError(
            HTTPStatus.UNPROCESSABLE_ENTITY, v.Refusal.BAD_STRUCTURE, f"not a valid inference request: {exc}"
        ) from None


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


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _check_content_type(scope: Scope, required: bool) -> None:
    header = _header(scope, b"content-type")
    if header is None:
        if required:
            raise v.RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, v.Refusal.MEDIA_TYPE, "missing Content-Type: send application/json"
            )
        return
    mime, *parameters = [part.strip().lower() for part in header.split(";")]
    if mime != "application/json":
        raise v.RequestError(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
            v.Refusal.MEDIA_TYPE,
            f"Content-Type {mime!r} is not supported: send application/json",
        )
    for parameter in parameters:
        key, _, value = parameter.partition("=")
        if key == "charset" and value.strip('"') not in ("utf-8", "utf8"):
            raise v.RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                v.Refusal.MEDIA_TYPE,
                f"charset {value!r} is not supported: send UTF-8",
            )


def _check_no_body(scope: Scope) -> None:
    """A GET route reads nothing: a body sent to it (an inference request sent with the wrong method, say) is
    refused rather than ignored."""
    length = _header(scope, b"content-length")
    if (length is not None and length.strip() not in ("", "0")) or _header(scope, b"transfer-encoding") is not None:
        raise v.RequestError(
            HTTPStatus.BAD_REQUEST,
            v.Refusal.BAD_STRUCTURE,
            f"{scope['method']} {scope['path']} takes no body; inference is a POST",
        )


async def _respond(send: Send, status: int, payload: Any, headers: Headers = ()) -> int:
    await _respond_raw(send, status, orjson.dumps(payload, default=json_default), headers)
    return status


async def _respond_raw(send: Send, status: int, body: bytes, headers: Headers = ()) -> int:
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
    return status
