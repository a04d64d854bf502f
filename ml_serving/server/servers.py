"""One served model, assembled from MLServer's public parts behind the fronts, in the order replicas need.

MLServer's model registry, data plane, adaptive batching (`load_batching`) and metrics endpoint serve the model;
its REST app and gRPC servicers do not: the REST port runs the front (front.Front, its own route table) and the
gRPC port the gRPC front (grpc_front), so no request reaches the model unchecked. Start: the metrics port, then
the model, then the ports that take requests, so a replica accepts requests only for a model it has loaded and a
ready server is scraped. A model that fails to load stops the server, as MLServer's own start does (exit 1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import uvicorn

from ml_serving.server import mlserver_compat as compat
from ml_serving.server.batching import BatchGate, uvicorn_connections
from ml_serving.server.front import Front, RequestMetrics
from ml_serving.server.grpc_front import grpc_server

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)  # MLServer's
HEALTH_ROUTES = "/v2/health/live,/v2/health/ready"
GRPC_GRACE_SECONDS = 5  # MLServer's
logger = logging.getLogger("ml_serving.server")


class ModelLoadFailed(RuntimeError):
    """The model did not load: the server stopped without opening its request ports."""


class _Uvicorn(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the server's own handlers stop every port together
        pass


class FrontServer:
    """`model` (MLServer's ModelSettings) served on `settings`' ports; `http_fd`, a listening socket inherited
    from the entrypoint (replicas); `metrics_settings`, if this process serves the metrics port, the settings of
    the metrics shared by every replica (their multiprocess folder)."""

    def __init__(
        self,
        settings: Any,
        model: Any,
        inputs: Any,
        limits: Any,
        http_fd: int | None = None,
        metrics_settings: Any = None,
    ) -> None:
        from mlserver.batching import load_batching
        from mlserver.handlers import DataPlane
        from mlserver.logging import configure_logger
        from mlserver.registry import MultiModelRegistry

        configure_logger(settings)
        self.settings = settings
        self.model = model
        self.gate = BatchGate()
        self.registry = MultiModelRegistry(on_model_load=[load_batching, self._close_batches_early])
        self.data_plane = DataPlane(settings=settings, model_registry=self.registry)
        request_metrics = RequestMetrics(settings) if settings.metrics_endpoint else None
        version = model.parameters.version if model.parameters else None
        self.front = Front(model.name, version, inputs, limits, self.data_plane, request_metrics, self.gate)
        self.rest = _Uvicorn(uvicorn.Config(rest_app(self.front, settings), **_listen(settings, http_fd)))
        self.gate.connections = uvicorn_connections(self.rest)
        self.grpc = grpc_server(settings, self.front)
        self.metrics_settings = metrics_settings
        self.metrics = metrics_server(metrics_settings) if metrics_settings and settings.metrics_endpoint else None
        self._grpc_started = False
        self._stopping = False

    async def _close_batches_early(self, model: Any) -> Any:
        compat.close_batches_early(model, self.gate)
        return model

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(self.stop(s)))
        serving = []
        if self.metrics is not None:
            serving.append(asyncio.ensure_future(self.metrics.serve()))
            while not self.metrics.started and not serving[0].done():
                await asyncio.sleep(0.01)
        try:
            await self.registry.load(self.model)  # ServingRuntime.load freezes the heap once it is in
        except Exception as error:
            logger.exception("the model failed to load: stopping")
            await self.stop()
            await asyncio.gather(*serving)
            raise ModelLoadFailed(f"model '{self.model.name}' failed to load: {error}") from error
        if self._stopping:  # a signal while loading
            await asyncio.gather(*serving)
            return
        await self.grpc.start()
        self._grpc_started = True
        serving += [asyncio.ensure_future(self.rest.serve()), asyncio.ensure_future(self.grpc.wait_for_termination())]
        await asyncio.gather(*serving)

    async def stop(self, sig: int = signal.SIGINT) -> None:
        from mlserver.metrics.prometheus import stop_metrics

        self._stopping = True
        self.rest.handle_exit(sig, None)
        if self._grpc_started:
            await self.grpc.stop(grace=GRPC_GRACE_SECONDS)
        if self.metrics is not None:
            await stop_metrics(self.metrics_settings, os.getpid())
            self.metrics.handle_exit(sig, None)


def _listen(settings: Any, fd: int | None) -> dict[str, Any]:
    where: dict[str, Any] = {"fd": fd} if fd is not None else {"host": settings.host, "port": settings.http_port}
    config = {**where, "root_path": settings.root_path, "access_log": settings.debug, "lifespan": "off"}
    if settings.logging_settings:
        config["log_config"] = settings.logging_settings
    return config


def rest_app(front: Front, settings: Any) -> Any:
    """The front, wrapped in what MLServer's settings ask its REST app to add: gzip, CORS, tracing."""
    app: Any = front
    if settings.gzip_enabled:
        from starlette.middleware.gzip import GZipMiddleware

        app = GZipMiddleware(app)
    cors = settings.cors_settings
    if cors is not None:
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(
            app,
            allow_origins=cors.allow_origins,
            allow_origin_regex=cors.allow_origin_regex,
            allow_credentials=cors.allow_credentials,
            allow_methods=cors.allow_methods,
            allow_headers=cors.allow_headers,
            max_age=cors.max_age,
        )
    if settings.tracing_server:
        from mlserver.tracing import get_tracer_provider
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        app = OpenTelemetryMiddleware(app, excluded_urls=HEALTH_ROUTES, tracer_provider=get_tracer_provider(settings))
    return app


def metrics_server(settings: Any) -> uvicorn.Server:
    """MLServer's Prometheus endpoint (every process's metrics, summed from the multiprocess folder)."""
    from mlserver.metrics.prometheus import PrometheusEndpoint
    from starlette.applications import Starlette
    from starlette.routing import Route

    endpoint = PrometheusEndpoint(settings)
    app = Starlette(routes=[Route(settings.metrics_endpoint, endpoint.handle_metrics)])
    config = {"host": settings.host, "port": settings.metrics_port, "access_log": settings.debug, "lifespan": "off"}
    if settings.logging_settings:
        config["log_config"] = settings.logging_settings
    return _Uvicorn(uvicorn.Config(app, **config))
