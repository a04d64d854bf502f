"""The validation layer in front of MLServer's app (ml_serving/server/middleware.py): the requests it answers skip
MLServer's FastAPI stack, so it records MLServer's REST request metrics for them itself; and the replicas'
listening sockets (ml_serving/server/replicas.py) spread connections over the replicas."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY
from starlette.routing import Route

from ml_serving.server import validation
from ml_serving.server.middleware import RequestMetrics, ValidationMiddleware, runs_in_front
from ml_serving.server.replicas import listen

PREFIX = "front_test"  # series of their own in this process's registry
PLAIN = {"gzip_enabled": False, "cors_settings": None, "tracing_server": None, "metrics_rest_server_prefix": PREFIX}


def settings(**changes) -> SimpleNamespace:
    return SimpleNamespace(**{**PLAIN, **changes})


async def _unused(*args):
    raise AssertionError("not called")


ROUTES = [Route("/v2/models/{model_name}/ready", _unused), Route("/v2/models/{model_name}/infer", _unused)]


def call(layer: ValidationMiddleware, method: str, path: str, scope: dict | None = None) -> tuple[int, list[str]]:
    """One request through the layer (in `scope`, if given, which it may mark): the status it answered, and the
    paths it passed on to MLServer's app."""
    passed, sent = [], []

    async def app(scope, receive, send):
        passed.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    layer.app = app
    scope = {} if scope is None else scope
    scope.update(type="http", method=method, path=path, headers=[(b"content-type", b"application/json")])
    asyncio.run(layer(scope, receive, send))
    return sent[0]["status"], passed


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"{PREFIX}_{name}", labels) or 0.0


def test_requests_answered_in_front_are_counted_under_mlserver_route_templates():
    metrics = RequestMetrics(settings())
    layer = ValidationMiddleware(_unused, "churn", None, None, validation.Limits(), None, metrics, ROUTES)
    refused = {"method": "GET", "path": "/v2/models/{model_name}/ready", "status_code": "404", "app_name": "mlserver"}
    before = sample("requests_total", **refused)

    assert call(layer, "GET", "/v2/models/other/ready") == (404, [])

    assert sample("requests_total", **refused) == before + 1
    assert sample("request_duration_seconds_count", **refused) == before + 1
    assert sample("requests_in_progress", method="GET", app_name="mlserver") == 0


def test_requests_for_the_served_model_that_are_not_inference_go_to_mlserver_uncounted_here():
    metrics = RequestMetrics(settings())
    layer = ValidationMiddleware(_unused, "churn", None, None, validation.Limits(), None, metrics, ROUTES)
    served = {"method": "GET", "path": "/v2/models/{model_name}/ready", "status_code": "200", "app_name": "mlserver"}

    assert call(layer, "GET", "/v2/models/churn/ready") == (200, ["/v2/models/churn/ready"])

    assert sample("requests_total", **served) == 0, "MLServer's own middleware counts what its app answers"


def test_inside_mlserver_app_the_layer_leaves_counting_to_mlserver():
    """With gzip, CORS or tracing, MLServer's app must see every request: the layer then runs inside it, records
    nothing itself, and marks what it answered so that MLServer's metrics middleware finds the route's template."""
    assert runs_in_front(settings())
    for changes in ({"gzip_enabled": True}, {"cors_settings": object()}, {"tracing_server": "otel:4317"}):
        assert not runs_in_front(settings(**changes))
    layer = ValidationMiddleware(_unused, "churn", None, None, validation.Limits(), None)
    router = SimpleNamespace(routes=ROUTES)
    scope = {"app": SimpleNamespace(router=router)}
    refused = {"method": "GET", "path": "/v2/models/{model_name}/ready", "status_code": "404", "app_name": "mlserver"}
    before = sample("requests_total", **refused)

    assert call(layer, "GET", "/v2/models/other/ready", scope) == (404, [])

    assert sample("requests_total", **refused) == before
    assert scope.get("router") is router and scope.get("endpoint") is not None


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
