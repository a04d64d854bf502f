"""Check a request against the model's MLflow signature before it reaches `predict`.

A client's mistake is answered with a 4xx that names the column or field and what was expected; only a fault of
the server is a 5xx. Pure functions over parsed JSON: no web framework in here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

BAD_REQUEST, NOT_FOUND, TIMEOUT, TOO_LARGE, UNSUPPORTED, UNPROCESSABLE = 400, 404, 408, 413, 415, 422

INVOCATION_FORMATS = ("dataframe_records", "dataframe_split", "instances", "inputs")
V2_TYPES = {
    "integer": {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"},
    "float": {"FP16", "FP32", "FP64", "INT8", "INT16", "INT32", "INT64"},
    "string": {"BYTES"},
    "boolean": {"BOOL"},
    "binary": {"BYTES"},
    "datetime": {"BYTES"},
}
V2_DATATYPE = {"integer": "INT64", "float": "FP64", "string": "BYTES", "boolean": "BOOL", "binary": "BYTES"}
MLFLOW_KINDS = {
    "long": "integer",
    "integer": "integer",
    "double": "float",
    "float": "float",
    "string": "string",
    "boolean": "boolean",
    "binary": "binary",
    "datetime": "datetime",
}


class RequestError(Exception):
    """A request the server will not run: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # integer, float, string, boolean, binary, datetime
    required: bool = True

    @property
    def v2_datatype(self) -> str:
        return V2_DATATYPE.get(self.kind, "BYTES")


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
        kind = MLFLOW_KINDS.get(getattr(spec.type, "name", str(spec.type)))
        if kind is None:
            return None
        columns.append(Column(spec.name, kind, bool(getattr(spec, "required", True))))
    return columns


def parse_json(body: bytes, limits: Limits) -> Any:
    if not body.strip():
        raise RequestError(BAD_REQUEST, "empty body: send a JSON object")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(BAD_REQUEST, f"body is not UTF-8 (byte {exc.start}): send UTF-8 encoded JSON") from None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(BAD_REQUEST, f"malformed JSON: {exc}") from None
    _check_depth(payload, limits.max_depth)
    return payload


def _check_depth(payload: Any, limit: int) -> None:
    stack = [(payload, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            raise RequestError(BAD_REQUEST, f"JSON nested more than {limit} levels deep")
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


_EXPECTED = {
    "integer": "an integer",
    "float": "a number",
    "string": "a string",
    "boolean": "true or false",
    "binary": "a base64 string",
    "datetime": "an ISO 8601 string",
}


def check_value(column: Column, value: Any, where: str) -> None:
    if value is None:
        if column.required:
            raise RequestError(UNPROCESSABLE, f"{where}: column '{column.name}' may not be null")
        return
    kind, ok = column.kind, False
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and isinstance(value, float) and not math.isfinite(value):
            ok = False
    elif kind == "boolean":
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise RequestError(
            UNPROCESSABLE,
            f"{where}: column '{column.name}' expects {_EXPECTED[kind]}, got {_type_name(value)} ({_short(value)})",
        )


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode() if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def invocation_table(payload: Any, columns: list[Column] | None, limits: Limits) -> tuple[dict[str, list], Any]:
    """An MLflow scoring request (`dataframe_records`, `dataframe_split`, `instances`, `inputs`) as columns.

    Returns ({column: values}, params). Every row is checked against `columns` when the model has them.
    """
    if not isinstance(payload, dict):
        raise RequestError(BAD_REQUEST, f"expected a JSON object with one of {', '.join(INVOCATION_FORMATS)}")
    unknown = set(payload) - {*INVOCATION_FORMATS, "params"}
    formats = [key for key in INVOCATION_FORMATS if key in payload]
    if unknown:
        raise RequestError(
            BAD_REQUEST, f"unknown field(s) {', '.join(sorted(unknown))}: use one of {', '.join(INVOCATION_FORMATS)}"
        )
    if len(formats) != 1:
        raise RequestError(BAD_REQUEST, f"send exactly one of {', '.join(INVOCATION_FORMATS)} (got {len(formats)})")
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise RequestError(BAD_REQUEST, "params: expected a JSON object")
    kind = formats[0]
    data = payload[kind]
    if kind in ("dataframe_records", "instances"):
        rows = _records(data, kind)
    elif kind == "dataframe_split":
        rows = _split(data)
    else:
        rows = _columnar(data)
    if not rows:
        raise RequestError(UNPROCESSABLE, f"{kind}: no rows: send at least one")
    if len(rows) > limits.max_rows:
        raise RequestError(TOO_LARGE, f"{kind}: {len(rows)} rows is more than the limit of {limits.max_rows}")
    return _to_columns(rows, columns, kind), params


def _records(data: Any, kind: str) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise RequestError(UNPROCESSABLE, f"{kind}: expected an array of row objects, got {_type_name(data)}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise RequestError(UNPROCESSABLE, f"{kind}[{index}]: expected a row object, got {_type_name(row)}")
    return data


def _split(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("columns"), list) or "data" not in data:
        raise RequestError(UNPROCESSABLE, 'dataframe_split: expected {"columns": [...], "data": [[...], ...]}')
    names, values = data["columns"], data["data"]
    unknown = set(data) - {"columns", "data", "index"}
    if unknown:
        raise RequestError(UNPROCESSABLE, f"dataframe_split: unknown field(s) {', '.join(sorted(unknown))}")
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise RequestError(UNPROCESSABLE, "dataframe_split.columns: expected distinct column names (strings)")
    if not isinstance(values, list):
        raise RequestError(UNPROCESSABLE, f"dataframe_split.data: expected an array of rows, got {_type_name(values)}")
    rows = []
    for index, row in enumerate(values):
        if not isinstance(row, list):
            raise RequestError(
                UNPROCESSABLE, f"dataframe_split.data[{index}]: expected an array, got {_type_name(row)}"
            )
        if len(row) != len(names):
            raise RequestError(
                UNPROCESSABLE,
                f"dataframe_split.data[{index}]: ragged row: {len(row)} values for {len(names)} columns",
            )
        rows.append(dict(zip(names, row, strict=True)))
    return rows


def _columnar(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict):
        raise RequestError(UNPROCESSABLE, "inputs: expected an object of column name → array of values")
    lengths = {name: len(v) if isinstance(v, list) else None for name, v in data.items()}
    for name, length in lengths.items():
        if length is None:
            raise RequestError(UNPROCESSABLE, f"inputs.{name}: expected an array of values")
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{n}={n_}" for n, n_ in lengths.items())
        raise RequestError(UNPROCESSABLE, f"inputs: ragged columns: every column needs the same length ({shown})")
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
            raise RequestError(
                UNPROCESSABLE,
                f"{where}: unknown column(s) {', '.join(sorted(extra))}; the model takes {_names(columns)}",
            )
        for column in columns:
            if column.name not in row:
                if column.required:
                    raise RequestError(UNPROCESSABLE, f"{where}: missing column '{column.name}' ({column.kind})")
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


def check_v2(payload: Any, columns: list[Column] | None, limits: Limits) -> None:
    """An Open Inference Protocol request: structure, names, datatypes, shapes and values."""
    if not isinstance(payload, dict):
        raise RequestError(BAD_REQUEST, "expected a JSON object with 'inputs'")
    unknown = set(payload) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise RequestError(
            BAD_REQUEST, f"unknown field(s) {', '.join(sorted(unknown))}: expected id, inputs, outputs, parameters"
        )
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(UNPROCESSABLE, "inputs: expected a non-empty array of tensors")
    _check_parameters("parameters", payload.get("parameters"), REQUEST_CONTENT_TYPES)
    rows: dict[str, int] = {}
    by_name = {c.name: c for c in columns or []}
    for index, tensor in enumerate(inputs):
        where = f"inputs[{index}]"
        if not isinstance(tensor, dict):
            raise RequestError(UNPROCESSABLE, f"{where}: expected a tensor object, got {_type_name(tensor)}")
        for key in ("name", "shape", "datatype", "data"):
            if key not in tensor:
                raise RequestError(UNPROCESSABLE, f"{where}: missing '{key}'")
        name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
        if not isinstance(name, str):
            raise RequestError(UNPROCESSABLE, f"{where}.name: expected a string")
        where = f"inputs[{index}] ('{name}')"
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise RequestError(UNPROCESSABLE, f"{where}.shape: expected an array of non-negative integers, e.g. [3, 1]")
        if not isinstance(datatype, str) or datatype not in _ALL_V2:
            raise RequestError(
                UNPROCESSABLE, f"{where}.datatype: {datatype!r} is not a V2 datatype ({', '.join(sorted(_ALL_V2))})"
            )
        _check_parameters(f"{where}.parameters", tensor.get("parameters"), input_content_types(datatype))
        data = _flatten(tensor["data"], where)
        expected = math.prod(shape)
        if len(data) != expected:
            raise RequestError(UNPROCESSABLE, f"{where}: shape {shape} needs {expected} values, got {len(data)}")
        if shape[0] > limits.max_rows:
            raise RequestError(TOO_LARGE, f"{where}: {shape[0]} rows is more than the limit of {limits.max_rows}")
        rows[name] = shape[0]
        if columns is not None:
            column = by_name.get(name)
            if column is None:
                raise RequestError(UNPROCESSABLE, f"{where}: unknown input; the model takes {_names(columns)}")
            if datatype not in V2_TYPES[column.kind]:
                raise RequestError(
                    UNPROCESSABLE,
                    f"{where}.datatype: {datatype} does not fit column '{name}' ({column.kind}); "
                    f"use {column.v2_datatype}",
                )
            for position, value in enumerate(data):
                check_value(column, value, f"{where}.data[{position}]")
        else:
            for position, value in enumerate(data):
                if value is None:
                    raise RequestError(UNPROCESSABLE, f"{where}.data[{position}]: null is not a tensor value")
    if columns is not None:
        missing = [c.name for c in columns if c.required and c.name not in rows]
        if missing:
            raise RequestError(
                UNPROCESSABLE, f"inputs: missing column(s) {', '.join(missing)}; the model takes {_names(columns)}"
            )
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{n}={r}" for n, r in rows.items())
        raise RequestError(UNPROCESSABLE, f"inputs: ragged batch: every input needs the same number of rows ({shown})")


_ALL_V2 = frozenset().union(*V2_TYPES.values())  # every Open Inference Protocol datatype

# The content types (MLServer's codecs) the MLflow runtime decodes: the request as a whole is a DataFrame; a
# tensor of bytes is text, base64 or datetimes, any other tensor a NumPy array. Anything else would reach
# MLflow's schema enforcement undecoded and come back 500.
REQUEST_CONTENT_TYPES = ("pd",)
BYTES_CONTENT_TYPES = ("str", "base64", "datetime")
NUMERIC_CONTENT_TYPES = ("np",)


def input_content_types(datatype: str) -> tuple[str, ...]:
    return BYTES_CONTENT_TYPES if datatype == "BYTES" else NUMERIC_CONTENT_TYPES


def _check_parameters(where: str, parameters: Any, content_types: tuple[str, ...]) -> None:
    if parameters is None:
        return
    if not isinstance(parameters, dict):
        raise RequestError(UNPROCESSABLE, f"{where}: expected an object")
    content_type = parameters.get("content_type")
    if content_type is not None and content_type not in content_types:
        raise RequestError(
            UNPROCESSABLE,
            f"{where}.content_type: {content_type!r} is not decoded here; use {' or '.join(content_types)} "
            "(or leave it out)",
        )


def _flatten(data: Any, where: str) -> list:
    if not isinstance(data, list):
        raise RequestError(UNPROCESSABLE, f"{where}.data: expected an array, got {_type_name(data)}")
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
                raise RequestError(UNPROCESSABLE, f"{where}.data: objects are not tensor values")
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
