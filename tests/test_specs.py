"""Spec builders and settings on their own: no engine, no registry."""

from __future__ import annotations

import pytest

from ml_serving import labels
from ml_serving.registry import ResolvedVersion
from ml_serving.settings import ConfigError, parse_settings
from ml_serving.specs import seldon


def settings_with(**model):
    base = {"registeredModel": "m", "variants": {"a": {"version": "1", "modelUri": "s3://b/m", "weight": 100}}}
    return parse_settings({"ml-serving:models": {"m": {**base, **model}}}, "Pulumi.test.yaml")


def test_memory_trigger_only_when_configured():
    without = settings_with(autoscaling={"minReplicas": 1, "maxReplicas": 2}).models["m"].autoscaling
    assert [t["type"] for t in seldon.keda_spec(without)["triggers"]] == ["cpu"]
    assert seldon.hpa_spec(without)["metrics"] == [
        {"type": "Resource", "resource": {"name": "cpu", "targetAverageUtilization": 70}}
    ]
    with_memory = settings_with(autoscaling={"minReplicas": 1, "maxReplicas": 2, "memoryUtilization": 80})
    autoscaling = with_memory.models["m"].autoscaling
    memory = [t for t in seldon.keda_spec(autoscaling)["triggers"] if t["type"] == "memory"]
    assert memory == [{"type": "memory", "metricType": "Utilization", "metadata": {"value": "80"}}]
    assert {"type": "Resource", "resource": {"name": "memory", "targetAverageUtilization": 80}} in seldon.hpa_spec(
        autoscaling
    )["metrics"]


def test_limits_default_to_requests_and_can_be_raised():
    settings = settings_with(resources={"cpu": "1", "memory": "2Gi", "cpuLimit": "2"})
    assert seldon.resources(settings.models["m"]) == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"cpu": "2", "memory": "2Gi"},
    }


def test_structured_config_arrives_as_json_text_from_the_engine():
    settings = parse_settings(
        {
            "ml-serving:models": '{"m": {"registeredModel": "m", "variants": {"a": {"alias": "x", "weight": 100}}}}',
            "ml-serving:registry": '{"trackingUri": "http://r"}',
            "kubernetes:context": "other namespaces are not ours",
        },
        "Pulumi.test.yaml",
    )
    assert settings.models["m"].variants["a"].alias == "x"


def test_version_may_be_written_as_a_number():
    settings = settings_with(variants={"a": {"version": 9, "modelUri": "s3://b/m", "weight": 100}})
    assert settings.models["m"].variants["a"].version == "9"


def test_label_values_are_made_safe():
    assert labels.label_value("Fraud Scorer/v2 (EU)") == "Fraud-Scorer-v2-EU"
    assert len(labels.label_value("x" * 100)) == 63


def test_champion_is_the_variant_with_most_traffic():
    settings = settings_with(
        variants={
            "old": {"version": "1", "modelUri": "s3://b/1", "weight": 30},
            "new": {"version": "2", "modelUri": "s3://b/2", "weight": 70},
        }
    )
    assert settings.models["m"].champion == "new"


def test_predictor_of_a_shadow_has_no_traffic():
    settings = settings_with(
        variants={
            "a": {"version": "1", "modelUri": "s3://b/1", "weight": 100},
            "s": {"version": "2", "modelUri": "s3://b/2", "shadow": True},
        }
    )
    model = settings.models["m"]
    resolved = ResolvedVersion("2", "s3://b/2", None, None, pinned=True)
    spec = seldon.predictor(settings, "m", "s", model.variants["s"], resolved, "img")
    assert spec["shadow"] is True and "traffic" not in spec
    assert spec["annotations"] == {
        labels.MODEL_URI: "s3://b/2",
        labels.RESOLVED_FROM: "pinned",
        seldon.NO_ENGINE: "true",
    }


def test_models_must_not_be_empty():
    with pytest.raises(ConfigError, match=r"ml-serving:models: is empty: add at least one entry"):
        parse_settings({"ml-serving:models": {}}, "Pulumi.test.yaml")


def test_a_bentoml_variant_is_a_no_engine_predictor_with_http_probes_on_bentomls_port():
    settings = settings_with(
        variants={
            "a": {"version": "1", "modelUri": "s3://b/1", "weight": 90},
            "b": {"version": "1", "modelUri": "s3://b/1", "weight": 10, "runtime": "bentoml"},
        }
    )
    model = settings.models["m"]
    resolved = ResolvedVersion("1", "s3://b/1", None, None, pinned=True)
    mlserver = seldon.predictor(settings, "m", "a", model.variants["a"], resolved, "img")
    bentoml = seldon.predictor(settings, "m", "b", model.variants["b"], resolved, "img-bento")
    assert bentoml["annotations"][seldon.NO_ENGINE] == mlserver["annotations"][seldon.NO_ENGINE] == "true"
    assert (mlserver["labels"][labels.RUNTIME], bentoml["labels"][labels.RUNTIME]) == ("mlserver", "bentoml")
    (container,) = bentoml["componentSpecs"][0]["spec"]["containers"]
    assert container["name"] == "m", "named like the graph node: Seldon runs it as the model"
    assert container["ports"] == [{"name": "http", "containerPort": 3000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    same = ("resources", "securityContext", "env", "volumeMounts")
    (other,) = mlserver["componentSpecs"][0]["spec"]["containers"]
    assert {k: container[k] for k in same} == {k: other[k] for k in same}, "the same resources, security, settings"
    for key in ("kedaSpec", "pdbSpec"):
        assert bentoml["componentSpecs"][0][key] == mlserver["componentSpecs"][0][key]


def test_the_bentoml_runtime_is_validated_like_every_field():
    with pytest.raises(ConfigError, match=r"models\.m\.variants\.a\.runtime: 'bento' is not allowed"):
        settings_with(variants={"a": {"version": "1", "modelUri": "s3://b/1", "weight": 100, "runtime": "bento"}})
    with pytest.raises(ConfigError, match="no CUDA image yet"):
        settings_with(
            variants={"a": {"version": "1", "modelUri": "s3://b/1", "weight": 100, "runtime": "bentoml", "gpu": 1}}
        )


def test_the_latency_budget_reaches_the_container_and_is_validated():
    from ml_serving.server import MAX_LATENCY_ENV

    model = settings_with(serving={"maxLatencyMs": 2000}).models["m"]
    assert {"name": MAX_LATENCY_ENV, "value": "2000"} in seldon.serving_env(model, "1")
    unset = settings_with().models["m"]
    assert MAX_LATENCY_ENV not in {e["name"] for e in seldon.serving_env(unset, "1")}, "BentoML's own default then"
    for bad, words in ((4, "at least 10"), (120_000, "at most 60000"), ("1s", "not a whole number")):
        with pytest.raises(ConfigError, match=rf"models\.m\.serving\.maxLatencyMs: .*{words}"):
            settings_with(serving={"maxLatencyMs": bad})


def test_a_bentoml_variant_builds_from_its_own_dockerfile_and_requirements():
    from ml_serving.image import ModelEnvironment, build_context

    environment = ModelEnvironment("scikit-learn==1.9.1\n", "3.11.14")
    mlserver, bentoml = build_context(environment), build_context(environment, runtime="bentoml")
    assert b"bentoml serve ml_serving.server.bento:ModelService" in bentoml.files["Dockerfile"].replace(b'", "', b" ")
    assert (
        b"bentoml==" in bentoml.files["requirements-server.txt"]
        and b"mlserver" not in bentoml.files["requirements-server.txt"]
    )
    assert bentoml.files["requirements-model.txt"] == mlserver.files["requirements-model.txt"], "the model's, unchanged"
    assert "app/ml_serving/server/validation.py" in bentoml.files, "the same validation module, not a copy"
    assert bentoml.tag != mlserver.tag
