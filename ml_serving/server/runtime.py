"""The MLflow runtime as the serving image runs it."""

from __future__ import annotations

from typing import Any

from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver_mlflow import MLflowRuntime
from mlserver_mlflow.codecs import TensorDictCodec

UNPROCESSABLE = 422
# What a model's own input checks raise (sklearn, NumPy, pandas, MLflow): the client's data, not a server fault.
INPUT_ERRORS = (ValueError, TypeError, KeyError, IndexError)


class ServingRuntime(MLflowRuntime):
    """MLServer's MLflow runtime, with `/invocations` served by the validation middleware instead.

    The stock handler runs outside adaptive batching and answers some bad input with 500; overriding it without
    the `custom_handler` decorator removes the route, and the middleware sends `/invocations` through V2.
    Predictions are named from the signature's outputs, and a model logged without a signature (nothing to
    validate against up front) answers its own input errors as 422 with its message.
    """

    async def invocations(self) -> None:  # type: ignore[override]
        raise NotImplementedError("/invocations is served by ml_serving.server.middleware")

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        decoded = self.decode_request(payload)
        params = payload.parameters.model_extra if payload.parameters and payload.parameters.model_extra else None
        try:
            output = self._model.predict(decoded, params=params)
        except INPUT_ERRORS as error:
            if self._signature is not None:
                raise  # the request matched the signature: a failure now is the model's
            raise MLServerError(f"the model refused the input: {error}", UNPROCESSABLE) from None
        except Exception as error:
            from mlflow.exceptions import MlflowException

            if self._signature is None and isinstance(error, MlflowException):
                raise MLServerError(f"the model refused the input: {error.message}", UNPROCESSABLE) from None
            raise
        return self.encode_response(named_outputs(output, self._signature), default_codec=TensorDictCodec)


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
        # pandas 3 keeps text as its `str` dtype, which MLServer's codec (NumPy dtypes) cannot name: as objects,
        # it is BYTES.
        text = [c for c, t in output.dtypes.items() if isinstance(t, pd.StringDtype) or str(t) == "str"]
        if text:
            output = output.astype(dict.fromkeys(text, object))
    return output
