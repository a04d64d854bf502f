"""Request validation as pure functions: each refusal names its check (the refusals counter's bounded label)."""

from __future__ import annotations

import pytest

from ml_serving import metrics
from ml_serving.server import validation as v

COLUMNS = [
    v.Column("tenure_months", "integer"),
    v.Column("monthly_charges", "float"),
    v.Column("plan", "string"),
    v.Column("promo", "boolean", required=False),
]
ROW = {"tenure_months": 3, "monthly_charges": 99.5, "plan": "basic"}
LIMITS = v.Limits(max_rows=10)


def tensor(name: str, datatype: str, data: list, shape: list | None = None, **extra) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data), 1], "data": data, **extra}


def v2(*tensors: dict, **extra) -> dict:
    good = [
        tensor("tenure_months", "INT64", [3]),
        tensor("monthly_charges", "FP64", [9.5]),
        tensor("plan", "BYTES", ["a"]),
    ]
    return {"inputs": list(tensors) or good, **extra}


INVOCATIONS = [
    ("not-an-object", [ROW], v.Refusal.BAD_STRUCTURE),
    ("two-formats", {"dataframe_records": [ROW], "instances": [ROW]}, v.Refusal.BAD_STRUCTURE),
    ("params-not-object", {"dataframe_records": [ROW], "params": [1]}, v.Refusal.BAD_PARAMETERS),
    ("no-rows", {"dataframe_records": []}, v.Refusal.NO_ROWS),
    ("too-many-rows", {"dataframe_records": [ROW] * 11}, v.Refusal.TOO_LARGE),
    ("unknown-column", {"dataframe_records": [{**ROW, "colour": "red"}]}, v.Refusal.UNKNOWN_COLUMN),
    ("missing-column", {"dataframe_records": [{"plan": "basic"}]}, v.Refusal.MISSING_COLUMN),
    ("null", {"dataframe_records": [{**ROW, "plan": None}]}, v.Refusal.NULL_VALUE),
    ("wrong-type", {"dataframe_records": [{**ROW, "tenure_months": 1.5}]}, v.Refusal.WRONG_TYPE),
    ("ragged-split", {"dataframe_split": {"columns": ["plan", "x"], "data": [["a"]]}}, v.Refusal.RAGGED),
    ("ragged-inputs", {"inputs": {"plan": ["a", "b"], "tenure_months": [1]}}, v.Refusal.RAGGED),
]
V2 = [
    ("not-an-object", [], v.Refusal.BAD_STRUCTURE),
    ("unknown-field", {**v2(), "input": []}, v.Refusal.BAD_STRUCTURE),
    ("no-inputs", {"inputs": []}, v.Refusal.BAD_STRUCTURE),
    ("request-content-type", v2(parameters={"content_type": "nope"}), v.Refusal.BAD_PARAMETERS),
    ("tensor-content-type", v2(tensor("plan", "BYTES", ["a"], parameters={"content_type": "np"})), v.Refusal.BAD_PARAMETERS),
    ("missing-key", {"inputs": [{"name": "plan", "datatype": "BYTES", "shape": [1]}]}, v.Refusal.BAD_STRUCTURE),
    ("negative-shape", v2(tensor("plan", "BYTES", ["a"], shape=[-1])), v.Refusal.BAD_SHAPE),
    ("shape-count", v2(tensor("plan", "BYTES", ["a"], shape=[2, 1])), v.Refusal.BAD_SHAPE),
    ("not-a-datatype", v2(tensor("plan", "STRING", ["a"])), v.Refusal.WRONG_DATATYPE),
    ("datatype-misfit", v2(tensor("tenure_months", "FP64", [1.0]), tensor("monthly_charges", "FP64", [1.0]), tensor("plan", "BYTES", ["a"])), v.Refusal.WRONG_DATATYPE),
    ("value-misfit", v2(tensor("tenure_months", "INT64", ["x"]), tensor("monthly_charges", "FP64", [1.0]), tensor("plan", "BYTES", ["a"])), v.Refusal.WRONG_TYPE),
    ("unknown-input", v2(*v2()["inputs"], tensor("colour", "BYTES", ["red"])), v.Refusal.UNKNOWN_COLUMN),
    ("missing-input", v2(tensor("plan", "BYTES", ["a"])), v.Refusal.MISSING_COLUMN),
    ("ragged", v2(tensor("tenure_months", "INT64", [3, 4]), tensor("monthly_charges", "FP64", [9.5]), tensor("plan", "BYTES", ["a"])), v.Refusal.RAGGED),
    ("too-many-rows", v2(tensor("plan", "BYTES", ["a"] * 11)), v.Refusal.TOO_LARGE),
    ("objects-as-values", v2(tensor("plan", "BYTES", [[{"a": 1}]], shape=[1, 1])), v.Refusal.BAD_STRUCTURE),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "reason"), [c[1:] for c in INVOCATIONS], ids=[c[0] for c in INVOCATIONS])
def test_invocations_refusals_name_their_check(payload, reason):
    with pytest.raises(v.RequestError) as refused:
        v.invocation_table(v.invocation_envelope(payload), COLUMNS, LIMITS)
    assert refused.value.reason is reason, refused.value.message
    assert 400 <= refused.value.status < 500


@pytest.mark.parametrize(("payload", "reason"), [c[1:] for c in V2], ids=[c[0] for c in V2])
def test_v2_refusals_name_their_check(payload, reason):
    with pytest.raises(v.RequestError) as refused:
        v.check_v2(payload, v.Inputs(columns=COLUMNS), LIMITS)
    assert refused.value.reason is reason, refused.value.message
    assert 400 <= refused.value.status < 500


@pytest.mark.parametrize("body", [b"", b"\xff", b"{", b"[" * 40 + b"]" * 40], ids=["empty", "utf8", "json", "deep"])
def test_unreadable_bodies_are_malformed(body):
    with pytest.raises(v.RequestError) as refused:
        v.parse_json(body, v.Limits(max_depth=32))
    assert (refused.value.status, refused.value.reason) == (400, v.Refusal.MALFORMED_BODY)


def test_lossless_numeric_datatypes_fit_and_the_optional_column_may_be_absent():
    narrow = v2(
        tensor("tenure_months", "INT32", [3]), tensor("monthly_charges", "FP32", [9.5]), tensor("plan", "BYTES", ["a"])
    )
    v.check_v2(narrow, v.Inputs(columns=COLUMNS), LIMITS)
    envelope = v.invocation_envelope({"dataframe_records": [ROW], "params": {"k": 1}})
    table = v.invocation_table(envelope, COLUMNS, LIMITS)
    assert table == {"tenure_months": [3], "monthly_charges": [99.5], "plan": ["basic"]} and envelope.params == {"k": 1}


def test_every_kind_is_one_row_of_the_table():
    """Each MLflow type maps to one kind, each kind is sent as a datatype it accepts, and its check agrees."""
    samples = {"integer": 3, "float": 2.5, "string": "x", "boolean": True, "binary": "eA==", "datetime": "2026-01-01"}
    assert set(v.KINDS) == set(samples)
    for name, kind in v.KINDS.items():
        assert kind.datatype in v.V2_DATATYPES and kind.accepts(samples[name])
        assert all(v.KIND_OF_MLFLOW_TYPE[t] == name for t in kind.mlflow_types)
    assert not v.KINDS["integer"].accepts(True) and not v.KINDS["float"].accepts(float("nan"))


def test_the_refusals_metric_is_the_one_the_dashboard_queries():
    assert v.Refusal.WRONG_TYPE.value == "wrong_type"
    assert metrics.REFUSALS in metrics.refusals_by_reason(metrics.Scope(model="churn"))
    assert f"{metrics.REASON})" in metrics.refusals_by_reason(metrics.Scope(model="churn"))


# Tensor signatures, no signature, params ----------------------------------------------------------------------


def signature(inputs=None, params=None):
    from mlflow.models import ModelSignature

    return ModelSignature(inputs=inputs, params=params)


def tensor_inputs(*specs):
    import numpy as np
    from mlflow.types.schema import Schema, TensorSpec

    return v.model_inputs(signature(Schema([TensorSpec(np.dtype(d), shape, name) for d, shape, name in specs])))


MLP = tensor_inputs(("float64", (-1, 4), None))  # one unnamed float64 tensor of 4 features


def test_a_float32_tensor_for_a_float64_model_is_converted_and_its_shape_checked():
    request = v.check_v2(v2(tensor("x", "FP32", [[0.5] * 4] * 3, shape=[3, 4])), MLP, LIMITS)
    assert request["inputs"][0]["datatype"] == "FP64", "lossless: converted, not refused"
    for bad, reason, words in (
        (tensor("x", "FP64", [0.5] * 9, shape=[3, 3]), v.Refusal.BAD_SHAPE, "does not fit tensor 'input-0' of shape [-1, 4]"),
        (tensor("x", "BYTES", ["a"] * 4, shape=[1, 4]), v.Refusal.WRONG_DATATYPE, "send FP64, FP16, FP32, INT16"),
        (tensor("x", "INT64", [1] * 4, shape=[1, 4]), v.Refusal.WRONG_DATATYPE, "INT64 does not fit"),
        (tensor("x", "FP64", ["a"] * 4, shape=[1, 4]), v.Refusal.WRONG_TYPE, "FP64 holds a number"),
    ):  # fmt: skip
        with pytest.raises(v.RequestError) as refused:
            v.check_v2(v2(bad), MLP, LIMITS)
        assert refused.value.reason is reason and words in refused.value.message, refused.value.message
    with pytest.raises(v.RequestError) as two:
        v.check_v2(
            v2(tensor("x", "FP64", [0.5] * 4, shape=[1, 4]), tensor("y", "FP64", [0.5] * 4, shape=[1, 4])), MLP, LIMITS
        )
    assert "takes one tensor" in two.value.message


def test_mlflow_tensor_formats_on_invocations_become_one_checked_tensor():
    rows = [[0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]]
    for payload in ({"inputs": rows}, {"instances": rows}):
        request = v.invocation_request(payload, MLP, LIMITS)
        (only,) = request["inputs"]
        assert (only["datatype"], only["shape"], len(only["data"])) == ("FP64", [2, 4], 8)
        assert request["parameters"] == {"content_type": "np"}
    for bad, reason in (
        ({"inputs": [[1.0, 2.0], [1.0]]}, v.Refusal.RAGGED),
        ({"inputs": [[1.0, 2.0, 3.0]]}, v.Refusal.BAD_SHAPE),
        ({"inputs": {"x": [1.0]}}, v.Refusal.BAD_STRUCTURE),
        ({"instances": []}, v.Refusal.NO_ROWS),
    ):
        with pytest.raises(v.RequestError) as refused:
            v.invocation_request(bad, MLP, LIMITS)
        assert refused.value.reason is reason, refused.value.message


def test_named_tensors_by_name_on_both_protocols():
    inputs = tensor_inputs(("float32", (-1, 2), "a"), ("int64", (-1,), "b"))
    request = v.invocation_request({"inputs": {"a": [[1.0, 2.0]], "b": [7]}}, inputs, LIMITS)
    assert [(t["name"], t["datatype"], t["shape"]) for t in request["inputs"]] == [
        ("a", "FP32", [1, 2]),
        ("b", "INT64", [1]),
    ]
    assert request["parameters"] == {"content_type": "dict"}
    same = v.invocation_request({"instances": [{"a": [1.0, 2.0], "b": 7}]}, inputs, LIMITS)
    assert same["inputs"] == request["inputs"]
    with pytest.raises(v.RequestError) as missing:
        v.check_v2(v2(tensor("a", "FP32", [1.0, 2.0], shape=[1, 2])), inputs, LIMITS)
    assert missing.value.reason is v.Refusal.MISSING_COLUMN and "b" in missing.value.message


def test_without_a_signature_data_passes_through_checked_for_what_can_be():
    none = v.model_inputs(None)
    request = v.invocation_request({"inputs": [[1, 2, 3], [4, 5, 6]]}, none, LIMITS)
    assert request["inputs"][0]["datatype"] == "INT64" and request["parameters"] == {"content_type": "np"}
    assert v.invocation_request({"inputs": [[1.5, 2, 3]]}, none, LIMITS)["inputs"][0]["datatype"] == "FP64"
    frame = v.invocation_request({"dataframe_split": {"columns": ["a"], "data": [[1]]}}, none, LIMITS)
    assert frame["parameters"]["content_type"] == "pd"
    one = v.check_v2(v2(tensor("x", "FP64", [1.0] * 6, shape=[2, 3])), none, LIMITS)
    assert one["parameters"] == {"content_type": "np"}, "one tensor: one NumPy array for the model"
    for bad, reason in (
        (v2(tensor("x", "FP64", ["a", 1.0], shape=[1, 2])), v.Refusal.WRONG_TYPE),
        (v2(tensor("x", "INT8", [300], shape=[1])), v.Refusal.WRONG_TYPE),
        (v2(tensor("x", "FP64", [None], shape=[1])), v.Refusal.NULL_VALUE),
        (v2(tensor("x", "FP64", [1.0], shape=[1]), parameters={"content_type": "str"}), v.Refusal.BAD_PARAMETERS),
    ):
        with pytest.raises(v.RequestError) as refused:
            v.check_v2(bad, none, LIMITS)
        assert refused.value.reason is reason, refused.value.message
    with pytest.raises(v.RequestError) as mixed:
        v.invocation_request({"inputs": [[1, "a"]]}, none, LIMITS)
    assert mixed.value.reason is v.Refusal.WRONG_TYPE


def test_params_are_checked_against_the_params_schema():
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = v.model_inputs(
        signature(
            Schema([ColSpec("double", "x")]),
            ParamSchema([ParamSpec("threshold", "double", 0.5), ParamSpec("top_k", "long", 3)]),
        )
    )
    assert set(inputs.params) == {"threshold", "top_k"}
    ok = v.invocation_request({"dataframe_records": [{"x": 1.0}], "params": {"threshold": 0.7}}, inputs, LIMITS)
    assert ok["parameters"] == {"content_type": "pd", "threshold": 0.7}
    v.check_v2(v2(tensor("x", "FP64", [1.0]), parameters={"top_k": 5}), inputs, LIMITS)
    for params, words in (
        ({"colour": 1}, "unknown parameter; the model takes threshold (double)"),
        ({"top_k": "many"}, "expects long"),
    ):
        with pytest.raises(v.RequestError) as refused:
            v.invocation_request({"dataframe_records": [{"x": 1.0}], "params": params}, inputs, LIMITS)
        assert refused.value.reason is v.Refusal.BAD_PARAMETERS and words in refused.value.message, (
            refused.value.message
        )
    with pytest.raises(v.RequestError) as none:
        v.invocation_request({"dataframe_records": [ROW], "params": {"k": 1}}, v.Inputs(columns=COLUMNS), LIMITS)
    assert "takes no parameters" in none.value.message


def test_a_checked_request_becomes_mlservers_model_with_the_same_content():
    """The front hands MLServer its own request model, params included; a payload MLServer's model refuses is a
    422 naming the problem, not a 500."""
    from ml_serving.server.front import checked_request

    checked = v.check_v2(v2(parameters={"content_type": "pd"}), v.Inputs(columns=COLUMNS), LIMITS)
    with_params = {**checked, "id": "r1", "parameters": {"content_type": "pd", "threshold": 0.7}}
    for payload in (checked, with_params, {**checked, "outputs": [{"name": "x"}]}):
        request = checked_request(payload)
        assert request.model_dump(exclude_unset=True) == payload
    assert checked_request(with_params).parameters.model_extra == {"threshold": 0.7}, "params reach the model"
    with pytest.raises(v.RequestError) as refused:
        checked_request({**checked, "outputs": "x"})
    assert refused.value.status == 422 and "outputs" in refused.value.message, refused.value.message
