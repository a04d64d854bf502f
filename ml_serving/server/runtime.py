"""The MLflow runtime as the serving image runs it."""

from __future__ import annotations

from mlserver_mlflow import MLflowRuntime


class ServingRuntime(MLflowRuntime):
    """MLServer's MLflow runtime, with `/invocations` served by the validation middleware instead.

    The stock handler runs outside adaptive batching and answers some bad input with 500; overriding it without
    the `custom_handler` decorator removes the route, and the middleware sends `/invocations` through V2.
    """

    async def invocations(self) -> None:  # type: ignore[override]
        raise NotImplementedError("/invocations is served by ml_serving.server.middleware")
