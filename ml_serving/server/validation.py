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
    OVERLOADED = "overloaded"  # shed (503 + Retry-After): over the latency budget, not the client's mistake


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


# What each V2 datatype holds, as JSON values: the one table the tensor checks read.
def _integer_range(bits: int, signed: bool) -> Callable[[Any], bool]:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


DATATYPE_VALUES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{f"INT{b}": (f"an integer of {b} bits", _integer_range(b, True)) for b in (8, 16, 32, 64)},
    **{f"UINT{b}": (f"an unsigned integer of {b} bits", _integer_range(b, False)) for b in (8, 16, 32, 64)},
    **{f"FP{b}": ("a number", _finite_number) for b in (16, 32, 64)},
    "BOOL": ("true or false", lambda value: isinstance(value, bool)),
    "BYTES": ("a string", lambda value: isinstance(value, str)),
}
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
# NumPy's dtype names (an MLflow TensorSpec's type) as V2 datatypes.
V2_OF_NUMPY = {
    **{f"int{b}": f"INT{b}" for b in (8, 16, 32, 64)},
    **{f"uint{b}": f"UINT{b}" for b in (8, 16, 32, 64)},
    **{f"float{b}": f"FP{b}" for b in (16, 32, 64)},
    "bool": "BOOL",
    "object": "BYTES",
    "str": "BYTES",
    "bytes": "BYTES",
}
V2_DATATYPES = frozenset(DATATYPE_VALUES)  # the Open Inference Protocol's list


@dataclass(frozen=True)
class Tensor:
    """One input of a tensor signature: a name (None for the single unnamed tensor), datatype and shape."""

    name: str | None
    datatype: str
    shape: tuple[int, ...]  # -1: any size

    def label(self, index: int = 0) -> str:
        return self.name if self.name is not None else f"input-{index}"


@dataclass(frozen=True)
class Param:
    """An inference parameter of the model's params schema; `check` raises ValueError with MLflow's words."""

    name: str
    describe: str
    check: Callable[[Any], Any]


@dataclass(frozen=True)
class Inputs:
    """What the model takes, read once from its MLflow signature: named columns, tensors, or nothing known."""

    columns: list[Column] | None = None
    tensors: list[Tensor] | None = None
    params: dict[str, Param] | None = None

    @property
    def content_type(self) -> str | None:
        """The request codec MLServer's MLflow runtime decodes with (None: no signature, chosen per request)."""
        if self.columns is not None:
            return "pd"
        if self.tensors is not None:
            return "dict" if self.tensors[0].name is not None else "np"
        return None


def model_inputs(signature: Any) -> Inputs:
    """`Inputs` of an MLflow signature (None: a model logged without one)."""
    if signature is None:
        return Inputs()
    params = _params(getattr(signature, "params", None))
    schema = signature.inputs
    if schema is None:
        return Inputs(params=params)
    if schema.is_tensor_spec():
        tensors = [
            Tensor(spec.name, V2_OF_NUMPY.get(spec.type.name, "BYTES"), tuple(int(d) for d in spec.shape))
            for spec in schema.inputs
        ]
        return Inputs(tensors=tensors, params=params)
    columns = []
    for spec in schema.inputs:
        kind = KIND_OF_MLFLOW_TYPE.get(getattr(spec.type, "name", str(spec.type)))
        if kind is None or not spec.name:
            return Inputs(params=params)  # nested types (arrays, objects): MLflow's own enforcement checks them
        columns.append(Column(spec.name, kind, bool(getattr(spec, "required", True))))
    return Inputs(columns=columns, params=params)


def _params(schema: Any) -> dict[str, Param] | None:
    if schema is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.types.schema import ParamSpec

    def checker(spec: Any) -> Callable[[Any], Any]:
        def check(value: Any) -> Any:
            try:
                return ParamSpec.validate_param_spec(value, spec)
            except MlflowException as error:
                raise ValueError(error.message) from None

        return check

    return {spec.name: Param(spec.name, _describe(spec), checker(spec)) for spec in schema.params}


def _describe(spec: Any) -> str:
    dtype = getattr(spec.dtype, "name", str(spec.dtype))
    return dtype if spec.shape is None else f"{dtype} {list(spec.shape)}"


def parse_json(body: bytes, limits: Limits) -> Any:
    if not body.strip():
        raise RequestError(BAD_REQUEST, Refusal.MALFORMED_BODY, "empty body: send a JSON object")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise RequestError(
                BAD_REQUEST, Refusal.MALFORMED_BODY, f"body is not UTF-8 (byte {bad.start}): send UTF-8 encoded JSON"
            ) from None
        raise RequestError(BAD_REQUEST, Refusal.MALFORMED_BODY, f"malformed JSON: {exc}") from None
    if body.count(b"[") + body.count(b"{") > limits.max_depth:  # fewer brackets than the limit: not that deep
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


def invocation_request(payload: Any, inputs: Inputs, limits: Limits) -> dict[str, Any]:
    """An MLflow scoring request (`dataframe_records`, `dataframe_split`, `instances`, `inputs`), checked, as the
    Open Inference Protocol request that carries it to the model (so both paths share adaptive batching)."""
    kind, data, params = _invocation_envelope(payload)
    if inputs.tensors is not None or (inputs.columns is None and _tensor_shaped(kind, data)):
        request = _tensor_request(kind, data, inputs)
        if params:
            request["parameters"].update(params)
        return check_v2(request, inputs, limits)
    if kind == "inputs" and isinstance(data, list):
        raise _refuse(Refusal.BAD_STRUCTURE, "inputs: this model takes named columns: send {column: [values]}")
    table, _ = invocation_table(payload, inputs.columns, limits)
    _check_params("params", params, inputs)
    return v2_request(table, inputs.columns, params)


def _invocation_envelope(payload: Any) -> tuple[str, Any, dict | None]:
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
    return formats[0], payload[formats[0]], params


def _tensor_shaped(kind: str, data: Any) -> bool:
    """MLflow's tensor formats, for a model without a signature: nested arrays, not row objects or columns."""
    return kind in ("inputs", "instances") and isinstance(data, list) and not any(isinstance(v, dict) for v in data)


def _tensor_request(kind: str, data: Any, inputs: Inputs) -> dict[str, Any]:
    """`inputs` / `instances` as V2 tensors: one nested array for one unnamed tensor, or named arrays."""
    tensors = inputs.tensors
    named = tensors is not None and tensors[0].name is not None
    if not named:
        if not isinstance(data, list):
            raise _refuse(Refusal.BAD_STRUCTURE, f"{kind}: this model takes one tensor: send a (nested) array")
        datatype = tensors[0].datatype if tensors else _guess_datatype(data, kind)
        name = tensors[0].label() if tensors else "input-0"
        return {
            "inputs": [_tensor_of(name, datatype, data, kind)],
            "parameters": {"content_type": inputs.content_type or "np"},
        }
    if kind == "instances":
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise _refuse(Refusal.BAD_STRUCTURE, "instances: this model takes named tensors: send [{name: row}, ...]")
        names = list(dict.fromkeys(name for row in data for name in row))
        missing = [(i, n) for i, row in enumerate(data) for n in names if n not in row]
        if missing:
            index, name = missing[0]
            raise _refuse(Refusal.MISSING_COLUMN, f"instances[{index}]: missing tensor '{name}'")
        data = {name: [row[name] for row in data] for name in names}
    if not isinstance(data, dict):
        raise _refuse(Refusal.BAD_STRUCTURE, f"{kind}: this model takes named tensors: send {{name: array}}")
    by_name = {t.name: t for t in tensors or []}
    return {
        "inputs": [
            _tensor_of(name, by_name[name].datatype if name in by_name else "BYTES", values, f"{kind}.{name}")
            for name, values in data.items()
        ],
        "parameters": {"content_type": inputs.content_type},
    }


def _tensor_of(name: str, datatype: str, data: Any, where: str) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": _shape_of(data, where), "data": _flatten(data, where)}


def _shape_of(data: Any, where: str) -> list[int]:
    """The shape of a nested array; a ragged one (rows of different lengths or depths) is refused."""
    if not isinstance(data, list):
        raise _refuse(Refusal.BAD_STRUCTURE, f"{where}: expected an array, got {_type_name(data)}")
    if not data:
        raise _refuse(Refusal.NO_ROWS, f"{where}: no rows: send at least one")
    shape, level = [len(data)], data
    while isinstance(level[0], list):
        lengths = {len(v) if isinstance(v, list) else -1 for v in level}
        if len(lengths) != 1 or -1 in lengths:
            raise _refuse(Refusal.RAGGED, f"{where}: ragged array: every row needs the same shape")
        shape.append(lengths.pop())
        level = [item for row in level for item in row]
        if not level:
            break
    if any(isinstance(v, list) for v in level):
        raise _refuse(Refusal.RAGGED, f"{where}: ragged array: every row needs the same shape")
    return shape


def _guess_datatype(data: Any, where: str) -> str:
    """The datatype of a tensor sent to a model without a signature, from its values (MLflow's NumPy view)."""
    values = _flatten(data, where)
    if values and all(isinstance(v, bool) for v in values):
        return "BOOL"
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "INT64"
    if values and all(_finite_number(v) for v in values):
        return "FP64"
    if values and all(isinstance(v, str) for v in values):
        return "BYTES"
    raise _refuse(Refusal.WRONG_TYPE, f"{where}: expected numbers, strings or booleans, one kind per tensor")


def invocation_table(payload: Any, columns: list[Column] | None, limits: Limits) -> tuple[dict[str, list], Any]:
    """An MLflow scoring request in its row or column formats, as columns: ({column: values}, params).

    Every row is checked against `columns` when the model has them.
    """
    kind, data, params = _invocation_envelope(payload)
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
        raise _refuse(Refusal.BAD_STRUCTURE, "expected a JSON object with 'inputs'", BAD_REQUEST)
    unknown = set(payload) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise _refuse(
            Refusal.BAD_STRUCTURE,
            f"unknown field(s) {', '.join(sorted(unknown))}: expected id, inputs, outputs, parameters",
            BAD_REQUEST,
        )
    tensors = payload.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise _refuse(Refusal.BAD_STRUCTURE, "inputs: expected a non-empty array of tensors")
    parameters = payload.get("parameters")
    _check_parameters("parameters", parameters, request_content_types(inputs))
    if parameters:
        extra = {k: v for k, v in parameters.items() if k not in ("content_type", "headers")}
        _check_params("parameters", extra, inputs)
    return tensors


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


def _check_values(datatype: str, data: list, where: str) -> None:
    """Every value of a tensor is one its datatype holds (no signature to compare with: the tensor's own)."""
    expected, accepts = DATATYPE_VALUES[datatype]
    for position, value in enumerate(data):
        if value is None:
            raise _refuse(Refusal.NULL_VALUE, f"{where}.data[{position}]: null is not a tensor value")
        if not accepts(value):
            raise _refuse(
                Refusal.WRONG_TYPE,
                f"{where}.data[{position}]: {datatype} holds {expected}, got {_type_name(value)} ({_short(value)})",
            )


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


def _tensor_spec(specs: list[Tensor], name: str, count: int, where: str) -> Tensor:
    if specs[0].name is None:  # one unnamed tensor: any name will do, but only one input
        if count != 1:
            raise _refuse(
                Refusal.UNKNOWN_COLUMN, f"inputs: the model takes one tensor ({_tensor_names(specs)}), got {count}"
            )
        return specs[0]
    for spec in specs:
        if spec.name == name:
            return spec
    raise _refuse(Refusal.UNKNOWN_COLUMN, f"{where}: unknown input; the model takes {_tensor_names(specs)}")


def _tensor_names(specs: list[Tensor]) -> str:
    return ", ".join(f"{s.label(i)} ({s.datatype} {list(s.shape)})" for i, s in enumerate(specs))


def _check_against_tensor(spec: Tensor, tensor: dict[str, Any], data: list, where: str) -> None:
    """Datatype (converted when it widens losslessly), shape (-1: any size) and values against the signature."""
    datatype, shape = tensor["datatype"], tensor["shape"]
    if datatype != spec.datatype:
        if datatype not in WIDENS_TO.get(spec.datatype, ()):
            fits = ", ".join([spec.datatype, *sorted(WIDENS_TO.get(spec.datatype, ()))])
            raise _refuse(
                Refusal.WRONG_DATATYPE,
                f"{where}.datatype: {datatype} does not fit tensor '{spec.label()}' ({spec.datatype}); send {fits}",
            )
        tensor["datatype"] = spec.datatype  # lossless: every value of the narrower type is one of the model's
    fixed = list(spec.shape)
    if len(shape) != len(fixed) or any(want not in (-1, got) for want, got in zip(fixed, shape, strict=True)):
        raise _refuse(
            Refusal.BAD_SHAPE,
            f"{where}.shape: {shape} does not fit tensor '{spec.label()}' of shape {fixed} (-1: any size)",
        )
    _check_values(spec.datatype, data, where)


def _check_batch(rows: dict[str, int], inputs: Inputs) -> None:
    columns = inputs.columns
    if columns is not None:
        missing = [c.name for c in columns if c.required and c.name not in rows]
        if missing:
            raise _refuse(
                Refusal.MISSING_COLUMN,
                f"inputs: missing column(s) {', '.join(missing)}; the model takes {_names(columns)}",
            )
    if inputs.tensors is not None and inputs.tensors[0].name is not None:
        missing = [t.name for t in inputs.tensors if t.name not in rows]
        if missing:
            raise _refuse(
                Refusal.MISSING_COLUMN,
                f"inputs: missing tensor(s) {', '.join(map(str, missing))}; the model takes "
                f"{_tensor_names(inputs.tensors)}",
            )
    if len(set(rows.values())) > 1:
        shown = ", ".join(f"{n}={r}" for n, r in rows.items())
        raise _refuse(Refusal.RAGGED, f"inputs: ragged batch: every input needs the same number of rows ({shown})")


def _check_params(where: str, params: dict[str, Any] | None, inputs: Inputs) -> None:
    """Inference parameters against the model's params schema: unknown or mistyped ones are refused (a model
    without a schema gets none: MLflow would drop them silently)."""
    if not params:
        return
    if inputs.params is None:
        raise _refuse(
            Refusal.BAD_PARAMETERS,
            f"{where}: {', '.join(sorted(params))}: this model takes no parameters (its signature has no params)",
        )
    for name, value in params.items():
        spec = inputs.params.get(name)
        if spec is None:
            known = ", ".join(f"{p.name} ({p.describe})" for p in inputs.params.values())
            raise _refuse(Refusal.BAD_PARAMETERS, f"{where}.{name}: unknown parameter; the model takes {known}")
        try:
            spec.check(value)
        except ValueError as error:
            raise _refuse(Refusal.BAD_PARAMETERS, f"{where}.{name}: expects {spec.describe}: {error}") from None


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
