"""The MLflow runtime as the serving image runs it."""

from __future__ import annotations

from typing import Any

from mlserver.codecs import PandasCodec
from mlserver.codecs.utils import _get_content_type, decode_request_input  # MLServer's own choice of codec
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver_mlflow import MLflowRuntime
from mlserver_mlflow.codecs import TensorDictCodec

from ml_serving.server import freeze_heap
from ml_serving.server.frames import columns_frame
from ml_serving.server.outputs import INPUT_ERRORS, named_outputs

UNPROCESSABLE = 422


class ServingRuntime(MLflowRuntime):
    """MLServer's MLflow runtime, with `/invocations` served by the validation middleware instead.

    The stock handler runs outside adaptive batching and answers some bad input with 500; overriding it without
    the `custom_handler` decorator removes the route, and the middleware sends `/invocations` through V2.
    Predictions are named from the signature's outputs, and a model logged without a signature (nothing to
    validate against up front) answers its own input errors as 422 with its message. Once loaded, the heap is
    frozen (`freeze_heap`), in the worker process that loaded it.
    """

    async def load(self) -> bool:
        loaded = await super().load()
        freeze_heap()
        return loaded

    async def invocations(self) -> None:  # type: ignore[override]
        raise NotImplementedError("/invocations is served by ml_serving.server.middleware")

    def decode_request(self, inference_request: InferenceRequest, default_codec: Any = None) -> Any:
        """MLServer's decode, with a model of named columns (PandasCodec's requests) decoded by `columns_frame`:
        the same DataFrame at a quarter of the cost."""
        if _get_content_type(inference_request, self._settings) != PandasCodec.ContentType:
            return super().decode_request(inference_request, default_codec)
        for tensor in inference_request.inputs:  # each input by its own codec first, as MLServer does
            decode_request_input(tensor, self._inputs_index)
        frame = columns_frame(inference_request)
        return PandasCodec.decode_request(inference_request) if frame is None else frame

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
