"""The BentoML runtime: the same model, request validation and protocols as the MLServer image, on BentoML 1.4.

`bentoml serve ml_serving.server.bento:ModelService` (what `ml-serving serve --runtime bentoml` and the BentoML image
run) loads the MLflow model once per worker and answers:
- the Open Inference Protocol's `/v2/models/<model>/infer` (and `/versions/<version>/infer`), under the same model
  name as the MLServer predictors, since Seldon's Istio split sends the same path and body to every predictor;
- MLflow's `/invocations` in its four formats;
- `/v2/health/live|ready`, and BentoML's own `/livez`, `/readyz`, `/metrics`.
Every request is checked by `ml_serving.server.validation` (the module the MLServer image uses, not a copy), then
decoded as MLServer's MLflow runtime would and sent through BentoML's adaptive batching (its dispatcher, called
in the process by `bento_batching`, not over HTTP through a batchable API), so a client's mistake is never a 5xx
here either. BentoML's `max_latency_ms` is a request's whole budget (serving.maxLatencyMs): what it sheds is answered
503 with Retry-After and counted as the refusal reason `overloaded`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import bentoml
import numpy as np
import orjson
import pandas as pd
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ml_serving.server import (
    BENTOML_BATCH_SIZE,
    LATENCY_BUCKETS,
    MAX_LATENCY_ENV,
    REFUSALS_METRIC,
    VERSION_ENV,
    freeze_heap,
)
from ml_serving.server import validation as v
from ml_serving.server.__main__ import load_limits, settings_dir
from ml_serving.server.bento_batching import RowBatcher, Shed
from ml_serving.server.outputs import INPUT_ERRORS, json_default, named_outputs

MODEL_NAME = os.environ.get("MLSERVER_MODEL_NAME") or "model"
MODEL_PATH = os.environ.get("MLSERVER_MODEL_URI") or "/mnt/models"
MODEL_VERSION = os.environ.get(VERSION_ENV) or None
MAX_BATCH_SIZE = int(os.environ.get("MLSERVER_MODEL_MAX_BATCH_SIZE") or 64)
# BentoML's max_latency_ms is a request's whole budget (queueing plus inference), not MLServer's batch window:
# its dispatcher sheds work it predicts will exceed it. The stack's serving.maxLatencyMs, else BentoML's default.
DEFAULT_MAX_LATENCY_MS = 60_000
MAX_LATENCY_MS = int(os.environ.get(MAX_LATENCY_ENV) or DEFAULT_MAX_LATENCY_MS)
RETRY_AFTER_SECONDS = 1
WORKERS = int(os.environ.get("MLSERVER_PARALLEL_WORKERS") or 1) or 1
FRAME_DTYPES = {"integer": "int64", "float": "float64", "boolean": "bool"}  # a signature's column kinds, null-free
NUMPY_OF_V2 = {datatype: numpy for numpy, datatype in v.V2_OF_NUMPY.items() if numpy not in ("str", "bytes")}


LIMITS = load_limits(settings_dir())  # the MLServer image's loader: same files, same variables


def _json(status: int, payload: Any) -> Response:
    return Response(orjson.dumps(payload, default=json_default), status_code=status, media_type="application/json")


def decode(request: dict[str, Any]) -> Any:
    """A checked V2 request as the model's input, the way MLServer's codecs decode it for the MLflow runtime:
    `pd` → a DataFrame of one column per input, `np` → one array, `dict` → named arrays."""
    content_type = (request.get("parameters") or {}).get("content_type")
    tensors = request["inputs"]

    def array(tensor: dict[str, Any]) -> np.ndarray:
        dtype = NUMPY_OF_V2.get(tensor["datatype"], "object")
        return np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])

    if content_type == "np":
        return array(tensors[0])
    if content_type == "dict":
        return {t["name"]: array(t) for t in tensors}
    return pd.DataFrame({t["name"]: array(t).reshape(t["shape"][0], -1)[:, 0] for t in tensors})


def encode(output: Any, name: str, version: str | None) -> dict[str, Any]:
    """Predictions as an Open Inference Protocol response, named like MLServer's codecs name them."""
    outputs = []
    if isinstance(output, pd.Series):
        output = output.to_frame()
    if isinstance(output, pd.DataFrame):
        output = Columns({str(column): output[column].to_numpy() for column in output.columns})
    if isinstance(output, Columns):
        for name, values in output.arrays.items():
            outputs.append(_tensor(name, values.reshape(-1, 1) if values.ndim == 1 else values))
    elif isinstance(output, dict):
        outputs = [_tensor(str(key), np.asarray(value)) for key, value in output.items()]
    else:
        outputs = [_tensor("output-1", np.asarray(output))]
    answer: dict[str, Any] = {"model_name": name, "outputs": outputs}
    if version:
        answer["model_version"] = version
    return answer


def _tensor(name: str, values: np.ndarray) -> dict[str, Any]:
    datatype = v.V2_OF_NUMPY.get(values.dtype.name, "BYTES")
    data = values.ravel().tolist()
    return {"name": name, "datatype": datatype, "shape": list(values.shape), "data": data}


# Latency in the MLServer image's buckets (LATENCY_BUCKETS), so that a p95 compared across runtimes is read off the
# same bounds; no access log line per request, like the MLServer image: the request metrics count them.
@bentoml.service(
    name="ml-serving",
    workers=WORKERS,
    traffic={"timeout": 60},
    metrics={"duration": {"buckets": list(LATENCY_BUCKETS)}},
    logging={"access": {"enabled": False}},
)
class ModelService:
    """One MLflow model, loaded once per worker."""

    def __init__(self) -> None:
        import mlflow

        self.model = mlflow.pyfunc.load_model(MODEL_PATH)
        self.inputs = v.model_inputs(self.model.metadata.signature)
        self.batcher = RowBatcher(self.predict_rows, MAX_BATCH_SIZE, MAX_LATENCY_MS, _batch_sizes().observe)
        freeze_heap()

    def predict_rows(self, rows: list[dict[str, Any]]) -> Columns | np.ndarray:
        """Rows from any number of requests, predicted in one call (BentoML's adaptive batching). Rows, not a
        DataFrame: BentoML 1.4.40 sizes a DataFrame batch by its shape (a tuple) and stalls on pandas 3. The answer
        is sliced by rows for each request: named outputs as columns (no frame, no records per request)."""
        output = self._predict(self.frame(rows), None)
        if isinstance(output, pd.DataFrame):
            return Columns({str(name): output[name].to_numpy() for name in output.columns})
        return np.asarray(output).reshape(len(rows), -1)[:, 0]

    def frame(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        """Rows as the DataFrame the signature describes: each column in its kind's dtype, as MLServer decodes it.
        Built column by column: `from_records` and a cast per column cost several times as much for a few rows."""
        kinds = {column.name: column.kind for column in self.inputs.columns or []}
        columns: dict[str, Any] = {}
        for name in dict.fromkeys(key for row in rows for key in row):
            values = [row.get(name) for row in rows]
            dtype = FRAME_DTYPES.get(kinds.get(name, ""))
            columns[name] = np.asarray(values, dtype=dtype) if dtype and None not in values else values
        return pd.DataFrame(columns)

    def _predict(self, model_input: Any, params: dict[str, Any] | None) -> Any:
        try:
            output = self.model.predict(model_input, params=params or None)
        except INPUT_ERRORS as error:
            if self.model.metadata.signature is not None:
                raise  # the request matched the signature: a failure now is the model's
            raise ModelRefused(f"the model refused the input: {error}") from None
        return named_outputs(output, self.model.metadata.signature)

    async def batched(self, rows: list[dict[str, Any]]) -> Columns | np.ndarray:
        """`predict_rows` through BentoML's batching; a shed (over the latency budget) is not the model's fault."""
        try:
            return await self.batcher(rows)
        except Shed:
            raise v.RequestError(
                SHED, v.Refusal.OVERLOADED, "the server is overloaded: retry after the Retry-After seconds"
            ) from None

    async def infer(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A checked V2 request: rows (the `pd` decoding, MLServer's default for a frame) are batched; arrays,
        dicts, parameters and models without columns (whose refusals must stay the model's words) go directly."""
        content_type = (request.get("parameters") or {}).get("content_type")
        parameters = request.get("parameters") or {}
        params = {k: val for k, val in parameters.items() if k not in ("content_type", "headers")}
        batchable = content_type in (None, "pd") and not params and self.inputs.columns is not None
        rows = _rows(request["inputs"]) if batchable else None
        try:
            if rows is not None:
                output: Any = await self.batched(rows)
            else:
                model_input = decode(request)
                if isinstance(model_input, pd.DataFrame):
                    model_input = self.frame(model_input.to_dict(orient="records"))
                output = self._predict(model_input, params)
        except ModelRefused as error:
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(error)}
        return 200, encode(output, MODEL_NAME, MODEL_VERSION)


@dataclass(frozen=True)
class Columns:
    """A frame's columns as arrays, sliced by rows: how a batch's named outputs go back to each request."""

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()), ()))

    def __getitem__(self, rows: slice) -> Columns:
        return Columns({name: values[rows] for name, values in self.arrays.items()})


def _rows(tensors: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The rows of checked column tensors, each holding one flat value a row; else None (decoded as a whole)."""
    if not all(math.prod(t["shape"]) == t["shape"][0] and not any(isinstance(x, list) for x in t["data"])
               for t in tensors):  # fmt: skip
        return None
    return [{t["name"]: t["data"][i] for t in tensors} for i in range(tensors[0]["shape"][0])]


class ModelRefused(Exception):
    """A model without a signature refused its input: the client's data, answered 422 with the model's words."""


async def _service() -> ModelService:
    return bentoml.get_current_service()  # type: ignore[no-any-return]


SHED = 503


def _refusals() -> Any:
    """The MLServer image's refusals counter (same name and labels), made on first use through BentoML's metrics
    API, which serves it on /metrics from every worker."""
    global _refusal_counter
    if _refusal_counter is None:
        _refusal_counter = bentoml.metrics.Counter(
            name=REFUSALS_METRIC.removesuffix("_total"),
            documentation="Requests refused before or instead of predicting, by reason",
            labelnames=["model", "reason"],
        )
    return _refusal_counter


_refusal_counter: Any = None


def _batch_sizes() -> Any:
    """The size of each batch the dispatcher formed, under the name BentoML gives its own (the queries read it)."""
    global _batch_size_histogram
    if _batch_size_histogram is None:
        _batch_size_histogram = bentoml.metrics.Histogram(
            name=BENTOML_BATCH_SIZE,
            documentation="Rows in each batch BentoML's adaptive batching formed",
            buckets=[2**i for i in range(MAX_BATCH_SIZE.bit_length() + 1)],
        )
    return _batch_size_histogram


_batch_size_histogram: Any = None


async def _refused(error: v.RequestError) -> Response:
    _refusals().labels(model=MODEL_NAME, reason=error.reason.value).inc()
    response = _json(error.status, {"error": error.message})
    if error.status == SHED:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


async def v2_infer(request: Request) -> Response:
    try:
        _check_model(request)
        payload = v.check_v2(v.parse_json(await _body(request), LIMITS), (await _service()).inputs, LIMITS)
        status, answer = await (await _service()).infer(payload)
    except v.RequestError as error:
        return await _refused(error)
    return _json(status, answer)


async def invocations(request: Request) -> Response:
    try:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise v.RequestError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, v.Refusal.MEDIA_TYPE, "send Content-Type: application/json"
            )
        service = await _service()
        payload = v.invocation_request(v.parse_json(await _body(request), LIMITS), service.inputs, LIMITS)
        status, answer = await service.infer(payload)
    except v.RequestError as error:
        return await _refused(error)
    return _json(status, v.v2_to_predictions(answer) if status == 200 else answer)


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > LIMITS.max_body_bytes:
        raise v.RequestError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, v.Refusal.TOO_LARGE, f"body of {declared} bytes is over the limit"
        )
    body = await request.body()
    if len(body) > LIMITS.max_body_bytes:
        raise v.RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, v.Refusal.TOO_LARGE, "body is over the limit")
    return body


def _check_model(request: Request) -> None:
    name, version = request.path_params.get("name"), request.path_params.get("version")
    if name != MODEL_NAME:
        raise v.RequestError(
            HTTPStatus.NOT_FOUND,
            v.Refusal.UNKNOWN_MODEL,
            f"model '{name}' is not served here; this server serves '{MODEL_NAME}'",
        )
    if version is not None and MODEL_VERSION and version != MODEL_VERSION:
        raise v.RequestError(
            HTTPStatus.NOT_FOUND, v.Refusal.UNKNOWN_MODEL, f"model '{name}' version '{version}' is not served here"
        )


async def live(request: Request) -> Response:
    return _json(200, {"live": True})


async def ready(request: Request) -> Response:
    try:
        await _service()
    except Exception:
        return _json(503, {"ready": False})
    return _json(200, {"ready": True})


async def metadata(request: Request) -> Response:
    try:
        _check_model(request)
    except v.RequestError as error:
        return await _refused(error)
    inputs = (await _service()).inputs
    tensors = [{"name": c.name, "datatype": c.v2_datatype, "shape": [-1, 1]} for c in inputs.columns or []] + [
        {"name": t.label(i), "datatype": t.datatype, "shape": list(t.shape)} for i, t in enumerate(inputs.tensors or [])
    ]
    return _json(200, {"name": MODEL_NAME, "versions": [MODEL_VERSION] if MODEL_VERSION else [], "platform": "bentoml",
                       "inputs": tensors})  # fmt: skip


app = Starlette(
    routes=[
        Route("/v2/models/{name}/infer", v2_infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", v2_infer, methods=["POST"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", metadata),
    ]
)
ModelService = bentoml.asgi_app(app, path="/")(ModelService)
