"""Request validation in three layers, modules beside this one, each importing only the one below it:

- `signature`: what a model takes, read once from its MLflow signature (`model_inputs`);
- `checks`: a request's content against it (`check_v2`, `check_rows`), refusals as `RequestError`;
- `protocols`: MLflow's scoring protocol and gRPC into the Open Inference Protocol, and answers back.

This module only gathers their public names for the runtimes (`from ml_serving.server import validation as v`).
"""

from ml_serving.server.checks import (
    DATATYPE_VALUES,
    V2_DATATYPES,
    WIDENS_TO,
    Limits,
    Refusal,
    RequestError,
    check_params,
    check_rows,
    check_v2,
    check_value,
    parse_json,
)
from ml_serving.server.protocols import (
    INVOCATION_FORMATS,
    Invocation,
    invocation_envelope,
    invocation_request,
    invocation_table,
    v2_request,
    v2_to_predictions,
)
from ml_serving.server.signature import (
    KIND_OF_MLFLOW_TYPE,
    KINDS,
    V2_OF_NUMPY,
    Column,
    Inputs,
    Kind,
    Param,
    Tensor,
    model_inputs,
)

__all__ = [
    "DATATYPE_VALUES", "INVOCATION_FORMATS", "KINDS", "KIND_OF_MLFLOW_TYPE", "V2_DATATYPES", "V2_OF_NUMPY", "WIDENS_TO",
    "Column", "Inputs", "Invocation", "Kind", "Limits", "Param", "Refusal", "RequestError", "Tensor",
    "check_params", "check_rows", "check_v2", "check_value", "invocation_envelope", "invocation_request",
    "invocation_table", "model_inputs", "parse_json", "v2_request", "v2_to_predictions",
]  # fmt: skip
