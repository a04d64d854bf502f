"""Translating between protocols: MLflow's scoring protocol (`/invocations`) and gRPC into the Open Inference
Protocol request the model runs, and its answer back into MLflow's format. The third validation layer: each
envelope is parsed once here and its content checked by `checks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from ml_serving.server.checks import (
    Limits,
    Refusal,
    check_params,
    check_rows,
    check_v2,
    flatten,
    refuse,
    type_name,
)
from ml_serving.server.signature import Column, Inputs, finite_number

INVOCATION_FORMATS = ("dataframe_records", "dataframe_split", "instances", "inputs")

# MLflow's scoring protocol (/invocations) --------------------------------------------------------------------


def invocation_request(payload: Any, inputs: Inputs, limits: Limits) -> dict[str, Any]:
    """An MLflow scoring request (`dataframe_records`, `dataframe_split`, `instances`, `inputs`), checked, as the
    Open Inference Protocol request that carries it to the model (so both paths share adaptive batching)."""
    envelope = invocation_envelope(payload)
    kind, data, params = envelope.kind, envelope.data, envelope.params
    if inputs.tensors is not None or (inputs.columns is None and _tensor_shaped(kind, data)):
        request = _tensor_request(kind, data, inputs)
        if params:
            request["parameters"].update(params)
        return check_v2(request, inputs, limits)
    if kind == "inputs" and isinstance(data, list):
        raise refuse(Refusal.BAD_STRUCTURE, "inputs: this model takes named columns: send {column: [values]}")
    table = invocation_table(envelope, inputs.columns, limits)
    check_params("params", params, inputs)
    return v2_request(table, inputs.columns, params)


@dataclass(frozen=True)
class Invocation:
    """An MLflow scoring request's envelope: its one format (`kind`), that format's data, and `params`."""

    kind: str
    data: Any
    params: dict[str, Any] | None


def invocation_envelope(payload: Any) -> Invocation:
    """The envelope of an `/invocations` body, read once: exactly one format, and `params` as an object."""
    if not isinstance(payload, dict):
        raise refuse(
            Refusal.BAD_STRUCTURE,
            f"expected a JSON object with one of {', '.join(INVOCATION_FORMATS)}",
            HTTPStatus.BAD_REQUEST,
        )
    unknown = set(payload) - {*INVOCATION_FORMATS, "params"}
    formats = [key for key in INVOCATION_FORMATS if key in payload]
    if unknown:
        raise refuse(
            Refusal.BAD_STRUCTURE,
            f"unknown field(s) {', '.join(sorted(unknown))}: use one of {', '.join(INVOCATION_FORMATS)}",
            HTTPStatus.BAD_REQUEST,
        )
    if len(formats) != 1:
        raise refuse(
            Refusal.BAD_STRUCTURE,
            f"send exactly one of {', '.join(INVOCATION_FORMATS)} (got {len(formats)})",
            HTTPStatus.BAD_REQUEST,
        )
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise refuse(Refusal.BAD_PARAMETERS, "params: expected a JSON object", HTTPStatus.BAD_REQUEST)
    return Invocation(formats[0], payload[formats[0]], params)


def _tensor_shaped(kind: str, data: Any) -> bool:
    """MLflow's tensor formats, for a model without a signature: nested arrays, not row objects or columns."""
    return kind in ("inputs", "instances") and isinstance(data, list) and not any(isinstance(v, dict) for v in data)


def _tensor_request(kind: str, data: Any, inputs: Inputs) -> dict[str, Any]:
    """`inputs` / `instances` as V2 tensors: one nested array for one unnamed tensor, or named arrays."""
    tensors = inputs.tensors
    named = tensors is not None and tensors[0].name is not None
    if not named:
        if not isinstance(data, list):
            raise refuse(Refusal.BAD_STRUCTURE, f"{kind}: this model takes one tensor: send a (nested) array")
        datatype = tensors[0].datatype if tensors else _guess_datatype(data, kind)
        name = tensors[0].label() if tensors else "input-0"
        return {
            "inputs": [_tensor_of(name, datatype, data, kind)],
            "parameters": {"content_type": inputs.content_type or "np"},
        }
    if kind == "instances":
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise refuse(Refusal.BAD_STRUCTURE, "instances: this model takes named tensors: send [{name: row}, ...]")
        names = list(dict.fromkeys(name for row in data for name in row))
        missing = [(i, n) for i, row in enumerate(data) for n in names if n not in row]
        if missing:
            index, name = missing[0]
            raise refuse(Refusal.MISSING_COLUMN, f"instances[{index}]: missing tensor '{name}'")
        data = {name: [row[name] for row in data] for name in names}
    if not isinstance(data, dict):
        raise refuse(Refusal.BAD_STRUCTURE, f"{kind}: this model takes named tensors: send {{name: array}}")
    by_name = {t.name: t for t in tensors or []}
    return {
        "inputs": [
            _tensor_of(name, by_name[name].datatype if name in by_name else "BYTES", values, f"{kind}.{name}")
            for name, values in data.items()
        ],
        "parameters": {"content_type": inputs.content_type},
    }


def _tensor_of(name: str, datatype: str, data: Any, where: str) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": _shape_of(data, where), "data": flatten(data, where)}


def _shape_of(data: Any, where: str) -> list[int]:
    """The shape of a nested array; a ragged one (rows of different lengths or depths) is refused."""
    if not isinstance(data, list):
        raise refuse(Refusal.BAD_STRUCTURE, f"{where}: expected an array, got {type_name(data)}")
    if not data:
        raise refuse(Refusal.NO_ROWS, f"{where}: no rows: send at least one")
    shape, level = [len(data)], data
    while isinstance(level[0], list):
        lengths = {len(v) if isinstance(v, list) else -1 for v in level}
        if len(lengths) != 1 or -1 in lengths:
            raise refuse(Refusal.RAGGED, f"{where}: ragged array: every row needs the same shape")
        shape.append(lengths.pop())
        level = [item for row in level for item in row]
        if not level:
            break
    if any(isinstance(v, list) for v in level):
        raise refuse(Refusal.RAGGED, f"{where}: ragged array: every row needs the same shape")
    return shape


def _guess_datatype(data: Any, where: str) -> str:
    """The datatype of a tensor sent to a model without a signature, from its values (MLflow's NumPy view)."""
    values = flatten(data, where)
    if values and all(isinstance(v, bool) for v in values):
        return "BOOL"
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    if values and all(finite_number(v) for v in values):
        return "FP64"
    if values and all(isinstance(v, str) for v in values):
        return "BYTES"
    raise refuse(Refusal.WRONG_TYPE, f"{where}: expected numbers, strings or booleans, one kind per tensor")


def invocation_table(envelope: Invocation, columns: list[Column] | None, limits: Limits) -> dict[str, list]:
    """An MLflow scoring request in its row or column formats, as columns: {column: values}.

    Every row is checked against `columns` when the model has them.
    """
    kind, data = envelope.kind, envelope.data
    if kind in ("dataframe_records", "instances"):
        rows = _records(data, kind)
    elif kind == "dataframe_split":
        rows = _split(data)
    else:
        rows = _columnar(data)
    if not rows:
        raise refuse(Refusal.NO_ROWS, f"{kind}: no rows: send at least one")
    if len(rows) > limits.max_rows:
        raise refuse(
            Refusal.TOO_LARGE,
            f"{kind}: {len(rows)} rows is more than the limit of {limits.max_rows}",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
    return check_rows(rows, columns, kind)


def _records(data: Any, kind: str) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise refuse(Refusal.BAD_STRUCTURE, f"{kind}: expected an array of row objects, got {type_name(data)}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise refuse(Refusal.BAD_STRUCTURE, f"{kind}[{index}]: expected a row object, got {type_name(row)}")
    return data


def _split(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("columns"), list) or "data" not in data:
        raise refuse(Refusal.BAD_STRUCTURE, 'dataframe_split: expected {"columns": [...], "data": [[...], ...]}')
    names, values = data["columns"], data["data"]
    unknown = set(data) - {"columns", "data", "index"}
    if unknown:
        raise refuse(Refusal.BAD_STRUCTURE, f"dataframe_split: unknown field(s) {', '.join(sorted(unknown))}")
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise refuse(Refusal.BAD_STRUCTURE, "dataframe_split.columns: expected distinct column names (strings)")
    if not isinstance(values, list):
        raise refuse(Refusal.BAD_STRUCTURE, f"dataframe_split.data: expected an array of rows, got {type_name(values)}")
    rows = []
    for index, row in enumerate(values):
        if not isinstance(row, list):
            raise refuse(
                Refusal.BAD_STRUCTURE, f"dataframe_split.data[{index}]: expected an array, got {type_name(row)}"
            )
        if len(row) != len(names):
            raise refuse(
                Refusal.RAGGED,
                f"dataframe_split.data[{index}]: ragged row: {len(row)} values for {len(names)} columns",
            )
        rows.append(dict(zip(names, row, strict=True)))
    return rows


def _columnar(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict):
        raise refuse(Refusal.BAD_STRUCTURE, "inputs: expected an object of column name → array of values")
    lengths = {name: len(v) if isinstance(v, list) else None for name, v in data.items()}
    for name, length in lengths.items():
        if length is None:
            raise refuse(Refusal.BAD_STRUCTURE, f"inputs.{name}: expected an array of values")
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{n}={n_}" for n, n_ in lengths.items())
        raise refuse(Refusal.RAGGED, f"inputs: ragged columns: every column needs the same length ({shown})")
    count = next(iter(lengths.values()), 0)
    return [{name: data[name][i] for name in data} for i in range(count)]


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


# Answers: the model's output in MLflow's scoring format ------------------------------------------------------

# The response parameter in which the runtime says what kind of object the model returned (outputs.output_kind):
# MLflow's answer depends on it, the V2 tensors alone do not tell (a 2-D array and a DataFrame of the same values
# are the same tensors). Taken out of every answer before it leaves the server.
OUTPUT_KIND = "ml_serving_output"


def strip_output_kind(response: dict[str, Any]) -> dict[str, Any] | None:
    """Take the runtime's output kind out of a V2 answer (returned; None if the runtime gave none)."""
    parameters = response.get("parameters")
    if not parameters or OUTPUT_KIND not in parameters:
        return None
    kind = parameters.pop(OUTPUT_KIND)
    if not parameters:
        del response["parameters"]
    return kind


def predictions(response: dict[str, Any]) -> dict[str, Any]:
    """An Open Inference Protocol answer in MLflow's scoring format, as `mlflow models serve` answers the same
    output (mlflow.pyfunc.scoring_server.predictions_to_json): an array as nested lists, a DataFrame or Series as
    records, a dict of arrays as {name: values}, a list as the list."""
    kind = strip_output_kind(response) or {}
    outputs = response.get("outputs") or []
    shaped = {o["name"]: _shaped(o) for o in outputs}
    match kind.get("kind"):
        case "array" if len(outputs) == 1:
            (values,) = shaped.values()
            return {"predictions": flatten(values, "output") if kind.get("ndim") == 1 else values}
        case "array":  # a 2-D array the runtime split into the signature's named columns
            columns = [_column(values) for values in shaped.values()]
            return {"predictions": [list(row) for row in zip(*columns, strict=True)]}
        case "dict":
            ndims = kind.get("ndim") or {}
            return {
                "predictions": {
                    name: flatten(values, "output") if ndims.get(name) == 1 else values
                    for name, values in shaped.items()
                }
            }
        case "list":
            return {"predictions": [value for values in shaped.values() for value in flatten(values, "output")]}
        case "records":
            columns = {name: _column(values) for name, values in shaped.items()}
            if "name" in kind and len(columns) == 1:  # a Series: MLflow names the column as pandas does
                columns = {kind["name"]: next(iter(columns.values()))}
            count = len(next(iter(columns.values()), []))
            return {"predictions": [{name: values[i] for name, values in columns.items()} for i in range(count)]}
    return v2_to_predictions(response)


def _shaped(output: dict[str, Any]) -> Any:
    """An output's data as nested lists of its shape."""
    data, shape = flatten(output.get("data", []), "output"), output.get("shape") or [len(output.get("data", []))]
    for size in reversed(shape[1:]):
        if size:
            data = [data[i : i + size] for i in range(0, len(data), size)]
    return data


def _column(values: list) -> list:
    """One value per row: rows of one value unwrapped (a column arrives as shape [n, 1])."""
    return [row[0] if isinstance(row, list) and len(row) == 1 else row for row in values]


def grpc_payload(request: Any) -> dict[str, Any]:
    """A gRPC inference request (MLServer's converted `InferenceRequest`) as the JSON-shaped payload the checks
    read, as REST would have sent it: BYTES contents as text."""
    payload = request.model_dump(exclude_none=True)
    for index, tensor in enumerate(payload.get("inputs") or []):
        if tensor.get("datatype") == "BYTES" and isinstance(tensor.get("data"), list):
            tensor["data"] = [_text(value, f"inputs[{index}].contents[{i}]") for i, value in enumerate(tensor["data"])]
    return payload


def _text(value: Any, where: str) -> Any:
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as bad:
        raise refuse(Refusal.WRONG_TYPE, f"{where}: not UTF-8 text (byte {bad.start}): send text") from None


def index_request(payload: Any) -> bool:
    """The repository index's request: an object with at most `ready` (true: list only ready models)."""
    if not isinstance(payload, dict) or set(payload) - {"ready"}:
        raise refuse(
            Refusal.BAD_STRUCTURE,
            'expected {} or {"ready": true|false} for the repository index',
            HTTPStatus.BAD_REQUEST,
        )
    ready = payload.get("ready")
    if ready is not None and not isinstance(ready, bool):
        raise refuse(Refusal.BAD_STRUCTURE, "ready: expected true or false", HTTPStatus.BAD_REQUEST)
    return bool(ready)


def v2_to_predictions(response: dict[str, Any]) -> dict[str, Any]:
    """An answer that does not say what the model returned (the BentoML runtime's): one output as its values,
    several as records."""
    outputs = response.get("outputs") or []
    if len(outputs) == 1:
        return {"predictions": _rows(outputs[0])}
    columns = {o["name"]: _rows(o) for o in outputs}
    count = len(next(iter(columns.values()), []))
    return {"predictions": [{name: values[i] for name, values in columns.items()} for i in range(count)]}


def _rows(output: dict[str, Any]) -> list:
    data, shape = flatten(output.get("data", []), "output"), output.get("shape") or []
    width = math.prod(shape[1:]) if len(shape) > 1 else 1
    if width == 1:
        return data
    return [data[i : i + width] for i in range(0, len(data), width)]
