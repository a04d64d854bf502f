"""End to end: a real MLflow server, a real model resolved by alias, served by `ml-serving serve` on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from pathlib import Path

import grpc
import hypothesis.strategies as st
import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings

from tests import processes

pytestmark = pytest.mark.serving

CLI = shutil.which("ml-serving") or str(Path(sys.executable).parent / "ml-serving")
ROWS = [
    {"tenure_months": 3, "monthly_charges": 99.5, "support_calls": 4, "plan": "basic", "region": "north"},
    {"tenure_months": 60, "monthly_charges": 20.0, "support_calls": 0, "plan": "premium", "region": "west"},
    {"tenure_months": 24, "monthly_charges": 65.25, "support_calls": 2, "plan": "standard", "region": "east"},
]
COLUMNS = list(ROWS[0])
V2_TYPES = {
    "tenure_months": "INT64",
    "monthly_charges": "FP64",
    "support_calls": "INT64",
    "plan": "BYTES",
    "region": "BYTES",
}


class Server:
    def __init__(self, http: int, grpc_port: int, metrics: int, ready_after: float, expected: list[int],
                 version: str = "", workdir: Path | None = None, registry: str = "") -> None:  # fmt: skip
        self.version, self.workdir, self.registry = version, workdir, registry
        self.url = f"http://127.0.0.1:{http}"
        self.grpc = f"127.0.0.1:{grpc_port}"
        self.metrics = f"http://127.0.0.1:{metrics}/metrics"
        self.ready_after = ready_after
        self.expected = expected

    def post(self, path: str, body: bytes | str | dict, content_type: str | None = "application/json"):
        headers = {"Content-Type": content_type} if content_type else {}
        if isinstance(body, dict):
            return requests.post(self.url + path, json=body, timeout=30)
        return requests.post(self.url + path, data=body, headers=headers, timeout=30)


def v2_body(rows=ROWS):
    return {
        "inputs": [
            {"name": c, "datatype": V2_TYPES[c], "shape": [len(rows), 1], "data": [r[c] for r in rows]} for c in COLUMNS
        ]
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mlflow.pyfunc import load_model

    from ml_serving.seed import register_churn_model

    workdir = tmp_path_factory.mktemp("serving")
    with processes.mlflow_server(f"sqlite:///{workdir / 'mlflow.db'}", workdir) as registry_url:
        version = register_churn_model(registry_url, aliases=("champion",))
        import pandas as pd

        model = load_model(f"models:/churn-classifier/{version}")
        expected = [int(p) for p in model.predict(pd.DataFrame(ROWS))]
        assert len(set(expected)) == 2, "the rows should get both classes, or the test proves little"
        http, grpc_port, metrics = processes.free_port(), processes.free_port(), processes.free_port()
        command = [
            CLI, "serve", "models:/churn-classifier@champion", "--tracking-uri", registry_url,
            "--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics),
        ]  # fmt: skip
        log = workdir / "serve.log"
        env = {"ML_SERVING_BODY_TIMEOUT_SECONDS": "2", "TMPDIR": str(workdir)}
        with processes.running(command, log, env=env) as process:
            ready_after = processes.wait_for(f"http://127.0.0.1:{http}/v2/health/ready", process, log, seconds=180)
            yield Server(http, grpc_port, metrics, ready_after, expected, str(version), workdir, registry_url)


def test_readiness_goes_ready(server):
    assert server.ready_after > 0
    assert requests.get(server.url + "/v2/health/live", timeout=5).status_code == 200
    assert requests.get(server.url + "/v2/models/churn-classifier/ready", timeout=5).status_code == 200
    assert requests.get(server.url + "/ping", timeout=5).status_code == 200


def test_v2_rest_predicts_like_the_model(server):
    response = server.post("/v2/models/churn-classifier/infer", v2_body())
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert list(np.asarray(output["data"]).ravel()) == server.expected


def test_cloudevents_headers_go_out_as_http_headers_as_mlserver_sends_them(server):
    """Seldon's request logger reads the `Ce-*` headers; MLServer's REST route moves them out of the answer's body."""
    response = server.post("/v2/models/churn-classifier/infer", v2_body())
    answer = response.json()
    assert "headers" not in answer.get("parameters", {})
    assert response.headers["Ce-Id"] == response.headers["Ce-Requestid"] == answer["id"]
    assert response.headers["Ce-Type"] == "io.seldon.serving.inference.response"
    assert response.headers["Ce-Modelid"] == "churn-classifier"
    invocations = server.post("/invocations", {"dataframe_records": ROWS})
    assert invocations.json() == {"predictions": server.expected}
    assert invocations.headers["Ce-Type"] == "io.seldon.serving.inference.response"


@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_records": ROWS},
        {"dataframe_split": {"columns": COLUMNS, "data": [[r[c] for c in COLUMNS] for r in ROWS]}},
        {"instances": ROWS},
        {"inputs": {c: [r[c] for r in ROWS] for c in COLUMNS}},
    ],
    ids=["dataframe_records", "dataframe_split", "instances", "inputs"],
)
def test_invocations_predicts_like_the_model(server, payload):
    response = server.post("/invocations", payload)
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": server.expected}


def test_v2_grpc_predicts_like_the_model(server):
    from mlserver.grpc import dataplane_pb2_grpc
    from mlserver.grpc.converters import ModelInferRequestConverter
    from mlserver.types import InferenceRequest

    body = v2_body()
    for tensor in body["inputs"]:
        if tensor["datatype"] == "BYTES":  # gRPC carries bytes; the content type says they are text
            tensor["data"] = [value.encode() for value in tensor["data"]]
            tensor["parameters"] = {"content_type": "str"}
    request = InferenceRequest.model_validate(body)
    with grpc.insecure_channel(server.grpc) as channel:
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)
        proto = ModelInferRequestConverter.from_types(request, model_name="churn-classifier", model_version=None)
        response = stub.ModelInfer(proto, timeout=30)
    assert list(response.outputs[0].contents.int64_contents) == server.expected


def scrape(server) -> dict[str, float]:
    values = {}
    for line in requests.get(server.metrics, timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def total(values: dict[str, float], prefix: str, *needles: str) -> float:
    return sum(v for k, v in values.items() if k.startswith(prefix) and all(n in k for n in needles))


def test_request_counters_and_latency_histograms_rise(server):
    """Counted once each, under MLServer's route templates: the validation layer answers these in front of
    MLServer's app and records MLServer's request metrics itself."""
    before = scrape(server)
    for _ in range(5):
        assert server.post("/v2/models/churn-classifier/infer", v2_body()).status_code == 200
        assert server.post("/invocations", {"dataframe_records": ROWS}).status_code == 200
    assert server.post("/v2/models/no-such-model/infer", v2_body()).status_code == 404
    after = scrape(server)
    v2_path, invocations = 'path="/v2/models/{model_name}/infer"', 'path="/invocations"'
    for needles, expected in (((v2_path, 'status_code="200"'), 5), ((invocations,), 5), ((v2_path, '"404"'), 1)):
        counted = total(after, "rest_server_requests_total", *needles) - total(
            before, "rest_server_requests_total", *needles
        )
        assert counted == expected, needles
        timed = total(after, "rest_server_request_duration_seconds_count", *needles) - total(
            before, "rest_server_request_duration_seconds_count", *needles
        )
        assert timed == expected, needles
    assert total(after, "rest_server_requests_in_progress") == 0
    inferred = total(after, "model_infer_request_success_total") - total(before, "model_infer_request_success_total")
    assert inferred == 10, "/invocations goes through the V2 path, so it counts as inference too"


GOOD = ROWS[0]
# (id, path kind, body, content type, expected status, words the message must contain)
BAD = [
    ("malformed-json", b'{"dataframe_records": [', "application/json", 400, "malformed JSON"),
    ("not-utf8", b'{"dataframe_records": [{"plan": "\xff\xfe"}]}', "application/json", 400, "not UTF-8"),
    ("empty-body", b"", "application/json", 400, "empty body"),
    ("wrong-content-type", b"tenure_months,plan\n3,basic", "text/csv", 415, "text/csv"),
    ("latin1-charset", b"{}", "application/json; charset=latin-1", 415, "charset"),
    ("excessive-nesting", b'{"dataframe_records": ' + b"[" * 64 + b"]" * 64 + b"}", "application/json", 400, "nested"),
    ("oversized-body", b'{"dataframe_records": [' + b" " * 1_100_000 + b"]}", "application/json", 413, "limit"),
    ("unknown-field", {"dataframe_recrods": [GOOD]}, None, 400, "dataframe_recrods"),
    ("missing-column", {"dataframe_records": [{k: v for k, v in GOOD.items() if k != "plan"}]}, None, 422, "'plan'"),
    ("unknown-column", {"dataframe_records": [{**GOOD, "colour": "red"}]}, None, 422, "colour"),
    ("wrong-type", {"dataframe_records": [{**GOOD, "tenure_months": "three"}]}, None, 422, "'tenure_months' expects"),
    ("null-value", {"dataframe_records": [{**GOOD, "region": None}]}, None, 422, "'region' may not be null"),
    ("fractional-integer", {"dataframe_records": [{**GOOD, "support_calls": 1.5}]}, None, 422, "'support_calls'"),
    ("nested-value", {"dataframe_records": [{**GOOD, "plan": {"a": 1}}]}, None, 422, "'plan' expects a string"),
    ("no-rows", {"dataframe_records": []}, None, 422, "no rows"),
    ("rows-not-objects", {"dataframe_records": [[1, 2]]}, None, 422, "expected a row object"),
    (
        "ragged-split",
        {"dataframe_split": {"columns": COLUMNS, "data": [[3, 99.5, 4, "basic"]]}},
        None,
        422,
        "ragged row: 4 values for 5 columns",
    ),
    ("not-an-object", b'[{"plan": "basic"}]', "application/json", 400, "JSON object"),
]
BAD_V2 = [
    ("v2-malformed-json", b'{"inputs": [', "application/json", 400, "malformed JSON"),
    ("v2-not-utf8", b'{"inputs": "\xff"}', "application/json", 400, "not UTF-8"),
    ("v2-empty-body", b"", "application/json", 400, "empty body"),
    ("v2-wrong-content-type", b"<xml/>", "application/xml", 415, "application/xml"),
    ("v2-excessive-nesting", b'{"inputs": ' + b"[" * 64 + b"]" * 64 + b"}", "application/json", 400, "nested"),
    ("v2-oversized-body", b'{"inputs": [' + b" " * 1_100_000 + b"]}", "application/json", 413, "limit"),
    ("v2-no-inputs", {"id": "1"}, None, 422, "inputs"),
    ("v2-unknown-field", {**v2_body(), "input": []}, None, 400, "input"),
    (
        "v2-unknown-request-content-type",
        {**v2_body(), "parameters": {"content_type": "nope"}},
        None,
        422,
        "parameters.content_type: 'nope' is not decoded here; use pd",
    ),
    (
        "v2-unknown-input-content-type",
        {"inputs": [{**v2_body()["inputs"][0], "parameters": {"content_type": "nope"}}, *v2_body()["inputs"][1:]]},
        None,
        422,
        "inputs[0] ('tenure_months').parameters.content_type: 'nope'",
    ),
    (
        "v2-text-content-type-on-numbers",
        {"inputs": [{**v2_body()["inputs"][0], "parameters": {"content_type": "str"}}, *v2_body()["inputs"][1:]]},
        None,
        422,
        "use np",
    ),
    (
        "v2-parameters-not-an-object",
        {"inputs": [{**v2_body()["inputs"][0], "parameters": ["x"]}, *v2_body()["inputs"][1:]]},
        None,
        422,
        "parameters: expected an object",
    ),
    ("v2-missing-column", {"inputs": v2_body()["inputs"][:4]}, None, 422, "missing column(s) region"),
    (
        "v2-unknown-input",
        {"inputs": [*v2_body()["inputs"], {"name": "colour", "datatype": "BYTES", "shape": [3, 1], "data": ["a"] * 3}]},
        None,
        422,
        "colour",
    ),
    (
        "v2-wrong-datatype",
        {"inputs": [{**v2_body()["inputs"][0], "datatype": "BYTES"}, *v2_body()["inputs"][1:]]},
        None,
        422,
        "does not fit column 'tenure_months'",
    ),
    (
        "v2-wrong-value-type",
        {"inputs": [{**v2_body()["inputs"][0], "data": ["a", "b", "c"]}, *v2_body()["inputs"][1:]]},
        None,
        422,
        "'tenure_months' expects an integer",
    ),
    (
        "v2-null",
        {"inputs": [*v2_body()["inputs"][:4], {**v2_body()["inputs"][4], "data": ["n", None, "e"]}]},
        None,
        422,
        "'region' may not be null",
    ),
    (
        "v2-shape-mismatch",
        {"inputs": [{**v2_body()["inputs"][0], "shape": [4, 1]}, *v2_body()["inputs"][1:]]},
        None,
        422,
        "shape [4, 1] needs 4 values, got 3",
    ),
    (
        "v2-ragged-batch",
        {"inputs": [v2_body(ROWS[:2])["inputs"][0], *v2_body()["inputs"][1:]]},
        None,
        422,
        "ragged batch",
    ),
    (
        "v2-bad-datatype",
        {"inputs": [{**v2_body()["inputs"][0], "datatype": "INT128"}, *v2_body()["inputs"][1:]]},
        None,
        422,
        "INT128",
    ),
]


def _send(server, path, body, content_type):
    if isinstance(body, bytes):
        return server.post(path, body, content_type)
    return server.post(path, body)


@pytest.mark.parametrize(("body", "content_type", "status", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_invocations_get_a_4xx_that_says_why(server, body, content_type, status, words):
    response = _send(server, "/invocations", body, content_type)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"), [b[1:] for b in BAD_V2], ids=[b[0] for b in BAD_V2]
)
def test_bad_v2_requests_get_a_4xx_that_says_why(server, body, content_type, status, words):
    response = _send(server, "/v2/models/churn-classifier/infer", body, content_type)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_unknown_model_name_is_404_and_adds_no_metric_series(server):
    response = server.post("/v2/models/no-such-model/infer", v2_body())
    assert response.status_code == 404
    assert "'no-such-model' is not served here" in response.json()["error"]
    assert "no-such-model" not in requests.get(server.metrics, timeout=5).text


def test_wrong_method_on_invocations(server):
    answer = requests.get(server.url + "/invocations", timeout=5)
    assert answer.status_code == 405 and answer.headers["Allow"] == "POST"


def test_slow_client_gets_408(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"dataframe_records"'
        )
        started = time.monotonic()
        answer = sock.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408"), answer
    assert "did not arrive within 2 s" in answer
    assert time.monotonic() - started < 10


V2_ROUTES = [
    "/v2/models/churn-classifier/{kind}",
    "/v2/models/churn-classifier/versions/{version}/{kind}",
]
V2_KINDS = ["infer", "generate", "infer_stream", "generate_stream"]  # MLServer 1.7.1's inference routes


def test_still_ready_and_right_after_all_the_bad_input(server):
    """The bad-input tables on every inference route MLServer has, not only `infer`: each answered 4xx."""
    for name, body, content_type, _status, _words in BAD + BAD_V2:
        if not name.startswith("v2-"):
            assert 400 <= _send(server, "/invocations", body, content_type).status_code < 500, name
            continue
        for route in V2_ROUTES:
            for kind in V2_KINDS:
                path = route.format(kind=kind, version=server.version)
                assert 400 <= _send(server, path, body, content_type).status_code < 500, (name, path)
    assert requests.get(server.url + "/v2/health/ready", timeout=5).status_code == 200
    assert server.post("/invocations", {"dataframe_records": ROWS}).json() == {"predictions": server.expected}
    errors = total(scrape(server), "rest_server_requests_total", 'status_code="5')
    assert errors == 0, "a client's mistake must never be counted as a server error"


def test_answers_as_the_registry_version_on_every_route(server):
    answer = server.post("/v2/models/churn-classifier/infer", v2_body()).json()
    assert answer["model_version"] == server.version, "the registry's version, not Seldon's 'v1'"
    versioned = server.post(f"/v2/models/churn-classifier/versions/{server.version}/infer", v2_body())
    assert versioned.status_code == 200 and versioned.json()["model_version"] == server.version
    assert server.post("/v2/models/churn-classifier/versions/999/infer", v2_body()).status_code == 404
    index = requests.post(server.url + "/v2/repository/index", json={}, timeout=10).json()
    assert [(m["name"], m.get("version"), m.get("state")) for m in index] == [
        ("churn-classifier", server.version, "READY")
    ]


# A BYTES value for an INT64 column: the bad input of issue 23, which MLServer's generate route answered 500 and
# its stream routes 200.
BAD_BODY = {
    "inputs": [{**v2_body()["inputs"][0], "datatype": "BYTES", "data": ["a", "b", "c"]}, *v2_body()["inputs"][1:]]
}


def test_bad_input_to_every_route_mlserver_registers_is_refused(server):
    """Every (path, method) of MLServer's own route table (tests/test_front.py builds it as MLServer does), and
    every other method on those paths, with the served model's name and version: a 4xx, never a 2xx or 5xx."""
    from tests.test_front import mlserver_routes

    templates = {template for template, _ in mlserver_routes()}
    assert len(templates) > 20, "MLServer's table was read"
    for template in sorted(templates):
        path = template.replace("{model_name}", "churn-classifier").replace("{model_version}", server.version)
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            answer = requests.request(method, server.url + path, json=BAD_BODY, timeout=30)
            assert 400 <= answer.status_code < 500, f"{method} {path} -> {answer.status_code} {answer.text[:200]}"
            assert "error" in answer.json(), f"{method} {path}: a refusal says why"
    assert requests.get(server.url + "/v2/health/ready", timeout=5).status_code == 200


# A bad request per gRPC request type; an RPC whose request type is missing here fails the test until added.
def _bad_grpc_requests():
    from mlserver.grpc import dataplane_pb2 as pb
    from mlserver.grpc import model_repository_pb2 as mr_pb
    from mlserver.grpc.converters import ModelInferRequestConverter
    from mlserver.types import InferenceRequest

    body = json.loads(json.dumps(BAD_BODY))
    for tensor in body["inputs"]:
        if tensor["datatype"] == "BYTES":
            tensor["data"] = [value.encode() for value in tensor["data"]]
    infer = ModelInferRequestConverter.from_types(InferenceRequest.model_validate(body), "churn-classifier", None)
    return {
        "inference.ModelInferRequest": infer,
        "inference.ModelReadyRequest": pb.ModelReadyRequest(name="no-such-model"),
        "inference.ModelMetadataRequest": pb.ModelMetadataRequest(name="no-such-model"),
        "inference.RepositoryIndexRequest": pb.RepositoryIndexRequest(repository_name="nowhere"),
        "inference.RepositoryModelLoadRequest": pb.RepositoryModelLoadRequest(model_name="churn-classifier"),
        "inference.RepositoryModelUnloadRequest": pb.RepositoryModelUnloadRequest(model_name="churn-classifier"),
        "inference.model_repository.RepositoryIndexRequest": mr_pb.RepositoryIndexRequest(repository_name="nowhere"),
        "inference.model_repository.RepositoryModelLoadRequest": mr_pb.RepositoryModelLoadRequest(model_name="x"),
        "inference.model_repository.RepositoryModelUnloadRequest": mr_pb.RepositoryModelUnloadRequest(model_name="x"),
    }


def test_bad_input_to_every_grpc_rpc_is_refused(server):
    """Every RPC of MLServer's gRPC services, read from their descriptors: a bad request is refused with a
    status; only the RPCs that take no input at all (ServerLive, ServerReady, ServerMetadata) answer OK."""
    from google.protobuf import message_factory
    from mlserver.grpc import dataplane_pb2, model_repository_pb2

    bad = _bad_grpc_requests()
    with grpc.insecure_channel(server.grpc) as channel:
        for module in (dataplane_pb2, model_repository_pb2):
            for service in module.DESCRIPTOR.services_by_name.values():
                for rpc in service.methods:
                    output = message_factory.GetMessageClass(rpc.output_type)
                    path = f"/{service.full_name}/{rpc.name}"
                    if not rpc.input_type.fields:
                        request = message_factory.GetMessageClass(rpc.input_type)()
                        channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                            response_deserializer=output.FromString)(request, timeout=30)  # fmt: skip
                        continue
                    request = bad[rpc.input_type.full_name]
                    serialize = type(request).SerializeToString
                    with pytest.raises(grpc.RpcError) as refused:
                        if rpc.client_streaming or rpc.server_streaming:
                            call = channel.stream_stream(path, request_serializer=serialize,
                                                         response_deserializer=output.FromString)  # fmt: skip
                            list(call(iter([request]), timeout=30))
                        else:
                            call = channel.unary_unary(path, request_serializer=serialize,
                                                       response_deserializer=output.FromString)  # fmt: skip
                            call(request, timeout=30)
                    assert refused.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), path
    assert requests.get(server.url + "/v2/health/ready", timeout=5).status_code == 200


def test_nobody_can_unload_the_model_over_rest_or_grpc(server):
    from mlserver.grpc import model_repository_pb2, model_repository_pb2_grpc

    for action in ("unload", "load"):
        answer = requests.post(f"{server.url}/v2/repository/models/churn-classifier/{action}", timeout=10)
        assert answer.status_code == 403 and "disabled" in answer.text, answer.text
    with grpc.insecure_channel(server.grpc) as channel:
        stub = model_repository_pb2_grpc.ModelRepositoryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RepositoryModelUnload(model_repository_pb2.RepositoryModelUnloadRequest(model_name="churn-classifier"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert requests.get(server.url + "/v2/health/ready", timeout=5).status_code == 200
    assert server.post("/invocations", {"dataframe_records": ROWS}).json() == {"predictions": server.expected}


def test_two_servers_started_together_serve_their_own_models_and_metrics(server, tmp_path):
    """Two `ml-serving serve` at the same moment: own download folder, own metrics (even in a folder that held
    another server's files), then SIGTERM to the printed PID stops each whole tree and frees its ports."""
    import os
    import signal
    import subprocess

    import pandas as pd
    from mlflow.pyfunc import load_model

    from ml_serving.seed import register_churn_model

    uri = server.registry
    other = register_churn_model(uri, name="churn-other", random_state=7)
    stale = tmp_path / "stale-metrics"
    shutil.copytree(next(server.workdir.glob("ml-serving-metrics-*")), stale)  # the module server's counters
    assert list(stale.glob("*.db")), "the copied folder holds another server's metric files"
    models = {
        "churn-classifier": f"models:/churn-classifier/{server.version}",
        "churn-other": f"models:/churn-other/{other}",
    }
    ports = {name: [processes.free_port() for _ in range(3)] for name in models}
    started = {}
    for name, model in models.items():
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        if name == "churn-other":
            env["MLSERVER_METRICS_DIR"] = str(stale)
        command = [CLI, "serve", model, "--tracking-uri", uri, "--http-port", str(ports[name][0]),
                   "--grpc-port", str(ports[name][1]), "--metrics-port", str(ports[name][2])]  # fmt: skip
        started[name] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         start_new_session=True, text=True)  # fmt: skip
    try:
        for name, process in started.items():
            processes.wait_for(f"http://127.0.0.1:{ports[name][0]}/v2/health/ready", process, tmp_path / "x", 180)
        sent = {"churn-classifier": 3, "churn-other": 5}
        for name, count in sent.items():
            own = load_model(models[name]).predict(pd.DataFrame(ROWS))
            for _ in range(count):
                answer = requests.post(f"http://127.0.0.1:{ports[name][0]}/v2/models/{name}/infer", json=v2_body(),
                                       timeout=30).json()  # fmt: skip
                assert answer["model_name"] == name and list(np.ravel(answer["outputs"][0]["data"])) == list(own)
        for name, count in sent.items():
            text = requests.get(f"http://127.0.0.1:{ports[name][2]}/metrics", timeout=5).text
            counted = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                          if line.startswith("rest_server_requests_total{") and "/infer" in line)  # fmt: skip
            assert counted == count, f"{name} counts only its own requests (from zero, whatever its folder held)"
        for name, process in started.items():
            children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
            assert children, "the server's workers run as its children (serve exec'd the server: same PID)"
            os.kill(process.pid, signal.SIGTERM)
            assert process.wait(timeout=60) is not None
            deadline = time.monotonic() + 30
            while any(_alive(int(child)) for child in children) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not any(_alive(int(child)) for child in children), "no worker left behind"
            for port in ports[name]:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))  # free again
    finally:
        for process in started.values():
            if process.poll() is None:
                os.killpg(process.pid, 9)


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited
        return stat.read().split()[2] != "Z"


def test_a_port_in_use_is_a_one_line_error_before_anything_loads(server):
    import subprocess

    busy = int(server.url.rsplit(":", 1)[1])
    run = subprocess.run([CLI, "serve", "models:/churn-classifier/1", "--tracking-uri", "sqlite:///nowhere.db",
                          "--http-port", str(busy)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 2
    assert f"port {busy} on 127.0.0.1 is in use" in run.stderr and "--http-port" in run.stderr
    assert "Traceback" not in run.stderr


def test_content_types_the_runtime_decodes_are_accepted(server):
    body = v2_body()
    body["parameters"] = {"content_type": "pd"}
    for tensor in body["inputs"]:
        tensor["parameters"] = {"content_type": "str" if tensor["datatype"] == "BYTES" else "np"}
    answer = server.post("/v2/models/churn-classifier/infer", body)
    assert answer.status_code == 200, answer.text
    assert list(np.ravel(answer.json()["outputs"][0]["data"])) == server.expected


def test_no_5xx_for_bad_input_with_the_cpu_saturated(server, tmp_path):
    """A client's mistake is a 4xx also when every core is busy (stress-ng on all CPUs meanwhile)."""
    stress = shutil.which("stress-ng")
    if stress is None:
        pytest.skip("stress-ng not installed (apt-get install stress-ng)")
    with processes.running([stress, "--cpu", "0", "--timeout", "300s"], tmp_path / "stress.log"):
        statuses = []
        for name, body, content_type, _status, _words in BAD + BAD_V2:
            path = "/v2/models/churn-classifier/infer" if name.startswith("v2-") else "/invocations"
            statuses.append(_send(server, path, body, content_type).status_code)
        assert requests.get(server.url + "/v2/health/ready", timeout=30).status_code == 200
        assert server.post("/invocations", {"dataframe_records": ROWS}).json() == {"predictions": server.expected}
    assert statuses and max(statuses) < 500, statuses


def test_refusals_are_counted_by_the_check_that_refused_them(server):
    """Each refusal is counted under its check's name (a bounded label), also a refused unload."""
    sent = {
        "wrong_type": ("/invocations", {"dataframe_records": [{**ROWS[0], "tenure_months": "three"}]}),
        "missing_column": ("/invocations", {"dataframe_records": [{"plan": "basic"}]}),
        "malformed_body": ("/v2/models/churn-classifier/infer", b'{"inputs": ['),
        "unknown_model": ("/v2/models/no-such-model/infer", v2_body()),
        "read_only": ("/v2/repository/models/churn-classifier/unload", b""),
    }
    counter = 'ml_serving_request_refusals_total{model="churn-classifier",reason="%s"}'
    before = scrape(server)
    for reason, (path, body) in sent.items():
        for _ in range(2 if reason == "wrong_type" else 1):
            assert 400 <= _send(server, path, body, "application/json").status_code < 500
    after = scrape(server)
    for reason in sent:
        rise = after.get(counter % reason, 0) - before.get(counter % reason, 0)
        assert rise == (2 if reason == "wrong_type" else 1), reason
    assert all("no-such-model" not in name for name in after), "the label is the check, never request data"


# Property-based: requests generated around the Open Inference Protocol's and MLflow's shapes, from plausible
# (right names, shapes and datatypes, values of any kind) to nonsense; whatever arrives, the answer is < 500.
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
CONTENT_TYPES = st.sampled_from(["np", "pd", "str", "base64", "datetime", "nope"])
PARAMETERS = st.fixed_dictionaries({}, optional={"content_type": CONTENT_TYPES, "extra": JSON}) | JSON
DATATYPES = st.sampled_from(
    ["BOOL", "UINT8", "UINT64", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "INT128"]
)


@st.composite
def plausible_tensor(draw, name: str) -> dict:
    rows = draw(st.integers(0, 4))
    return {
        "name": name,
        "datatype": draw(DATATYPES | st.just(V2_TYPES.get(name, "BYTES"))),
        "shape": draw(st.just([rows, 1]) | st.lists(st.integers(-1, 4), max_size=3)),
        "data": draw(st.lists(SCALARS, min_size=rows, max_size=rows) | st.lists(JSON, max_size=4)),
        **draw(st.fixed_dictionaries({}, optional={"parameters": PARAMETERS})),
    }


V2_REQUESTS = st.fixed_dictionaries(
    {"inputs": st.lists(st.sampled_from([*COLUMNS, "colour"]).flatmap(plausible_tensor), min_size=1, max_size=6)
     | st.lists(JSON, max_size=3) | JSON},
    optional={"parameters": PARAMETERS, "id": JSON, "outputs": JSON},
)  # fmt: skip
ROW_VALUES = st.fixed_dictionaries(
    {c: SCALARS for c in COLUMNS[:3]}, optional={c: SCALARS | JSON for c in [*COLUMNS[3:], "colour"]}
)
INVOCATIONS_REQUESTS = st.one_of(
    st.fixed_dictionaries({"dataframe_records": st.lists(ROW_VALUES, max_size=3)}, optional={"params": JSON}),
    st.fixed_dictionaries({"instances": st.lists(ROW_VALUES | JSON, max_size=3)}),
    st.fixed_dictionaries({"inputs": st.dictionaries(st.sampled_from(COLUMNS), st.lists(SCALARS, max_size=3))}),
    st.fixed_dictionaries({"dataframe_split": st.fixed_dictionaries({"columns": st.just(COLUMNS), "data": JSON})}),
    JSON,
)


OTHER_ROUTES = st.sampled_from([
    "/v2/models/churn-classifier/generate", "/v2/models/churn-classifier/infer_stream",
    "/v2/models/churn-classifier/generate_stream", "/v2/models/churn-classifier/versions/{v}/infer",
    "/v2/models/churn-classifier/versions/{v}/generate", "/v2/models/churn-classifier/versions/{v}/infer_stream",
    "/v2/repository/index",
])  # fmt: skip


@given(
    st.tuples(st.just("/v2/models/churn-classifier/infer"), V2_REQUESTS)
    | st.tuples(st.just("/invocations"), INVOCATIONS_REQUESTS)
    | st.tuples(OTHER_ROUTES, V2_REQUESTS | JSON)
)
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_5xx(server, request_):
    path, body = request_
    path = path.replace("{v}", server.version)
    answer = server.post(path, json.dumps(body).encode())
    assert answer.status_code < 500, f"{path} {json.dumps(body)[:400]} -> {answer.status_code} {answer.text[:300]}"
