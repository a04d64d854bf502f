"""The MLflow runtime as the serving image runs it."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from mlserver.codecs import PandasCodec
from mlserver.codecs.utils import decode_request_input
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, Parameters
from mlserver_mlflow import MLflowRuntime
from mlserver_mlflow.codecs import TensorDictCodec

from ml_serving.server import freeze_heap
from ml_serving.server import mlserver_compat as compat
from ml_serving.server.frames import columns_frame
from ml_serving.server.outputs import INPUT_ERRORS, named_outputs, output_kind
from ml_serving.server.protocols import OUTPUT_KIND


class ServingRuntime(MLflowRuntime):
    """MLServer's MLflow runtime, with `/invocations` served by the front instead (ml_serving.server.front).

    The stock handler runs outside adaptive batching and answers some bad input with 500; the front sends
    `/invocations` through V2, and the answer says what kind of object the model returned (`output_kind`).
    Predictions are named from the signature's outputs, and a model logged without a signature (nothing to
    validate against up front) answers its own input errors as 422 with its message. Once loaded, the heap is
    frozen (`freeze_heap`), in the worker process that loaded it.
    """

    async def load(self) -> bool:
        loaded = await super().load()
        freeze_heap()
        return loaded

    async def invocations(self) -> None:  # type: ignore[override]
        raise NotImplementedError("/invocations is served by ml_serving.server.front")

    def decode_request(self, inference_request: InferenceRequest, default_codec: Any = None) -> Any:
        """MLServer's decode, with a model of named columns (PandasCodec's requests) decoded by `columns_frame`:
        the same DataFrame at a quarter of the cost."""
        if compat.content_type(inference_request, self) != PandasCodec.ContentType:
            return super().decode_request(inference_request, default_codec)
        for tensor in inference_request.inputs:  # each input by its own codec first, as MLServer does
            decode_request_input(tensor, compat.inputs_index(self))
        frame = columns_frame(inference_request)
        return PandasCodec.decode_request(inference_request) if frame is None else frame

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        decoded = self.decode_request(payload)
        params = payload.parameters.model_extra if payload.parameters and payload.parameters.model_extra else None
        signature = compat.signature(self)
        try:
            output = compat.pyfunc(self).predict(decoded, params=params)
        except INPUT_ERRORS as error:
            if signature is not None:
                raise  # the request matched the signature: a failure now is the model's
            raise MLServerError(f"the model refused the input: {error}", HTTPStatus.UNPROCESSABLE_ENTITY) from None
        except Exception as error:
            from mlflow.exceptions import MlflowException

            if signature is None and isinstance(error, MlflowException):
                message = f"the model refused the input: {error.message}"
                raise MLServerError(message, HTTPStatus.UNPROCESSABLE_ENTITY) from None
            raise
        response = self.encode_response(named_outputs(output, signature), default_codec=TensorDictCodec)
        kind = output_kind(output)
        if kind is not None:
            response.parameters = response.parameters or Parameters()
            setattr(response.parameters, OUTPUT_KIND, kind)
        return response
