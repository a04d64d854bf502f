"""The serving runtime's column decode makes the very DataFrame MLServer's PandasCodec makes (issue #15: the same
frame at a quarter of the cost), and leaves to PandasCodec what it does not cover."""

from __future__ import annotations

import asyncio
import copy

import mlflow
import pandas as pd
import pytest
from mlserver import MLModel
from mlserver.types import InferenceRequest

from ml_serving.server.frames import columns_frame

pytestmark = pytest.mark.serving

COLUMNS = {  # column -> (MLflow type, V2 datatype, values)
    "tenure": ("long", "INT64", [1, 2, 3]),
    "charges": ("double", "FP64", [99.5, 0.0, -1.25]),
    "ratio": ("float", "FP32", [0.5, 1.5, 2.5]),
    "calls": ("integer", "INT32", [4, 0, 7]),
    "active": ("boolean", "BOOL", [True, False, True]),
    "plan": ("string", "BYTES", ["basic", "prémium", "pro"]),
    "note": ("string", "BYTES", ["a", None, "c"]),
}


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def request(columns: dict, **parameters) -> InferenceRequest:
    inputs = [
        {"name": name, "datatype": datatype, "shape": [len(values), 1], "data": values, **parameters}
        for name, (datatype, values) in columns.items()
    ]
    return InferenceRequest.model_validate({"inputs": inputs})


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from ml_serving.server.__main__ import model_settings, settings_dir
    from ml_serving.server.runtime import ServingRuntime

    folder = tmp_path_factory.mktemp("frames") / "m"
    schema = Schema([ColSpec(kind, name) for name, (kind, _, _) in COLUMNS.items()])
    mlflow.pyfunc.save_model(folder, python_model=Echo(), signature=ModelSignature(inputs=schema, outputs=schema),
                             pip_requirements=["mlflow"])  # fmt: skip
    served = ServingRuntime(model_settings(settings_dir(), folder, "m"))
    assert asyncio.run(served.load())
    return served


def both(runtime, payload: InferenceRequest) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runtime's frame, and MLServer's own (MLModel.decode_request: PandasCodec) for a copy of the request."""
    return runtime.decode_request(payload), MLModel.decode_request(runtime, copy.deepcopy(payload))


@pytest.mark.parametrize("rows", [1, 3])
def test_the_frame_is_pandas_codecs_frame_for_every_column_type(runtime, rows):
    payload = request({name: (datatype, values[:rows]) for name, (_, datatype, values) in COLUMNS.items()})
    ours, mlservers = both(runtime, payload)
    assert columns_frame(payload) is not None  # the column decode made it, not PandasCodec
    pd.testing.assert_frame_equal(ours, mlservers)
    assert ours["plan"].tolist()[:rows] == COLUMNS["plan"][2][:rows]


def test_the_runtime_decodes_a_column_model_with_the_column_decode(runtime, monkeypatch):
    """The frame the model gets is the column decode's own (PandasCodec's frame is the same, so the equality
    tests alone would pass with the runtime not using it)."""
    from ml_serving.server import runtime as module

    made = []
    monkeypatch.setattr(module, "columns_frame", lambda payload: made.append(columns_frame(payload)) or made[-1])
    frame = runtime.decode_request(request({"tenure": ("INT64", [1, 2]), "plan": ("BYTES", ["a", "b"])}))
    assert len(made) == 1 and frame is made[0]


def test_bytes_and_mixed_objects_keep_pandas_codecs_dtypes(runtime):
    for values in ([b"x", b"y"], [1, "y"], ["x", "y"]):
        payload = request({"plan": ("BYTES", values)})
        assert columns_frame(copy.deepcopy(payload)) is not None
        pd.testing.assert_frame_equal(*both(runtime, payload))


@pytest.mark.parametrize(
    "payload",
    [
        request({"tenure": ("INT64", []), "plan": ("BYTES", [])}),  # no rows: PandasCodec's dtypes differ
        request({"tenure": ("INT64", [1, 2]), "plan": ("BYTES", ["a"])}),  # unequal columns: PandasCodec aligns
        request({"plan": ("BYTES", ['"a"'])}, parameters={"content_type": "pd_json"}),  # JSON-encoded column
        InferenceRequest.model_validate(
            {"inputs": [{"name": "t", "datatype": "FP64", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}]}
        ),  # a tensor of two columns
    ],
    ids=["no-rows", "unequal", "pd_json", "2-columns"],
)
def test_what_the_column_decode_does_not_cover_is_left_to_pandas_codec(runtime, payload):
    assert columns_frame(copy.deepcopy(payload)) is None
    try:
        expected = MLModel.decode_request(runtime, copy.deepcopy(payload))
    except Exception as error:  # PandasCodec refuses it: so does the runtime, the same way
        with pytest.raises(type(error)):
            runtime.decode_request(payload)
        return
    pd.testing.assert_frame_equal(runtime.decode_request(payload), expected)
