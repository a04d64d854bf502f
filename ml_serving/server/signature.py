"""Reading a model's MLflow signature: what it takes (named columns, tensors, params), read once at start.

The first of the validation layers: `checks` compares requests with what is read here, `protocols` translates
between MLflow's scoring protocol and the Open Inference Protocol. Nothing here knows HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def finite_number(value: Any) -> bool:
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
        finite_number,
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


def describe_columns(columns: list[Column]) -> str:
    return ", ".join(f"{c.name} ({c.kind})" for c in columns)


def describe_tensors(specs: list[Tensor]) -> str:
    return ", ".join(f"{s.label(i)} ({s.datatype} {list(s.shape)})" for i, s in enumerate(specs))
