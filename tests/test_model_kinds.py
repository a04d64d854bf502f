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
    paths = {kind: str(folder / kind) for kind in ("tensor", "unsigned", "proba", "params")}
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
    records = post(url, "/invocations", {"dataframe_records": frame.to_dict(orient="records")}).json()["predictions"]
    assert [r["p_stay"] for r in records] == pytest.approx(expected[:, 0].tolist())


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
