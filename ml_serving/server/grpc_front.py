"""The gRPC front: the Open Inference Protocol's RPCs the front checks, and no others.

The servicers derive from the generated bases (`GRPCInferenceServiceServicer`, `ModelRepositoryServiceServicer`),
whose every RPC answers UNIMPLEMENTED until overridden here, not from MLServer's servicers: an RPC MLServer or
the protocol adds stays closed. `ModelInfer` goes through the same checks as REST (validation.check_v2) and the
same data plane call (front.Front.infer); the stream RPC is refused; the repository lists the one model and
refuses load and unload (PERMISSION_DENIED).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

import grpc
from grpc import aio
from mlserver.grpc import dataplane_pb2 as pb
from mlserver.grpc import model_repository_pb2 as mr_pb
from mlserver.grpc.converters import (
    ModelInferRequestConverter,
    ModelInferResponseConverter,
    ModelMetadataResponseConverter,
    ServerMetadataResponseConverter,
)
from mlserver.grpc.dataplane_pb2_grpc import GRPCInferenceServiceServicer, add_GRPCInferenceServiceServicer_to_server
from mlserver.grpc.model_repository_pb2_grpc import (
    ModelRepositoryServiceServicer,
    add_ModelRepositoryServiceServicer_to_server,
)
from mlserver.grpc.utils import to_headers, to_metadata
from mlserver.utils import extract_headers, insert_headers

from ml_serving.server import protocols
from ml_serving.server import validation as v
from ml_serving.server.front import Front, checked_request, refusals

# A refusal's HTTP status as a gRPC status (422, the request's content, is INVALID_ARGUMENT here: MLServer's own
# mapping says FAILED_PRECONDITION, which means a state of the server, not the request).
STATUS = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    HTTPStatus.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.UNPROCESSABLE_ENTITY: grpc.StatusCode.INVALID_ARGUMENT,
}
# The RPCs served here, by service: every other one answers UNIMPLEMENTED (tests/test_routes.py enumerates them).
SERVED = {
    "inference.GRPCInferenceService": frozenset(
        {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "RepositoryIndex"}
    )
    | {"RepositoryModelLoad", "RepositoryModelUnload"},  # refused: PERMISSION_DENIED
    "inference.model_repository.ModelRepositoryService": frozenset(
        {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}
    ),
}


async def _abort(front: Front, context: Any, error: v.RequestError) -> None:
    refusals().labels(model=front.model_name, reason=error.reason.value).inc()
    await context.abort(STATUS.get(error.status, grpc.StatusCode.INVALID_ARGUMENT), error.message)


def _model(front: Front, name: str, version: str) -> None:
    front.check_model({"model_name": name, **({"model_version": version} if version else {})})


class InferenceServicer(GRPCInferenceServiceServicer):
    def __init__(self, front: Front) -> None:
        self.front = front

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=await self.front.data_plane.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.front.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            _model(self.front, request.name, request.version)
        except v.RequestError as error:
            await _abort(self.front, context, error)
        return pb.ModelReadyResponse(ready=await self.front.is_ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return ServerMetadataResponseConverter.from_types(await self.front.data_plane.metadata())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            _model(self.front, request.name, request.version)
        except v.RequestError as error:
            await _abort(self.front, context, error)
        metadata = await self.front.data_plane.model_metadata(self.front.model_name, self.front.model_version)
        return ModelMetadataResponseConverter.from_types(metadata)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        front = self.front
        try:
            _model(front, request.model_name, request.model_version)
            if request.raw_input_contents:
                raise v.RequestError(
                    HTTPStatus.BAD_REQUEST,
                    v.Refusal.BAD_STRUCTURE,
                    "raw_input_contents are not read here: send each input's typed contents (e.g. int64_contents)",
                )
            payload = protocols.grpc_payload(ModelInferRequestConverter.to_types(request))
            checked = checked_request(v.check_v2(payload, front.inputs, front.limits))
            insert_headers(checked, to_headers(context))
            status, answer, _ = await front.run(checked, rest=False)
        except v.RequestError as error:
            await _abort(front, context, error)
        except ValueError as error:  # the protobuf's contents do not convert (e.g. raw contents of another size)
            await _abort(front, context, v.RequestError(HTTPStatus.BAD_REQUEST, v.Refusal.BAD_STRUCTURE, str(error)))
        if status != HTTPStatus.OK:
            await context.abort(grpc.StatusCode.INTERNAL, answer.get("error", "the model failed"))
        protocols.strip_output_kind(answer)
        response = _response(answer)
        headers = extract_headers(response)
        if headers:
            context.set_trailing_metadata(to_metadata(headers))
        return ModelInferResponseConverter.from_types(response, use_raw=bool(request.raw_input_contents))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(models=await _index(self.front, request, context, pb))

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await _read_only(self.front, context)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await _read_only(self.front, context)


class ModelRepositoryServicer(ModelRepositoryServiceServicer):
    """MLServer's deprecated repository service, as the one above."""

    def __init__(self, front: Front) -> None:
        self.front = front

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        return mr_pb.RepositoryIndexResponse(models=await _index(self.front, request, context, mr_pb))

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await _read_only(self.front, context)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await _read_only(self.front, context)


async def _read_only(front: Front, context: Any) -> None:
    message = f"loading and unloading models is disabled here: this server serves '{front.model_name}'"
    await _abort(front, context, v.RequestError(HTTPStatus.FORBIDDEN, v.Refusal.READ_ONLY, message))


async def _index(front: Front, request: Any, context: Any, module: Any) -> list[Any]:
    if request.repository_name:
        message = f"repository '{request.repository_name}' is not here: leave repository_name empty"
        await _abort(front, context, v.RequestError(HTTPStatus.NOT_FOUND, v.Refusal.UNKNOWN_MODEL, message))
    ready = await front.is_ready()
    if request.ready and not ready:
        return []
    entry = module.RepositoryIndexResponse.ModelIndex(
        name=front.model_name, version=front.model_version or "", state="READY" if ready else "UNAVAILABLE"
    )
    return [entry]


def _response(answer: dict[str, Any]) -> Any:
    from mlserver.types import InferenceResponse

    return InferenceResponse.model_validate(answer)


def grpc_server(settings: Any, front: Front) -> aio.Server:
    """A gRPC server on MLServer's port and settings (message size, metrics interceptor) with the servicers above.
    Replicas share the port: gRPC sets SO_REUSEPORT on Linux."""
    from mlserver.grpc.interceptors import LoggingInterceptor, PromServerInterceptor

    interceptors: list[Any] = [LoggingInterceptor()] if settings.debug else []
    if settings.metrics_endpoint:
        interceptors.append(PromServerInterceptor(enable_handling_time_histogram=True))
    if settings.tracing_server:
        from mlserver.tracing import get_tracer_provider
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptors.append(aio_server_interceptor(tracer_provider=get_tracer_provider(settings)))
    options = []
    if settings.grpc_max_message_length is not None:
        size = settings.grpc_max_message_length
        options = [
            ("grpc.max_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
        ]
    server = aio.server(ThreadPoolExecutor(max_workers=1), interceptors=interceptors, options=options)
    add_GRPCInferenceServiceServicer_to_server(InferenceServicer(front), server)
    add_ModelRepositoryServiceServicer_to_server(ModelRepositoryServicer(front), server)
    server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
    return server
