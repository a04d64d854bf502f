"""Check a request against the model's MLflow signature before it reaches `predict`.

A client's mistake is answered with a 4xx that names the column or field and what was expected; only a fault of
the server is a 5xx. Pure functions over parsed JSON: no web framework in here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

BAD_REQUEST, FORBIDDEN, NOT_FOUND, NOT_ALLOWED = 400, 403, 404, 405
TIMEOUT, TOO_LARGE, UNSUPPORTED, UNPROCESSABLE = 408, 413, 415, 422

INVOCATION_FORMATS = ("dataframe_records", "dataframe_split", "instances", "inputs")


class Refusal(StrEnum):
    """Why a request was refused: the bounded `reason` label of the refusals counter (never request data)."""

    MALFORMED_BODY = "malformed_body"  # empty, not UTF-8, not JSON, nested too deep
    TOO_LARGE = "too_large"  # body bytes or rows over the limit
    BODY_TIMEOUT = "body_timeout"
    MEDIA_TYPE = "media_type"  # Content-Type or charset
    METHOD = "method"
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


class RequestError(Exception):
    """A request the server will not run: HTTP status, why (a `Refusal`) and a message for the client."""

    def __init__(self, status: int, reason: Refusal, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_INTEGERS = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


@dataclass(frozen=True)
class Kind:
    """One kind of column, everything about it in one row: MLflow's type names, the V2 datatypes that fit it
    (the first is the one it is sent as), the words for "expected", and the check of one JSON value."""

    mlflow_types: tuple[str, ...]
    datatypes: tuple[str, ...]
    expected: str
    accepts: Callable[[Any], bool]

    @property
    def datatype(self) -> str:
        return self.datatypes[0]


KINDS: dict[str, Kind] = {
    "integer": Kind(
        ("long", "integer"),
        ("INT64", *sorted(_INTEGERS - {"INT64"})),
        "an integer",
        lambda value: isinstance(value, int) and not isinstance(value, bool),
    ),
    "float": Kind(
        ("double", "float"),
        ("FP64", "FP32", "FP16", "INT8", "INT16", "INT32", "INT64"),
        "a number",
        _finite_number,
    ),
    "string": Kind(("string",), ("BYTES",), "a string", lambda value: isinstance(value, str)),
    "boolean": Kind(("boolean",), ("BOOL",), "true or false", lambda value: isinstance(value, bool)),
    "binary": Kind(("binary",), ("BYTES",), "a base64 string", lambda value: isinstance(value, str)),
    "datetime": Kind(("datetime",), ("BYTES",), "an ISO 8601 string", lambda value: isinstance(value, str)),
}
KIND_OF_MLFLOW_TYPE = {mlflow_type: name for name, kind in KINDS.items() for mlflow_type in kind.mlflow_types}
V2_DATATYPES = frozenset(d for kind in KINDS.values() for d in kind.datatypes) | _INTEGERS  # the protocol's list


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # a key of KINDS
    required: bool = True

    @property
    def v2_datatype(self) -> str:
        return KINDS[self.kind].datatype


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_048_576
    max_rows: int = 10_000
    max_depth: int = 32
    body_timeout_seconds: float = 30.0


def columns_from_signature(signature: Any) -> list[Column] | None:
    """The named columns of a column-based MLflow signature; None for tensor signatures or none at all."""
    if signature is None or signature.inputs is None or not signature.inputs.has_input_names():
        return None
    columns = []
    for spec in signature.inputs.inputs:
        kind = KIND_OF_MLFLOW_TYPE.get(getattr(spec.type, "name", str(spec.type)))
        if kind is None:
            return None
        columns.append(Column(spec.name, kind, bool(getattr(spec, "required", True))))
    return columns


def parse_json(body: bytes, limits: Limits) -> Any:
    if not body.strip():
        raise RequestError(BAD_REQUEST, Refusal.MALFORMED_BODY, "empty body: send a JSON object")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            BAD_REQUEST, Refusal.MALFORMED_BODY, f"body is not UTF-8 (byte {exc.start}): send UTF-8 encoded JSON"
        ) from None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(BAD_REQUEST, Refusal.MALFORMED_BODY, f"malformed JSON: {exc}") from None
    _check_depth(payload, limits.max_depth)
    return payload


def _check_depth(payload: Any, limit: int) -> None:
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            raise RequestError(BAD_REQUEST, Refusal.MALFORMED_BODY, f"JSON nested more than {limit} levels deep")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )


def _refuse(reason: Refusal, message: str, status: int = UNPROCESSABLE) -> RequestError:
    return RequestError(status, reason, message)


def check_value(column: Column, value: Any, where: str) -> None:
    if value is None:
        if column.required:
            raise _refuse(Refusal.NULL_VALUE, f"{where}: column '{column.name}' may not be null")
        return
    kind = KINDS[column.kind]
    if not kind.accepts(value):
        raise _refuse(
            Refusal.WRONG_TYPE,
            f"{where}: column '{column.name}' expects {kind.expected}, got {_type_name(value)} ({_short(value)})",
        )


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# MLflow's scoring protocol (/invocations) --------------------------------------------------------------------


def invocation_table(payload: Any, columns: list[Column] | None, limits: Limits) -> tuple[dict[str, list], Any]:
    """An MLflow scoring request (`dataframe_records`, `dataframe_split`, `instances`, `inputs`) as columns.

    Returns ({column: values}, params). Every row is checked against `columns` when the model has them.
    """
    if not isinstance(payload, dict):
        raise _refuse(
            Refusal.BAD_STRUCTURE, f"expected a JSON object with one of {', '.join(INVOCATION_FORMATS)}", BAD_REQUEST
        )
    unknown = set(payload) - {*INVOCATION_FORMATS, "params"}
    formats = [key for key in INVOCATION_FORMATS if key in payload]
    if unknown:
        raise _refuse(
            Refusal.BAD_STRUCTURE,
            f"unknown field(s) {', '.join(sorted(unknown))}: use one of {', '.join(INVOCATION_FORMATS)}",
            BAD_REQUEST,
        )
    if len(formats) != 1:
        raise _refuse(
            Refusal.BAD_STRUCTURE,
            f"send exactly one of {', '.join(INVOCATION_FORMATS)} (got {len(formats)})",
            BAD_REQUEST,
        )
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise _refuse(Refusal.BAD_PARAMETERS, "params: expected a JSON object", BAD_REQUEST)
    kind = formats[0]
    data = payload[kind]
    if kind in ("dataframe_records", "instances"):
        rows = _records(data, kind)
    elif kind == "dataframe_split":
        rows = _split(data)
    else:
        rows = _columnar(data)
    if not rows:
        raise _refuse(Refusal.NO_ROWS, f"{kind}: no rows: send at least one")
    if len(rows) > limits.max_rows:
        raise _refuse(
            Refusal.TOO_LARGE, f"{kind}: {len(rows)} rows is more than the limit of {limits.max_rows}", TOO_LARGE
        )
    return _to_columns(rows, columns, kind), params


def _records(data: Any, kind: str) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise _refuse(Refusal.BAD_STRUCTURE, f"{kind}: expected an array of row objects, got {_type_name(data)}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise _refuse(Refusal.BAD_STRUCTURE, f"{kind}[{index}]: expected a row object, got {_type_name(row)}")
    return data


def _split(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("columns"), list) or "data" not in data:
        raise _refuse(Refusal.BAD_STRUCTURE, 'dataframe_split: expected {"columns": [...], "data": [[...], ...]}')
    names, values = data["columns"], data["data"]
    unknown = set(data) - {"columns", "data", "index"}
    if unknown:
        raise _refuse(Refusal.BAD_STRUCTURE, f"dataframe_split: unknown field(s) {', '.join(sorted(unknown))}")
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise _refuse(Refusal.BAD_STRUCTURE, "dataframe_split.columns: expected distinct column names (strings)")
    if not isinstance(values, list):
        raise _refuse(
            Refusal.BAD_STRUCTURE, f"dataframe_split.data: expected an array of rows, got {_type_name(values)}"
        )
    rows = []
    for index, row in enumerate(values):
        if not isinstance(row, list):
            raise _refuse(
                Refusal.BAD_STRUCTURE, f"dataframe_split.data[{index}]: expected an array, got {_type_name(row)}"
            )
        if len(row) != len(names):
            raise _refuse(
                Refusal.RAGGED,
                f"dataframe_split.data[{index}]: ragged row: {len(row)} values for {len(names)} columns",
            )
        rows.append(dict(zip(names, row, strict=True)))
    return rows


def _columnar(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict):
        raise _refuse(Refusal.BAD_STRUCTURE, "inputs: expected an object of column name → array of values")
    lengths = {name: len(v) if isinstance(v, list) else None for name, v in data.items()}
    for name, length in lengths.items():
        if length is None:
            raise _refuse(Refusal.BAD_STRUCTURE, f"inputs.{name}: expected an array of values")
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{n}={n_}" for n, n_ in lengths.items())
        raise _refuse(Refusal.RAGGED, f"inputs: ragged columns: every column needs the same length ({shown})")
    count = next(iter(lengths.values()), 0)
    return [{name: data[name][i] for name in data} for i in range(count)]


def _to_columns(rows: list[dict[str, Any]], columns: list[Column] | None, kind: str) -> dict[str, list]:
    if columns is None:
        names = list(dict.fromkeys(name for row in rows for name in row))
        return {name: [row.get(name) for row in rows] for name in names}
    known = {c.name for c in columns}
    table: dict[str, list] = {c.name: [] for c in columns}
    for index, row in enumerate(rows):
        where = f"{kind}[{index}]"
        extra = set(row) - known
        if extra:
            raise _refuse(
                Refusal.UNKNOWN_COLUMN,
                f"{where}: unknown column(s) {', '.join(sorted(extra))}; the model takes {_names(columns)}",
            )
        for column in columns:
            if column.name not in row:
                if column.required:
                    raise _refuse(Refusal.MISSING_COLUMN, f"{where}: missing column '{column.name}' ({column.kind})")
                table[column.name].append(None)
                continue
            value = row[column.name]
            check_value(column, value, where)
            table[column.name].append(value)
    return {name: values for name, values in table.items() if any(v is not None for v in values) or values == []}


def _names(columns: list[Column]) -> str:
    return ", ".join(f"{c.name} ({c.kind})" for c in columns)


def v2_request(table: dict[str, list], columns: list[Column] | None, params: Any) -> dict[str, Any]:
    """The same rows as an Open Inference Protocol request, so both paths share adaptive batching."""
    kinds = {c.name: c for c in columns or []}
    inputs = []
    for name, values in table.items():
        column = kinds.get(name) or Column(name, _guess_kind(values))
        entry: dict[str, Any] = {
            "name": name,
            "datatype": column.v2_datatype,
            "shape": [len(values), 1],
            "data": values,
        }
        if column.v2_datatype == "BYTES":
            entry["parameters"] = {"content_type": "str"}
        inputs.append(entry)
    request: dict[str, Any] = {"inputs": inputs, "parameters": {"content_type": "pd"}}
    if params:
        request["parameters"].update(params)
    return request


def _guess_kind(values: list) -> str:
    sample = next((v for v in values if v is not None), None)
    if isinstance(sample, bool):
        return "boolean"
    if isinstance(sample, int):
        return "integer"
    if isinstance(sample, float):
        return "float"
    return "string"


# The Open Inference Protocol (V2): the envelope, each tensor, each tensor against the signature, the batch ----

# The content types (MLServer's codecs) the MLflow runtime decodes: the request as a whole is a DataFrame; a
# tensor of bytes is text, base64 or datetimes, any other tensor a NumPy array. Anything else would reach
# MLflow's schema enforcement undecoded and come back 500.
REQUEST_CONTENT_TYPES = ("pd",)
BYTES_CONTENT_TYPES = ("str", "base64", "datetime")
NUMERIC_CONTENT_TYPES = ("np",)


def input_content_types(datatype: str) -> tuple[str, ...]:
    return BYTES_CONTENT_TYPES if datatype == "BYTES" else NUMERIC_CONTENT_TYPES


def check_v2(payload: Any, columns: list[Column] | None, limits: Limits) -> None:
    """An Open Inference Protocol request: structure, names, datatypes, shapes and values."""
    inputs = _check_envelope(payload)
    by_name = {c.name: c for c in columns or []}
    rows: dict[str, int] = {}
    for index, tensor in enumerate(inputs):
        name, data = _check_tensor(index, tensor, limits)
        where = f"inputs[{index}] ('{name}')"
        rows[name] = tensor["shape"][0]
        if columns is None:
            _check_no_nulls(data, where)
        else:
            _check_against_column(by_name.get(name), columns, tensor["datatype"], data, where)
    _check_batch(rows, columns)


def _check_envelope(payload: Any) -> list:
    if not isinstance(payload, dict):
        raise _refuse(Refusal.BAD_STRUCTURE, "expected a JSON object with 'inputs'", BAD_REQUEST)
    unknown = set(payload) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise _refuse(
            Refusal.BAD_STRUCTURE,
            f"unknown field(s) {', '.join(sorted(unknown))}: expected id, inputs, outputs, parameters",
            BAD_REQUEST,
        )
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _refuse(Refusal.BAD_STRUCTURE, "inputs: expected a non-empty array of tensors")
    _check_parameters("parameters", payload.get("parameters"), REQUEST_CONTENT_TYPES)
    return inputs


def _check_tensor(index: int, tensor: Any, limits: Limits) -> tuple[str, list]:
    """One input tensor on its own: its keys, name, shape, datatype, parameters and as many values as its shape."""
    where = f"inputs[{index}]"
    if not isinstance(tensor, dict):
        raise _refuse(Refusal.BAD_STRUCTURE, f"{where}: expected a tensor object, got {_type_name(tensor)}")
    for key in ("name", "shape", "datatype", "data"):
        if key not in tensor:
            raise _refuse(Refusal.BAD_STRUCTURE, f"{where}: missing '{key}'")
    name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
    if not isinstance(name, str):
        raise _refuse(Refusal.BAD_STRUCTURE, f"{where}.name: expected a string")
    where = f"inputs[{index}] ('{name}')"
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise _refuse(Refusal.BAD_SHAPE, f"{where}.shape: expected an array of non-negative integers, e.g. [3, 1]")
    if not isinstance(datatype, str) or datatype not in V2_DATATYPES:
        raise _refuse(
            Refusal.WRONG_DATATYPE,
            f"{where}.datatype: {datatype!r} is not a V2 datatype ({', '.join(sorted(V2_DATATYPES))})",
        )
    _check_parameters(f"{where}.parameters", tensor.get("parameters"), input_content_types(datatype))
    data = _flatten(tensor["data"], where)
    expected = math.prod(shape)
    if len(data) != expected:
        raise _refuse(Refusal.BAD_SHAPE, f"{where}: shape {shape} needs {expected} values, got {len(data)}")
    if shape[0] > limits.max_rows:
        raise _refuse(
            Refusal.TOO_LARGE, f"{where}: {shape[0]} rows is more than the limit of {limits.max_rows}", TOO_LARGE
        )
    return name, data


def _check_no_nulls(data: list, where: str) -> None:
    for position, value in enumerate(data):
        if value is None:
            raise _refuse(Refusal.NULL_VALUE, f"{where}.data[{position}]: null is not a tensor value")


def _check_against_column(column: Column | None, columns: list[Column], datatype: str, data: list, where: str) -> None:
    if column is None:
        raise _refuse(Refusal.UNKNOWN_COLUMN, f"{where}: unknown input; the model takes {_names(columns)}")
    if datatype not in KINDS[column.kind].datatypes:
        raise _refuse(
            Refusal.WRONG_DATATYPE,
            f"{where}.datatype: {datatype} does not fit column '{column.name}' ({column.kind}); "
            f"use {column.v2_datatype}",
        )
    for position, value in enumerate(data):
        check_value(column, value, f"{where}.data[{position}]")


def _check_batch(rows: dict[str, int], columns: list[Column] | None) -> None:
    if columns is not None:
        missing = [c.name for c in columns if c.required and c.name not in rows]
        if missing:
            raise _refuse(
                Refusal.MISSING_COLUMN,
                f"inputs: missing column(s) {', '.join(missing)}; the model takes {_names(columns)}",
            )
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{n}={r}" for n, r in rows.items())
        raise _refuse(Refusal.RAGGED, f"inputs: ragged batch: every input needs the same number of rows ({shown})")


def _check_parameters(where: str, parameters: Any, content_types: tuple[str, ...]) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise _refuse(Refusal.BAD_PARAMETERS, f"{where}: expected an object")
    content_type = parameters.get("content_type")
    if content_type is not None and content_type not in content_types:
        raise _refuse(
            Refusal.BAD_PARAMETERS,
            f"{where}.content_type: {content_type!r} is not decoded here; use {' or '.join(content_types)} "
            "(or leave it out)",
        )


def _flatten(data: Any, where: str) -> list:
    if not isinstance(data, list):
        raise _refuse(Refusal.BAD_STRUCTURE, f"{where}.data: expected an array, got {_type_name(data)}")
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
                raise _refuse(Refusal.BAD_STRUCTURE, f"{where}.data: objects are not tensor values")
            flat.append(value)
        else:
            stack.pop()
    return flat


def v2_to_predictions(response: dict[str, Any]) -> dict[str, Any]:
    """An Open Inference Protocol response in MLflow's scoring format: {"predictions": [...]}."""
    outputs = response.get("outputs") or []
    if len(outputs) == 1:
        return {"predictions": _rows(outputs[0])}
    columns = {o["name"]: _rows(o) for o in outputs}
    count = len(next(iter(columns.values()), []))
    return {"predictions": [{name: values[i] for name, values in columns.items()} for i in range(count)]}


def _rows(output: dict[str, Any]) -> list:
    data, shape = _flatten(output.get("data", []), "output"), output.get("shape") or []
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    if width == 1:
        return data
    return [data[i : i + width] for i in range(0, len(data), width)]
