"""Checking a request against what the model takes (`signature.Inputs`): the second validation layer.

A client's mistake is a `RequestError` with a 4xx `HTTPStatus`, a `Refusal` (the bounded reason the refusals
counter is labelled with) and a message naming the column or field and what was expected. Pure functions over
parsed JSON: no web framework, no protocol envelope (that is `protocols`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from typing import Any

import orjson

from ml_serving.server.signature import (
    KINDS,
    Column,
    Inputs,
    Tensor,
    describe_columns,
    describe_tensors,
    finite_number,
)


class Refusal(StrEnum):
    """Why a request was refused: the bounded `reason` label of the refusals counter (never request data)."""

    MALFORMED_BODY = "malformed_body"  # empty, not UTF-8, not JSON, nested too deep
    TOO_LARGE = "too_large"  # body bytes or rows over the limit
    BODY_TIMEOUT = "body_timeout"
    MEDIA_TYPE = "media_type"  # Content-Type or charset
    METHOD = "method"
    NO_ROUTE = "no_route"  # a path the server does not serve (other MLServer routes, streams, docs)
    UNKNOWN_MODEL = "unknown_model"  # another model name or version in the path
    READ_ONLY = "read_only"  # the repository's load/unload
    BAD_STRUCTURE = "bad_structure"  # the envelope: fields, formats, tensor keys
    NO_ROWS = "no_rows"
    UNKNOWN_COLUMN = "unknown_column"
    MISSING_COLUMN = "missing_column"
    NULL_VALUE = "null_value"
    WRONG_TYPE = "wrong_type"  # a value of the wrong kind for its column
    WRONG_DATATYPE = "wrong_datatype"  # a V2 datatype that does not fit the column, or is no V2 datatype
    BAD_SHAPE = "bad_shape"
    RAGGED = "ragged"  # columns or inputs of different lengths
    BAD_PARAMETERS = "bad_parameters"
    MODEL_REFUSED = "model_refused"  # valid here, refused by MLServer or the model as the client's mistake
    OVERLOADED = "overloaded"  # shed (503 + Retry-After): over the latency budget, not the client's mistake


class RequestError(Exception):
    """A request the server will not run: HTTP status, why (a `Refusal`) and a message for the client."""

    def __init__(self, status: HTTPStatus, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_048_576
    max_rows: int = 10_000
    max_depth: int = 32
    body_timeout_seconds: float = 30.0


# What each V2 datatype holds, as JSON values: the one table the tensor checks read.
def _integer_range(bits: int, signed: bool) -> Callable[[Any], bool]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


DATATYPE_VALUES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{f"INT{b}": (f"an integer of {b} bits", _integer_range(b, True)) for b in (8, 16, 32, 64)},
    **{f"UINT{b}": (f"an unsigned integer of {b} bits", _integer_range(b, False)) for b in (8, 16, 32, 64)},
    **{f"FP{b}": ("a number", finite_number) for b in (16, 32, 64)},
    "BOOL": ("true or false", lambda value: isinstance(value, bool)),
    "BYTES": ("a string", lambda value: isinstance(value, str)),
}
V2_DATATYPES = frozenset(DATATYPE_VALUES)  # the Open Inference Protocol's list
# Datatypes whose every value a wider tensor holds exactly: the request is converted to the model's datatype.
WIDENS_TO: dict[str, frozenset[str]] = {
    "FP64": frozenset({"FP32", "FP16", "INT8", "INT16", "INT32", "UINT8", "UINT16", "UINT32"}),
    "FP32": frozenset({"FP16", "INT8", "INT16", "UINT8", "UINT16"}),
    "FP16": frozenset({"INT8", "UINT8"}),
    "INT64": frozenset({"INT8", "INT16", "INT32", "UINT8", "UINT16", "UINT32"}),
    "INT32": frozenset({"INT8", "INT16", "UINT8", "UINT16"}),
    "INT16": frozenset({"INT8", "UINT8"}),
    "UINT64": frozenset({"UINT8", "UINT16", "UINT32"}),
    "UINT32": frozenset({"UINT8", "UINT16"}),
    "UINT16": frozenset({"UINT8"}),
}


def parse_json(body: bytes, limits: Limits) -> Any:
    if not body.strip():
        raise RequestError(HTTPStatus.BAD_REQUEST, Refusal.MALFORMED_BODY, "empty body: send a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                Refusal.MALFORMED_BODY,
                f"body is not UTF-8 (byte {bad.start}): send UTF-8 encoded JSON",
            ) from None
        raise RequestError(HTTPStatus.BAD_REQUEST, Refusal.MALFORMED_BODY, f"malformed JSON: {exc}") from None
    if body.count(b"[") + body.count(b"{") > limits.max_depth:  # fewer brackets than the limit: not that deep
        _check_depth(payload, limits.max_depth)
    return payload


def _check_depth(payload: Any, limit: int) -> None:
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, Refusal.MALFORMED_BODY, f"JSON nested more than {limit} levels deep"
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )


def refuse(reason: Refusal, message: str, status: HTTPStatus = HTTPStatus.UNPROCESSABLE_ENTITY) -> RequestError:
    return RequestError(status, reason, message)


def check_value(column: Column, value: Any, where: str) -> None:
    if value is None:
        if column.required:
            raise refuse(Refusal.NULL_VALUE, f"{where}: column '{column.name}' may not be null")
        return
    kind = KINDS[column.kind]
    if not kind.accepts(value):
        raise refuse(
            Refusal.WRONG_TYPE,
            f"{where}: column '{column.name}' expects {kind.expected}, got {type_name(value)} ({_short(value)})",
        )


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_rows(rows: list[dict[str, Any]], columns: list[Column] | None, kind: str) -> dict[str, list]:
    if columns is None:
        names = list(dict.fromkeys(name for row in rows for name in row))
        return {name: [row.get(name) for row in rows] for name in names}
    known = {c.name for c in columns}
    table: dict[str, list] = {c.name: [] for c in columns}
    for index, row in enumerate(rows):
        where = f"{kind}[{index}]"
        extra = set(row) - known
        if extra:
            raise refuse(
                Refusal.UNKNOWN_COLUMN,
                f"{where}: unknown column(s) {', '.join(sorted(extra))}; the model takes {describe_columns(columns)}",
            )
        for column in columns:
            if column.name not in row:
                if column.required:
                    raise refuse(Refusal.MISSING_COLUMN, f"{where}: missing column '{column.name}' ({column.kind})")
                table[column.name].append(None)
                continue
            value = row[column.name]
            check_value(column, value, where)
            table[column.name].append(value)
    return {name: values for name, values in table.items() if any(v is not None for v in values) or values == []}


# The Open Inference Protocol (V2): the envelope, each tensor, each tensor against the signature, the batch ----

# The content types (MLServer's codecs) the MLflow runtime decodes: the request as a whole is a DataFrame; a
# tensor of bytes is text, base64 or datetimes, any other tensor a NumPy array. Anything else would reach
# MLflow's schema enforcement undecoded and come back 500.
BYTES_CONTENT_TYPES = ("str", "base64", "datetime")
NUMERIC_CONTENT_TYPES = ("np",)


def request_content_types(inputs: Inputs) -> tuple[str, ...]:
    """The request-level content types the runtime decodes for this model: the signature's, or (no signature)
    one NumPy array or a DataFrame of several columns."""
    return (inputs.content_type,) if inputs.content_type else ("np", "pd")


def input_content_types(datatype: str) -> tuple[str, ...]:
    return BYTES_CONTENT_TYPES if datatype == "BYTES" else NUMERIC_CONTENT_TYPES


def check_v2(payload: Any, inputs: Inputs, limits: Limits) -> dict[str, Any]:
    """An Open Inference Protocol request: structure, names, datatypes, shapes, values and parameters.

    Returns the request to run: tensors sent in a datatype that widens losslessly to the model's are converted.
    """
    tensors = _check_envelope(payload, inputs)
    by_name = {c.name: c for c in inputs.columns or []}
    rows: dict[str, int] = {}
    for index, tensor in enumerate(tensors):
        name, data = _check_tensor(index, tensor, limits)
        where = f"inputs[{index}] ('{name}')"
        rows[name] = tensor["shape"][0]
        if inputs.columns is not None:
            _check_against_column(by_name.get(name), inputs.columns, tensor["datatype"], data, where)
        elif inputs.tensors is not None:
            spec = _tensor_spec(inputs.tensors, name, len(tensors), where)
            _check_against_tensor(spec, tensor, data, where)
        else:
            _check_values(tensor["datatype"], data, where)
    _check_batch(rows, inputs)
    if inputs.content_type is None:  # no signature: one tensor is one array, several are the columns of a frame
        parameters = payload.setdefault("parameters", {})
        parameters.setdefault("content_type", "np" if len(tensors) == 1 else "pd")
    return payload


def _check_envelope(payload: Any, inputs: Inputs) -> list:
    if not isinstance(payload, dict):
        raise refuse(Refusal.BAD_STRUCTURE, "expected a JSON object with 'inputs'", HTTPStatus.BAD_REQUEST)
    unknown = set(payload) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise refuse(
            Refusal.BAD_STRUCTURE,
            f"unknown field(s) {', '.join(sorted(unknown))}: expected id, inputs, outputs, parameters",
            HTTPStatus.BAD_REQUEST,
        )
    tensors = payload.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise refuse(Refusal.BAD_STRUCTURE, "inputs: expected a non-empty array of tensors")
    parameters = payload.get("parameters")
    _check_parameters("parameters", parameters, request_content_types(inputs))
    if parameters:
        extra = {k: v for k, v in parameters.items() if k not in ("content_type", "headers")}
        check_params("parameters", extra, inputs)
    return tensors


def _check_tensor(index: int, tensor: Any, limits: Limits) -> tuple[str, list]:
    """One input tensor on its own: its keys, name, shape, datatype, parameters and as many values as its shape."""
    where = f"inputs[{index}]"
    if not isinstance(tensor, dict):
        raise refuse(Refusal.BAD_STRUCTURE, f"{where}: expected a tensor object, got {type_name(tensor)}")
    for key in ("name", "shape", "datatype", "data"):
        if key not in tensor:
            raise refuse(Refusal.BAD_STRUCTURE, f"{where}: missing '{key}'")
    name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
    if not isinstance(name, str):
        raise refuse(Refusal.BAD_STRUCTURE, f"{where}.name: expected a string")
    where = f"inputs[{index}] ('{name}')"
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise refuse(Refusal.BAD_SHAPE, f"{where}.shape: expected an array of non-negative integers, e.g. [3, 1]")
    if not isinstance(datatype, str) or datatype not in V2_DATATYPES:
        raise refuse(
            Refusal.WRONG_DATATYPE,
            f"{where}.datatype: {datatype!r} is not a V2 datatype ({', '.join(sorted(V2_DATATYPES))})",
        )
    _check_parameters(f"{where}.parameters", tensor.get("parameters"), input_content_types(datatype))
    data = flatten(tensor["data"], where)
    expected = math.prod(shape)
    if len(data) != expected:
        raise refuse(Refusal.BAD_SHAPE, f"{where}: shape {shape} needs {expected} values, got {len(data)}")
    if shape[0] > limits.max_rows:
        raise refuse(
            Refusal.TOO_LARGE,
            f"{where}: {shape[0]} rows is more than the limit of {limits.max_rows}",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    return name, data


def _check_values(datatype: str, data: list, where: str) -> None:
    """Every value of a tensor is one its datatype holds (no signature to compare with: the tensor's own)."""
    expected, accepts = DATATYPE_VALUES[datatype]
    for position, value in enumerate(data):
        if value is None:
            raise refuse(Refusal.NULL_VALUE, f"{where}.data[{position}]: null is not a tensor value")
        if not accepts(value):
            raise refuse(
                Refusal.WRONG_TYPE,
                f"{where}.data[{position}]: {datatype} holds {expected}, got {type_name(value)} ({_short(value)})",
            )


def _check_against_column(column: Column | None, columns: list[Column], datatype: str, data: list, where: str) -> None:
    if column is None:
        raise refuse(Refusal.UNKNOWN_COLUMN, f"{where}: unknown input; the model takes {describe_columns(columns)}")
    if datatype not in KINDS[column.kind].datatypes:
        raise refuse(
            Refusal.WRONG_DATATYPE,
            f"{where}.datatype: {datatype} does not fit column '{column.name}' ({column.kind}); "
            f"use {column.v2_datatype}",
        )
    for position, value in enumerate(data):
        check_value(column, value, f"{where}.data[{position}]")


def _tensor_spec(specs: list[Tensor], name: str, count: int, where: str) -> Tensor:
    if specs[0].name is None:  # one unnamed tensor: any name will do, but only one input
        if count != 1:
            raise refuse(
                Refusal.UNKNOWN_COLUMN, f"inputs: the model takes one tensor ({describe_tensors(specs)}), got {count}"
            )
        return specs[0]
    for spec in specs:
        if spec.name == name:
            return spec
    raise refuse(Refusal.UNKNOWN_COLUMN, f"{where}: unknown input; the model takes {describe_tensors(specs)}")


def _check_against_tensor(spec: Tensor, tensor: dict[str, Any], data: list, where: str) -> None:
    """Datatype (converted when it widens losslessly), shape (-1: any size) and values against the signature."""
    datatype, shape = tensor["datatype"], tensor["shape"]
    if datatype != spec.datatype:
        if datatype not in WIDENS_TO.get(spec.datatype, ()):
            fits = ", ".join([spec.datatype, *sorted(WIDENS_TO.get(spec.datatype, ()))])
            raise refuse(
                Refusal.WRONG_DATATYPE,
                f"{where}.datatype: {datatype} does not fit tensor '{spec.label()}' ({spec.datatype}); send {fits}",
            )
        tensor["datatype"] = spec.datatype  # lossless: every value of the narrower type is one of the model's
    fixed = list(spec.shape)
    if len(shape) != len(fixed) or any(want not in (-1, got) for want, got in zip(fixed, shape, strict=True)):
        raise refuse(
            Refusal.BAD_SHAPE,
            f"{where}.shape: {shape} does not fit tensor '{spec.label()}' of shape {fixed} (-1: any size)",
        )
    _check_values(spec.datatype, data, where)


def _check_batch(rows: dict[str, int], inputs: Inputs) -> None:
    columns = inputs.columns
    if columns is not None:
        missing = [c.name for c in columns if c.required and c.name not in rows]
        if missing:
            raise refuse(
                Refusal.MISSING_COLUMN,
                f"inputs: missing column(s) {', '.join(missing)}; the model takes {describe_columns(columns)}",
            )
    if inputs.tensors is not None and inputs.tensors[0].name is not None:
        missing = [t.name for t in inputs.tensors if t.name not in rows]
        if missing:
            raise refuse(
                Refusal.MISSING_COLUMN,
                f"inputs: missing tensor(s) {', '.join(map(str, missing))}; the model takes "
                f"{describe_tensors(inputs.tensors)}",
            )
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{n}={r}" for n, r in rows.items())
        raise refuse(Refusal.RAGGED, f"inputs: ragged batch: every input needs the same number of rows ({shown})")


def check_params(where: str, params: dict[str, Any] | None, inputs: Inputs) -> None:
    """Inference parameters against the model's params schema: unknown or mistyped ones are refused (a model
    without a schema gets none: MLflow would drop them silently)."""
    if not params:
        return
    if inputs.params is None:
        raise refuse(
            Refusal.BAD_PARAMETERS,
            f"{where}: {', '.join(sorted(params))}: this model takes no parameters (its signature has no params)",
        )
    for name, value in params.items():
        spec = inputs.params.get(name)
        if spec is None:
            known = ", ".join(f"{p.name} ({p.describe})" for p in inputs.params.values())
            raise refuse(Refusal.BAD_PARAMETERS, f"{where}.{name}: unknown parameter; the model takes {known}")
        try:
            spec.check(value)
        except ValueError as error:
            raise refuse(Refusal.BAD_PARAMETERS, f"{where}.{name}: expects {spec.describe}: {error}") from None


def _check_parameters(where: str, parameters: Any, content_types: tuple[str, ...]) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise refuse(Refusal.BAD_PARAMETERS, f"{where}: expected an object")
    content_type = parameters.get("content_type")
    if content_type is not None and content_type not in content_types:
        raise refuse(
            Refusal.BAD_PARAMETERS,
            f"{where}.content_type: {content_type!r} is not decoded here; use {' or '.join(content_types)} "
            "(or leave it out)",
        )


def flatten(data: Any, where: str) -> list:
    if not isinstance(data, list):
        raise refuse(Refusal.BAD_STRUCTURE, f"{where}.data: expected an array, got {type_name(data)}")
    if not any(isinstance(v, list) for v in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            if isinstance(value, dict):
                raise refuse(Refusal.BAD_STRUCTURE, f"{where}.data: objects are not tensor values")
            flat.append(value)
        else:
            stack.pop()
    return flat
