"""A batch closes as soon as no request can join it (issue #15): every open REST connection has its request in
the data plane. Otherwise it waits for `max_batch_time` as MLServer's batcher always did."""

from __future__ import annotations

import asyncio

import mlflow
import numpy as np
import pytest
import requests
from mlserver import MLModel
from mlserver.batching.hooks import load_batching
from mlserver.context import model_context
from mlserver.settings import ModelSettings
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

from ml_serving.server.batching import BatchGate
from ml_serving.server.mlserver_compat import close_batches_early
from tests import processes

AN_HOUR = 3600.0  # a batch time no test waits for: a batch that closes did so by the gate


class Sizes(MLModel):
    """Answers every request of a batch with the batch's size."""

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = payload.inputs[0].shape[0]
        output = ResponseOutput(name="rows", shape=[rows, 1], datatype="INT64", data=[rows] * rows)
        return InferenceResponse(model_name=self.name, outputs=[output])


def one_row() -> InferenceRequest:
    return InferenceRequest.model_validate(
        {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1]}]}
    )


async def batched_model(gate: BatchGate) -> MLModel:
    model = await load_batching(
        Sizes(ModelSettings(name="m", implementation=Sizes, max_batch_size=64, max_batch_time=AN_HOUR))
    )
    assert close_batches_early(model, gate)
    return model


def test_a_batch_of_every_connections_request_closes_without_waiting():
    async def scenario() -> list[int]:
        gate = BatchGate(connections=lambda: 2)
        model = await batched_model(gate)
        batch = [one_row(), one_row()]
        gate.handed.update(id(request) for request in batch)  # what the validation layer does for REST requests
        with model_context(model.settings):  # as MLServer's data plane calls it
            answers = await asyncio.wait_for(asyncio.gather(*(model.predict(r) for r in batch)), timeout=60)
        return [answer.outputs[0].data.root[0] for answer in answers]

    assert asyncio.run(scenario()) == [2, 2]  # one batch of both, closed long before max_batch_time


def test_a_batch_closes_when_the_last_idle_connection_closes():
    """Nothing arrives, yet the batch can close: the gate is asked again while the batcher waits."""

    async def scenario() -> int:
        open_connections = [2]
        gate = BatchGate(connections=lambda: open_connections[0])
        model = await batched_model(gate)
        request = one_row()
        gate.handed.add(id(request))
        with model_context(model.settings):
            answer = asyncio.ensure_future(model.predict(request))
            await asyncio.sleep(0.05)
            assert not answer.done()  # the other connection may still send
            open_connections[0] = 1
            return (await asyncio.wait_for(answer, timeout=60)).outputs[0].data.root[0]

    assert asyncio.run(scenario()) == 1


@pytest.mark.parametrize(
    ("connections", "arriving", "rest", "closes"),
    [
        (2, 0, 2, True),  # every connection's request is in the batch
        (3, 0, 2, False),  # a connection without a request may send one
        (2, 1, 2, False),  # a request is on its way to the data plane
        (None, 0, 2, False),  # the server's connections are not known (not started)
        (0, 0, 0, False),  # gRPC requests: many on a connection, the count says nothing
        (1, 0, 1, False),  # a gRPC request next to a REST one
    ],
)
def test_the_gate_closes_only_when_no_request_can_join(connections, arriving, rest, closes):
    gate = BatchGate(connections=lambda: connections)
    batch = [one_row(), one_row()]
    gate.handed.update(id(request) for request in batch[:rest])
    gate.arriving = arriving
    assert gate.complete(batch) is closes


def test_a_model_without_batching_is_left_alone():
    model = Sizes(ModelSettings(name="m", implementation=Sizes, max_batch_size=1))
    assert not close_batches_early(model, BatchGate(connections=lambda: 1))


@pytest.mark.serving
def test_the_server_answers_a_lone_request_without_waiting_out_the_batch_time(tmp_path):
    """Served for real, with a batch time of an hour: the request is answered (the gate is wired: uvicorn's
    connections, the validation layer's counts, the loaded model's batcher), on both protocols' REST routes."""
    from sklearn.linear_model import LogisticRegression

    x = np.array([[0.1, 0.2], [1.0, -0.5], [-1.0, 2.0]])
    mlflow.sklearn.save_model(LogisticRegression().fit(x, [0, 1, 0]), tmp_path / "m", pip_requirements=["mlflow"],
                              signature=mlflow.models.infer_signature(x, np.array([0, 1, 0])))  # fmt: skip
    env = {"MLSERVER_MODEL_MAX_BATCH_TIME": str(AN_HOUR), "MLSERVER_PARALLEL_WORKERS": "0"}
    with processes.serving_servers({"m": str(tmp_path / "m")}, tmp_path, env=env) as ports:
        url = f"http://127.0.0.1:{ports['m']['http']}"
        body = {"inputs": [{"name": "input-0", "shape": [1, 2], "datatype": "FP64", "data": [0.1, 0.2]}]}
        answer = requests.post(f"{url}/v2/models/churn/infer", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == [0]
        assert requests.post(f"{url}/invocations", json={"inputs": [[0.1, 0.2]]}, timeout=60).json() == {
            "predictions": [0]
        }
