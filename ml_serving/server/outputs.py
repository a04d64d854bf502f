"""Predictions named from the model's signature: shared by the MLServer and BentoML runtimes (no server imports)."""

from __future__ import annotations

from typing import Any

# What a model's own input checks raise (sklearn, NumPy, pandas, MLflow): the client's data, not a server fault.
INPUT_ERRORS = (ValueError, TypeError, KeyError, IndexError)


def json_default(value: Any) -> Any:
    """orjson's fallback for predictions: BYTES outputs as text (as MLServer's own REST answers them), NumPy scalars
    as Python numbers."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):  # a NumPy scalar
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def output_kind(output: Any) -> dict[str, Any] | None:
    """What kind of object the model returned, for `/invocations` to answer as MLflow does
    (validation.protocols.predictions): named_outputs may turn an array into named columns."""
    import numpy as np
    import pandas as pd

    if isinstance(output, np.ndarray):
        return {"kind": "array", "ndim": output.ndim}
    if isinstance(output, pd.DataFrame):
        return {"kind": "records"}
    if isinstance(output, pd.Series):
        return {"kind": "records", "name": str(0 if output.name is None else output.name)}
    if isinstance(output, dict):
        return {"kind": "dict", "ndim": {str(k): np.ndim(value) for k, value in output.items()}}
    if isinstance(output, list):
        return {"kind": "list"}
    return None


def named_outputs(output: Any, signature: Any) -> Any:
    """An array of predictions as a frame named by the signature's output columns (e.g. `label`, or `label` and
    `probability`), so both protocols answer with those names and each column's own V2 datatype."""
    import numpy as np
    import pandas as pd

    schema = getattr(signature, "outputs", None)
    names = schema.input_names() if schema is not None and schema.has_input_names() else None
    if names and not schema.is_tensor_spec():
        if isinstance(output, pd.Series) and len(names) == 1:
            output = output.rename(names[0]).to_frame()
        elif isinstance(output, np.ndarray) and output.ndim == 1 and len(names) == 1:
            output = pd.DataFrame({names[0]: output})
        elif isinstance(output, np.ndarray) and output.ndim == 2 and output.shape[1] == len(names):
            output = pd.DataFrame(output, columns=names)
    if isinstance(output, pd.Series):
        output = output.to_frame()
    if isinstance(output, pd.DataFrame):
        if not all(isinstance(c, str) for c in output.columns):  # an unnamed Series' column 0: V2 names are text
            output = output.rename(columns=str)
        # pandas 3 keeps text as its `str` dtype, which MLServer's codec (NumPy dtypes) cannot name: as objects,
        # it is BYTES.
        text = [c for c, t in output.dtypes.items() if isinstance(t, pd.StringDtype) or str(t) == "str"]
        if text:
            output = output.astype(dict.fromkeys(text, object))
    return output
