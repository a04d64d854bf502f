"""The serving front (ml_serving/server/front.py, routes.py, grpc_front.py): it owns its routes, refuses every
other one, and records MLServer's REST request metrics itself; the replicas' listening sockets
(ml_serving/server/replicas.py) spread connections over the replicas."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from ml_serving.server import routes, validation
from ml_serving.server.front import Front, RequestMetrics
from ml_serving.server.grpc_front import SERVED
from ml_serving.server.replicas import listen

PREFIX = "front_test"  # series of their own in this process's registry
PLAIN = {"metrics_rest_server_prefix": PREFIX}


def settings(**changes) -> SimpleNamespace:
    return SimpleNamespace(**{**PLAIN, **changes})


def call(layer: Front, method: str, path: str, body: bytes = b"{}") -> tuple[int, dict]:
    """One request through the front: the status it answered and its headers."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": method, "path": path, "headers": headers if body else []}
    asyncio.run(layer(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"])


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"{PREFIX}_{name}", labels) or 0.0


def test_requests_answered_in_front_are_counted_under_mlserver_route_templates():
    metrics = RequestMetrics(settings())
    layer = Front("churn", None, None, validation.Limits(), None, metrics)
    refused = {"method": "GET", "path": "/v2/models/{model_name}/ready", "status_code": "404", "app_name": "mlserver"}
    before = sample("requests_total", **refused)

    assert call(layer, "GET", "/v2/models/other/ready", b"")[0] == 404

    assert sample("requests_total", **refused) == before + 1
    assert sample("request_duration_seconds_count", **refused) == before + 1
    assert sample("requests_in_progress", method="GET", app_name="mlserver") == 0


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v2/models/churn/generate", 404),
        ("POST", "/v2/models/churn/versions/7/generate", 404),
        ("POST", "/v2/models/churn/infer_stream", 404),
        ("POST", "/v2/models/churn/generate_stream", 404),
        ("GET", "/v2/docs", 404),
        ("GET", "/v2/models/churn/docs/dataplane.json", 404),
        ("GET", "/v2/models/churn/infer", 405),
        ("PUT", "/invocations", 405),
        ("DELETE", "/v2/models/churn", 405),
        ("POST", "/nowhere", 404),
        ("GET", "/v2/models/churn", 400),  # a body on a route that reads none
    ],
)
def test_paths_and_methods_outside_the_route_table_are_refused_by_the_front(method, path, status):
    """Nothing reaches MLServer: there is no app behind the front (its data plane is None here)."""
    layer = Front("churn", "7", None, validation.Limits(), None)
    answered, headers = call(layer, method, path)
    assert answered == status
    if status == 405:
        assert headers[b"allow"] in (b"GET, HEAD", b"POST"), "405 says which methods the path takes"


# MLServer 1.7.1's routes the front does not serve, each with why. A route MLServer adds is in neither list, and
# the test below fails until someone decides (and the live test in test_serving.py sends it bad input).
NOT_SERVED = {
    "/v2/models/{model_name}/generate": "LLM text generation: refused, not routed as infer",
    "/v2/models/{model_name}/versions/{model_version}/generate": "as above",
    "/v2/models/{model_name}/infer_stream": "server-sent events: the data plane's stream is not checked",
    "/v2/models/{model_name}/versions/{model_version}/infer_stream": "as above",
    "/v2/models/{model_name}/generate_stream": "as above",
    "/v2/models/{model_name}/versions/{model_version}/generate_stream": "as above",
    "/v2/models/{model_name}/docs": "Swagger UI (loads scripts from a CDN)",
    "/v2/models/{model_name}/versions/{model_version}/docs": "as above",
    "/v2/models/{model_name}/docs/dataplane.json": "the OpenAPI document of the above",
    "/v2/models/{model_name}/versions/{model_version}/docs/dataplane.json": "as above",
    "/v2/docs": "as above",
    "/v2/docs/dataplane.json": "as above",
}
NOT_SERVED_RPCS = {"ModelStreamInfer"}  # answered UNIMPLEMENTED


def mlserver_routes() -> set[tuple[str, str]]:
    """(template, method) of every REST route MLServer 1.7.1 registers: its app's table, built as MLServer builds
    it, plus the MLflow runtime's custom handlers."""
    from mlserver.handlers import get_custom_handlers
    from mlserver.rest.app import create_app
    from mlserver.settings import ModelSettings, Settings
    from mlserver_mlflow import MLflowRuntime

    app = create_app(Settings(), data_plane=None, model_repository_handlers=None)
    table = {(r.path, m) for r in app.routes if hasattr(r, "methods") and r.path.startswith("/v2") for m in r.methods}
    runtime = MLflowRuntime(ModelSettings(name="m", implementation=MLflowRuntime))
    table |= {(h.rest_path, h.rest_method) for h, _ in get_custom_handlers(runtime)}
    return table


def test_every_mlserver_route_is_served_by_the_front_or_refused_on_purpose():
    served = {(r.template, m) for r in routes.ROUTES for m in r.methods if m != "HEAD"}
    for template, method in mlserver_routes():
        assert (template, method) in served or template in NOT_SERVED, f"{method} {template}: serve or refuse it"
    assert {t for t, _ in served} - {t for t, _ in mlserver_routes()} == set(), "the front serves MLServer's paths"


def test_every_grpc_rpc_is_served_by_the_front_or_refused_on_purpose():
    from mlserver.grpc import dataplane_pb2, model_repository_pb2

    for module in (dataplane_pb2, model_repository_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for rpc in service.methods:
                assert rpc.name in SERVED.get(service.full_name, ()) or rpc.name in NOT_SERVED_RPCS, rpc.full_name


def test_replicas_listen_on_one_port_and_the_kernel_spreads_connections_over_them():
    listeners = listen("127.0.0.1", 0, 1)
    port = listeners[0].getsockname()[1]
    listeners += listen("127.0.0.1", port, 1)
    try:
        assert {s.getsockname()[1] for s in listeners} == {port}
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in listeners)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        accepted = []
        for listener in listeners:
            listener.setblocking(False)
            count = 0
            while True:
                try:
                    listener.accept()[0].close()
                except BlockingIOError:
                    break
                count += 1
            accepted.append(count)
        for client in clients:
            client.close()
        assert sum(accepted) == 40
        assert min(accepted) > 0, f"every replica's socket gets connections ({accepted}); one in 2^39 runs fails"
    finally:
        for listener in listeners:
            listener.close()


def test_a_port_taken_by_another_program_is_refused():
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError):
            listen("127.0.0.1", taken.getsockname()[1], 2)
    finally:
        taken.close()
