"""Readiness means "this model is loaded and can predict": what Kubernetes' probe needs to know."""

from __future__ import annotations

import asyncio

import pytest

from ml_serving.server import validation
from ml_serving.server.front import Front


class DataPlane:
    """MLServer's data plane as far as readiness goes: whether the registry holds the model, ready."""

    def __init__(self, ready: bool | None) -> None:
        self.ready = ready

    async def model_ready(self, name: str, version: str | None) -> bool:
        if self.ready is None:
            from mlserver.errors import ModelNotFound

            raise ModelNotFound(name, version)
        return self.ready


def probe(ready: bool | None) -> int:
    front = Front("churn", "7", None, validation.Limits(), DataPlane(ready))
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v2/health/ready", "method": "GET", "headers": []}
    asyncio.run(front(scope, None, send))
    return sent[0]["status"]


@pytest.mark.parametrize(
    ("ready", "status"), [(True, 200), (False, 503), (None, 503)], ids=["loaded", "loading", "gone"]
)
def test_readiness_follows_the_model(ready, status):
    assert probe(ready) == status
