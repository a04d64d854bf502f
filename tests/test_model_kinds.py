"""Every kind of MLflow model the registry holds, served for real: a tensor signature, no signature, a params
schema with named multi-column outputs, and `predict_proba` outputs; each answer compared with MLflow's own."""

from __future__ import annotations

import textwrap

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from ml_serving.server import GC_THRESHOLDS
from tests import processes

pytestmark = pytest.mark.serving

PIP = ["mlflow", "scikit-learn"]  # named: inferring them starts a subprocess per model
X = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, 0.5, -0.2, 0.3], [-1.0, 2.0, 0.0, 1.5]])
PARAMS_MODEL = '''
import mlflow
import pandas as pd


class Scorer(mlflow.pyfunc.PythonModel):
    """A label and a probability per row; `threshold` (a param) decides the label."""

    def predict(self, context, model_input, params=None):
        threshold = (params or {}).get("threshold", 0.5)
        probability = 1 / (1 + (-model_input["x"]).map(__import__("math").exp))
        return pd.DataFrame({"label": ["churn" if p >= threshold else "stay" for p in probability],
                             "probability": probability})


mlflow.models.set_model(Scorer())
'''


KINDS_MODEL = '''
import mlflow
import numpy as np
import pandas as pd


class Kinds(mlflow.pyfunc.PythonModel):
    """Every kind of output MLflow's scoring server answers differently, chosen by the `kind` param."""

    def predict(self, context, model_input, params=None):
        x = model_input["x"].to_numpy()
        kind = (params or {}).get("kind", "series")
        if kind == "series":
            return pd.Series(x * 2)
        if kind == "named_series":
            return pd.Series(x * 2, name="score")
        if kind == "frame":
            return pd.DataFrame({"score": x * 2, "label": ["up" if v > 0 else "down" for v in x]})
        if kind == "dict":
            return {"score": x * 2, "flag": x > 0}
        if kind == "strings":
            return ["up" if v > 0 else "down" for v in x]
        if kind == "matrix":
            return np.stack([x, -x], axis=1)
        return np.asarray(["up" if v > 0 else "down" for v in x], dtype=object)


mlflow.models.set_model(Kinds())
'''
FAILING_MODEL = """
import mlflow


class Failing(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        raise RuntimeError("this model cannot load")

    def predict(self, context, model_input, params=None):
        return model_input


mlflow.models.set_model(Failing())
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPRegressor

    folder = tmp_path_factory.mktemp("kinds")
    y = X @ np.array([1.0, -2.0, 0.5, 3.0])
    mlp = MLPRegressor(hidden_layer_sizes=(8,), max_iter=300, random_state=0).fit(np.tile(X, (20, 1)), np.tile(y, 20))
    mlflow.sklearn.save_model(
        mlp, folder / "tensor", signature=infer_signature(X, mlp.predict(X)),
        skops_trusted_types=["sklearn.neural_network._stochastic_optimizers.AdamOptimizer"], pip_requirements=PIP,
    )  # fmt: skip
    labels = np.array([0, 1, 0])
    logistic = LogisticRegression().fit(X[:, :3], labels)
    mlflow.sklearn.save_model(logistic, folder / "unsigned", pip_requirements=PIP)  # logged without a signature
    frame = pd.DataFrame(X[:, :3], columns=["a", "b", "c"])
    proba = pd.DataFrame(logistic.predict_proba(frame.to_numpy()), columns=["p_stay", "p_churn"])
    mlflow.sklearn.save_model(
        LogisticRegression().fit(frame, labels), folder / "proba", pyfunc_predict_fn="predict_proba",
        signature=infer_signature(frame, proba), pip_requirements=PIP,
    )  # fmt: skip
    (folder / "scorer.py").write_text(textwrap.dedent(PARAMS_MODEL))
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", "x")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "probability")]),
        params=ParamSchema([ParamSpec("threshold", "double", 0.5)]),
    )
    mlflow.pyfunc.save_model(
        folder / "params", python_model=str(folder / "scorer.py"), signature=signature, pip_requirements=PIP
    )
    (folder / "kinds.py").write_text(textwrap.dedent(KINDS_MODEL))
    kinds_signature = ModelSignature(  # an unnamed output (MLServer's runtime needs one): nothing renamed
        inputs=Schema([ColSpec("double", "x")]),
        outputs=Schema([ColSpec("double")]),
        params=ParamSchema([ParamSpec("kind", "string", "series")]),
    )
    mlflow.pyfunc.save_model(
        folder / "kinds", python_model=str(folder / "kinds.py"), signature=kinds_signature, pip_requirements=PIP
    )
    paths = {kind: str(folder / kind) for kind in ("tensor", "unsigned", "proba", "params", "kinds")}
    # No worker processes (inference in the server process): four servers start in half the time.
    with processes.serving_servers(
        paths, folder, env={"MLSERVER_MODEL_NAME": "m", "MLSERVER_PARALLEL_WORKERS": "0"}
    ) as ports:
        yield {
            kind: (f"http://127.0.0.1:{ports[kind]['http']}", mlflow.pyfunc.load_model(paths[kind])) for kind in paths
        }


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=30)


def v2(name: str, datatype: str, rows: np.ndarray | list, **extra) -> dict:
    array = np.asarray(rows)
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist(), **extra}


def test_tensor_signature_on_both_protocols_like_mlflow(models):
    url, model = models["tensor"]
    expected = model.predict(X).tolist()
    for body in ({"inputs": X.tolist()}, {"instances": X.tolist()}):
        answer = post(url, "/invocations", body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == pytest.approx(expected)
    for datatype in ("FP64", "FP32"):  # FP32 is what most clients send: widened losslessly to the model's FP64
        answer = post(url, "/v2/models/m/infer", {"inputs": [v2("input-0", datatype, X)]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == pytest.approx(expected, rel=1e-6)
    wrong_shape = post(url, "/v2/models/m/infer", {"inputs": [v2("input-0", "FP64", X[:, :3])]})
    assert wrong_shape.status_code == 422 and "of shape [-1, 4]" in wrong_shape.json()["error"]
    ragged = post(url, "/invocations", {"inputs": [[1.0, 2.0, 3.0, 4.0], [1.0]]})
    assert ragged.status_code == 422 and "ragged" in ragged.json()["error"]


def test_a_model_without_a_signature_gets_its_data_and_answers_its_own_errors_as_4xx(models):
    url, model = models["unsigned"]
    rows = X[:, :3]
    expected = model.predict(rows).tolist()
    assert post(url, "/invocations", {"inputs": rows.tolist()}).json() == {"predictions": expected}
    split = {"dataframe_split": {"columns": ["a", "b", "c"], "data": rows.tolist()}}
    assert post(url, "/invocations", split).json() == {"predictions": expected}
    answer = post(url, "/v2/models/m/infer", {"inputs": [v2("x", "FP64", rows)]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == expected
    four_features = post(url, "/v2/models/m/infer", {"inputs": [v2("x", "FP64", X)]})
    assert four_features.status_code == 422, four_features.text
    assert (
        "the model refused the input" in four_features.json()["error"] and "3 features" in four_features.json()["error"]
    )
    wrong_values = post(url, "/v2/models/m/infer", {"inputs": [v2("x", "FP64", [["a", "b", "c"]])]})
    assert wrong_values.status_code == 422 and "FP64 holds a number" in wrong_values.json()["error"]


def test_params_and_named_multi_column_outputs(models):
    url, model = models["params"]
    frame = pd.DataFrame({"x": [-2.0, 0.3, 3.0]})
    for threshold in (0.5, 0.9):
        expected = model.predict(frame, params={"threshold": threshold})
        body = {
            "dataframe_split": {"columns": ["x"], "data": frame.to_numpy().tolist()},
            "params": {"threshold": threshold},
        }
        answer = post(url, "/invocations", body)
        assert answer.status_code == 200, answer.text
        assert [p["label"] for p in answer.json()["predictions"]] == expected["label"].tolist()
        assert [p["probability"] for p in answer.json()["predictions"]] == pytest.approx(
            expected["probability"].tolist()
        )
        v2_answer = post(url, "/v2/models/m/infer", {"inputs": [v2("x", "FP64", frame["x"].to_numpy())],
                                                     "parameters": {"threshold": threshold}}).json()  # fmt: skip
        outputs = {o["name"]: o for o in v2_answer["outputs"]}
        assert (outputs["label"]["datatype"], outputs["probability"]["datatype"]) == ("BYTES", "FP64")
        assert outputs["label"]["data"] == expected["label"].tolist()
    for params, words in (({"treshold": 0.2}, "unknown parameter"), ({"threshold": "high"}, "expects double")):
        refused = post(url, "/invocations", {"dataframe_records": [{"x": 1.0}], "params": params})
        assert refused.status_code == 422 and words in refused.json()["error"], refused.text


def test_predict_proba_outputs_come_back_named_from_the_output_schema(models):
    url, model = models["proba"]
    frame = pd.DataFrame(X[:, :3], columns=["a", "b", "c"])
    expected = np.asarray(model.predict(frame))
    answer = post(url, "/v2/models/m/infer", {"inputs": [v2(c, "FP64", frame[c].to_numpy()) for c in frame]})
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert set(outputs) == {"p_stay", "p_churn"} and outputs["p_churn"]["datatype"] == "FP64"
    assert outputs["p_churn"]["data"] == pytest.approx(expected[:, 1].tolist())
    rows = post(url, "/invocations", {"dataframe_records": frame.to_dict(orient="records")}).json()["predictions"]
    assert [r[0] for r in rows] == pytest.approx(expected[:, 0].tolist()), "an array's rows, as MLflow answers"


@pytest.mark.parametrize(
    ("kind", "inputs", "outputs"),
    [
        ("tensor", [("input-0", "FP64", [-1, 4])], None),
        ("params", [("x", "FP64", [-1, 1])], [("label", "BYTES"), ("probability", "FP64")]),
        ("proba", [("a", "FP64", [-1, 1]), ("b", "FP64", [-1, 1]), ("c", "FP64", [-1, 1])], [("p_stay", "FP64"), ("p_churn", "FP64")]),
        ("unsigned", [], []),
    ],
)  # fmt: skip
def test_v2_metadata_describes_the_signature(models, kind, inputs, outputs):
    url, _ = models[kind]
    metadata = requests.get(f"{url}/v2/models/m", timeout=10).json()
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata.get("inputs", [])] == inputs
    if outputs is not None:
        assert [(t["name"], t["datatype"]) for t in metadata.get("outputs", [])] == outputs


def mlflow_answer(model, body: dict) -> dict:
    """What `mlflow models serve` answers for `body`: its scoring server's own request handler, in process."""
    import json

    from mlflow.pyfunc import scoring_server

    answer = scoring_server.invocations(json.dumps(body), "application/json", model, model.metadata.get_input_schema())
    assert answer.status == 200, answer.response
    return json.loads(answer.response)


X_FRAME = {"dataframe_split": {"columns": ["x"], "data": [[-2.0], [0.5], [3.0]]}}
SAME_AS_MLFLOW = [
    ("tensor", {"inputs": X.tolist()}),  # one tensor: a 1-D array
    ("unsigned", {"inputs": X[:, :3].tolist()}),
    ("proba", {"dataframe_records": pd.DataFrame(X[:, :3], columns=["a", "b", "c"]).to_dict(orient="records")}),
    ("params", {**X_FRAME, "params": {"threshold": 0.7}}),  # a DataFrame of a string and a number column
    *[("kinds", {**X_FRAME, "params": {"kind": kind}})
      for kind in ("series", "named_series", "frame", "dict", "strings", "matrix", "text_array")],
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "body"), SAME_AS_MLFLOW, ids=[f"{k}-{b.get('params', {}).get('kind', '')}" for k, b in SAME_AS_MLFLOW]
)
def test_invocations_answers_exactly_as_mlflow_models_serve(models, kind, body):
    """Series and DataFrames as records, arrays as nested lists, a dict of arrays as {name: values}, strings as
    strings: compared with MLflow's scoring server's own answer, not a hand-written one."""
    url, model = models[kind]
    answer = post(url, "/invocations", body)
    assert answer.status_code == 200, answer.text
    ours, theirs = answer.json(), mlflow_answer(model, body)
    assert same(ours, theirs), f"ours {ours}\nmlflow {theirs}"


def same(ours, theirs) -> bool:
    """Equal JSON, numbers to float precision (MLServer carries FP64 as JSON numbers, as MLflow does)."""
    if isinstance(theirs, dict):
        return isinstance(ours, dict) and ours.keys() == theirs.keys() and all(same(ours[k], theirs[k]) for k in ours)
    if isinstance(theirs, list):
        return isinstance(ours, list) and len(ours) == len(theirs) and all(map(same, ours, theirs))
    if isinstance(theirs, float) and not isinstance(ours, bool):
        return ours == pytest.approx(theirs)
    return type(ours) is type(theirs) and ours == theirs


def test_v2_answers_do_not_carry_the_output_kind(models):
    url, _ = models["kinds"]
    body = {"inputs": [v2("x", "FP64", np.array([[1.0], [-1.0]]))], "parameters": {"kind": "dict"}}
    answer = post(url, "/v2/models/m/infer", body).json()
    assert "ml_serving_output" not in answer.get("parameters", {})
    assert {o["name"] for o in answer["outputs"]} == {"score", "flag"}


def test_a_model_that_fails_to_load_stops_the_server_before_it_takes_requests(tmp_path):
    """As MLServer's own start does: the load fails, the server stops (exit 1, the reason in one line) and its
    request port never opened."""
    import subprocess
    import sys

    (tmp_path / "failing.py").write_text(textwrap.dedent(FAILING_MODEL))
    mlflow.pyfunc.save_model(tmp_path / "failing", python_model=str(tmp_path / "failing.py"), pip_requirements=PIP)
    http = processes.free_port()
    env = {
        **__import__("os").environ, "MLSERVER_HTTP_PORT": str(http), "MLSERVER_GRPC_PORT": str(processes.free_port()),
        "MLSERVER_METRICS_PORT": str(processes.free_port()), "MLSERVER_PARALLEL_WORKERS": "0",
        "MLSERVER_METRICS_DIR": str(tmp_path / "metrics"), "MLSERVER_MODEL_NAME": "m",
    }  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "ml_serving.server", str(tmp_path / "failing")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    assert "error: model 'm' failed to load: " in run.stderr and "this model cannot load" in run.stderr
    assert "Uvicorn running on" not in run.stderr.replace(f":{http}", "") or f":{http}" not in run.stderr


def test_the_process_that_loads_the_model_freezes_its_heap(tmp_path):
    """A full collection walking the loaded model's heap stalled every request in flight (the p99 tail of #15),
    and collections at Python's default thresholds walked every request in flight every few requests."""
    import asyncio
    import gc

    from sklearn.linear_model import LogisticRegression

    from ml_serving.server.__main__ import model_settings, settings_dir
    from ml_serving.server.runtime import ServingRuntime

    mlflow.sklearn.save_model(LogisticRegression().fit(X, [0, 1, 0]), tmp_path / "m", pip_requirements=PIP)
    runtime = ServingRuntime(model_settings(settings_dir(), tmp_path / "m", "m"))
    gc.unfreeze()
    defaults = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's defaults, whatever ran in this process before
    try:
        assert asyncio.run(runtime.load())
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*defaults)
