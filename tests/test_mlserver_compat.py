"""A contract test per private access to MLServer (ml_serving/server/mlserver_compat.py), and its version check:
an MLServer upgrade that moves one of them fails here, not in production."""

from __future__ import annotations

import asyncio
import hashlib
import inspect

import mlflow
import numpy as np
import pytest
from mlserver.batching.adaptive import AdaptiveBatcher
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest
from mlserver_mlflow import MLflowRuntime

from ml_serving.server import mlserver_compat as compat

# sha256 of MLServer 1.7.1's AdaptiveBatcher._batch_requests, the loop ClosingBatcher copies.
MLSERVER_BATCH_LOOP = "2ea3997fea32b3e3683b800e7cc2909df8d1c21cacf956301050a2892e3a46f8"


def test_another_minor_version_refuses_to_start_unless_named_by_the_override(monkeypatch):
    monkeypatch.delenv(compat.OVERRIDE_ENV, raising=False)
    compat.check_version()  # the installed one
    compat.check_version("1.7.9")
    with pytest.raises(compat.IncompatibleMLServer) as refused:
        compat.check_version("1.8.0")
    assert compat.OVERRIDE_ENV in str(refused.value) and "1.7.1" in str(refused.value)
    monkeypatch.setenv(compat.OVERRIDE_ENV, "1.8.0")
    compat.check_version("1.8.0")
    with pytest.raises(compat.IncompatibleMLServer):
        compat.check_version("1.9.0")


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("compat") / "m"
    x = np.array([[0.1, 0.2], [1.0, -0.5], [-1.0, 2.0]])
    signature = mlflow.models.infer_signature(x, np.array([0, 1, 0]))
    mlflow.sklearn.save_model(LogisticRegression().fit(x, [0, 1, 0]), folder, pip_requirements=["mlflow"],
                              signature=signature)  # fmt: skip
    loaded = MLflowRuntime(
        ModelSettings(name="m", implementation=MLflowRuntime, parameters=ModelParameters(uri=str(folder)))
    )
    assert asyncio.run(loaded.load())
    return loaded, signature


def test_the_runtime_holds_the_loaded_pyfunc_and_its_signature(runtime):
    loaded, signature = runtime
    assert isinstance(compat.pyfunc(loaded), mlflow.pyfunc.PyFuncModel)
    assert compat.signature(loaded) == signature


def test_the_runtime_indexes_its_inputs_by_name(runtime):
    loaded, _ = runtime
    index = compat.inputs_index(loaded)
    assert isinstance(index, dict) and list(index) == [t.name for t in loaded.inputs]


def test_the_codec_mlserver_picks_is_the_requests_then_the_models(runtime):
    loaded, _ = runtime
    tensor = {"name": "input-0", "shape": [1, 2], "datatype": "FP64", "data": [0.1, 0.2]}
    plain = InferenceRequest.model_validate({"inputs": [tensor]})
    assert compat.content_type(plain, loaded) == loaded.settings.parameters.content_type == "np"
    asked = InferenceRequest.model_validate({"inputs": [tensor], "parameters": {"content_type": "pd"}})
    assert compat.content_type(asked, loaded) == "pd"


def test_the_batch_loop_closing_batcher_copies_is_still_mlservers():
    """An MLServer upgrade that changes its batch loop must be looked at before ClosingBatcher keeps its copy."""
    source = inspect.getsource(AdaptiveBatcher._batch_requests)
    assert hashlib.sha256(source.encode()).hexdigest() == MLSERVER_BATCH_LOOP, "re-check ClosingBatcher"
    for name in ("_requests", "_max_batch_time", "_max_batch_size"):
        assert name in inspect.getsource(AdaptiveBatcher.__init__), name
    assert inspect.signature(AdaptiveBatcher._get_request).parameters.keys() >= {"timeout"}


def test_load_batching_keeps_the_batcher_where_close_batches_early_looks():
    from mlserver.batching import hooks

    assert hooks._AdaptiveBatchingAttr == compat.BATCHER_ATTRIBUTE
