"""The ASGI layer in front of MLServer's REST routes: read, limit and validate every inference request.

A validated request goes straight to MLServer's data plane (the same call its V2 route makes, without parsing
the body a second time), so `/invocations` (MLflow's scoring protocol), turned into an Open Inference Protocol
request, shares adaptive batching, parallel workers and the `model_infer_*` metrics with V2 clients; its answer
goes back in MLflow's format. The middleware sits innermost, so MLServer's request metrics still count every
request under its route's path and final status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ml_serving.server import REFUSALS_METRIC
from ml_serving.server import validation as v
from ml_serving.server.outputs import json_default

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

INVOCATIONS = "/invocations"
READY = "/v2/health/ready"
logger = logging.getLogger("ml_serving.server")


class ClientGone(Exception):
    """The client disconnected before sending its whole body."""


class ValidationMiddleware:
    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        model_name: str,
        model_version: str | None,
        inputs: v.Inputs,
        limits: v.Limits,
        data_plane: Any,
    ) -> None:
        self.app = app
        self.data_plane = data_plane
        self.model_name = model_name
        self.model_version = model_version
        self.inputs = inputs
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        try:
            if path == INVOCATIONS:
                return await self._invocations(scope, receive, send)
            if path == READY:
                return await self._ready(send)
            if path.startswith("/v2/models/"):
                self._check_model(path)
                if path.endswith("/infer") and scope["method"] == "POST":
                    return await self._v2_infer(scope, receive, send)
        except v.RequestError as error:
            _handled_here(scope)
            self._count_refusal(error.reason)
            return await _respond(send, error.status, {"error": error.message})
        except ClientGone:
            return None
        return await self.app(scope, receive, send)

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

    async def _v2_infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        _check_content_type(scope, required=False)
        payload = v.parse_json(await self._read_body(scope, receive), self.limits)
        status, answer = await self._infer(v.check_v2(payload, self.inputs, self.limits))
        _handled_here(scope)
        await _respond(send, status, answer)

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            raise v.RequestError(v.NOT_ALLOWED, v.Refusal.METHOD, "use POST for /invocations")
        _check_content_type(scope, required=True)
        body = await self._read_body(scope, receive)
        request = v.invocation_request(v.parse_json(body, self.limits), self.inputs, self.limits)
        status, answer = await self._infer(request)
        _handled_here(scope)
        await _respond(send, status, v.v2_to_predictions(answer) if status == 200 else answer)

    async def _infer(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """MLServer's own inference call: batching, workers, metrics. Its errors keep their status."""
        from mlserver.errors import MLServerError
        from mlserver.types import InferenceRequest

        try:
            request = _checked_request(payload) or InferenceRequest.model_validate(payload)
        except ValueError as exc:
            raise v.RequestError(
                v.UNPROCESSABLE, v.Refusal.BAD_STRUCTURE, f"not a valid inference request: {exc}"
            ) from None
        try:
            response = await self.data_plane.infer(request, self.model_name, self.model_version)
        except MLServerError as exc:
            if 400 <= exc.status_code < 500:
                raise v.RequestError(exc.status_code, v.Refusal.MODEL_REFUSED, str(exc)) from None
            return exc.status_code, {"error": str(exc)}
        except Exception as exc:  # the model itself failed on valid input: the server's fault, and counted so
            logger.exception("inference failed")
            return 500, {"error": f"the model failed: {type(exc).__name__}: {exc}"}
        return 200, response.model_dump(exclude_none=True)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise v.RequestError(
                v.TOO_LARGE, v.Refusal.TOO_LARGE, f"body of {declared} bytes is over the limit of {limit} bytes"
            )
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_seconds
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise v.RequestError(
                    v.TIMEOUT,
                    v.Refusal.BODY_TIMEOUT,
                    f"the body did not arrive within {self.limits.body_timeout_seconds:g} s",
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise v.RequestError(v.TOO_LARGE, v.Refusal.TOO_LARGE, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


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
    """Let MLServer's request metrics count a request answered here, under its route's path template."""
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


async def _respond(send: Send, status: int, payload: Any) -> None:
    body = orjson.dumps(payload, default=json_default)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
