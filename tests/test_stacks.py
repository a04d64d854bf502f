"""The real __main__.py with the real Pulumi.<stack>.yaml under Pulumi's mock engine: what each stack declares."""

from __future__ import annotations

import re

import pytest

from ml_serving import labels
from tests import schemas
from tests.conftest import plan_stack

needs_crds = pytest.mark.skipif(not schemas.CRD_DIR.is_dir(), reason=f"upstream CRDs not found at {schemas.CRD_DIR}")


def predictors(plan, model):
    (sdep,) = plan.find("SeldonDeployment", model)
    return {p["name"]: p for p in sdep["spec"]["predictors"]}


@needs_crds
@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_every_object_validates_against_its_schema(stack, request):
    plan = request.getfixturevalue(stack)
    assert plan.objects, "the stack declares no Kubernetes objects"
    for obj in plan.objects:
        schemas.validate(obj)


def test_validation_catches_a_misspelt_field(prod):
    """The schema check itself must fail on a typo, or the test above proves nothing."""
    (sdep,) = prod.find("SeldonDeployment", "churn")
    broken = {**sdep, "spec": {**sdep["spec"], "predictors": [{**sdep["spec"]["predictors"][0], "trafic": 5}]}}
    if schemas.CRD_DIR.is_dir():
        with pytest.raises(Exception, match="trafic"):
            schemas.validate(broken)
    with pytest.raises(Exception, match="labelz"):
        schemas.validate({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "labelz": {}}})


def test_prod_splits_traffic_90_10_and_mirrors_the_shadow(prod):
    churn = predictors(prod, "churn")
    assert churn["champion"]["traffic"] == 90
    assert churn["challenger"]["traffic"] == 10
    assert churn["mirror"]["shadow"] is True
    assert "traffic" not in churn["mirror"]
    assert {p["graph"]["modelUri"] for p in churn.values()} == {
        "s3://mlflow-artifacts/3/models/m-6f1c2a9e0b7d4e53a1c8f2d4b6e09a17/artifacts",
        "s3://mlflow-artifacts/3/models/m-a47d0c3e91b24f6d8e5a2c7b1f3d9e60/artifacts",
        "s3://mlflow-artifacts/3/models/m-c3e5a7b9d1f2468a0b2c4d6e8f1a3b5c/artifacts",
    }


def test_predictors_carry_model_variant_and_version_labels(prod):
    for name, predictor in predictors(prod, "churn").items():
        assert predictor["labels"][labels.MODEL] == "churn"
        assert predictor["labels"][labels.VARIANT] == name
        assert predictor["labels"][labels.REGISTERED_MODEL] == "churn-classifier"
    churn = predictors(prod, "churn")
    assert churn["challenger"]["labels"][labels.MODEL_VERSION] == "9"
    assert churn["challenger"]["annotations"][labels.RUN_ID] == "5d2f9b1e7a3c4d6e8f0a1b2c3d4e5f60"
    assert churn["challenger"]["annotations"][labels.RESOLVED_FROM] == "pinned from @challenger"


def test_seldon_deployment_serves_v2_with_the_built_image(prod):
    (sdep,) = prod.find("SeldonDeployment", "churn")
    assert sdep["spec"]["protocol"] == "v2"
    assert sdep["metadata"]["annotations"]["seldon.io/istio-gateway"] == "istio-system/seldon-gateway"
    images = set(prod.image_refs)
    for predictor in sdep["spec"]["predictors"]:
        graph = predictor["graph"]
        assert "implementation" not in graph, "a custom server: Seldon runs our container as it is"
        (container,) = predictor["componentSpecs"][0]["spec"]["containers"]
        assert container["name"] == graph["name"], "Seldon runs the container named like the graph node"
        assert container["image"] in images
        assert container["image"].startswith("registry.example.com/ml-serving/churn@sha256:"), "pushed: by digest"
        if predictor["labels"][labels.RUNTIME] == "bentoml":  # prod's shadow: README, 'Two runtimes'
            assert predictor["name"] == "mirror" and predictor["shadow"] is True
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        else:
            assert {"name": "metrics", "containerPort": 8082, "protocol": "TCP"} in container["ports"]
            assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
            assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        assert container["resources"] == {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "500m", "memory": "1Gi"},
        }


def test_serving_pods_are_locked_down(prod, dev):
    for plan in (prod, dev):
        for sdep in plan.find("SeldonDeployment"):
            for predictor in sdep["spec"]["predictors"]:
                pod = predictor["componentSpecs"][0]["spec"]
                assert pod["securityContext"]["runAsNonRoot"] is True
                for container in pod["containers"]:
                    context = container["securityContext"]
                    assert context["readOnlyRootFilesystem"] is True
                    assert context["allowPrivilegeEscalation"] is False
                    assert context["capabilities"] == {"drop": ["ALL"]}


def test_autoscaling_goes_through_seldon_keda_spec_not_a_separate_hpa(prod):
    assert not prod.find("HorizontalPodAutoscaler"), "an external HPA would fight the Seldon operator"
    assert not prod.find("ScaledObject"), "Seldon creates the ScaledObject from kedaSpec"
    component = predictors(prod, "churn")["champion"]["componentSpecs"][0]
    keda = component["kedaSpec"]
    assert "hpaSpec" not in component
    assert (keda["minReplicaCount"], keda["maxReplicaCount"]) == (2, 10)
    resources = {t["type"]: t["metadata"]["value"] for t in keda["triggers"] if t["type"] in ("cpu", "memory")}
    assert resources == {"cpu": "70", "memory": "80"}
    behavior = keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert behavior["scaleUp"]["policies"] == [{"type": "Pods", "value": 4, "periodSeconds": 60}]
    assert component["pdbSpec"] == {"maxUnavailable": 1}


def test_hpa_fallback_uses_seldon_hpa_spec(prod):
    from tests.conftest import stack_config

    config = stack_config("prod")
    config["ml-serving:platform"] = {**config["ml-serving:platform"], "autoscaler": "hpa"}
    for model in config["ml-serving:models"].values():
        model["autoscaling"] = {k: v for k, v in model["autoscaling"].items() if k not in ("scaleUp", "scaleDown")}
    plan = plan_stack("prod", config=config)
    component = predictors(plan, "churn")["champion"]["componentSpecs"][0]
    assert "kedaSpec" not in component
    assert component["hpaSpec"] == {
        "minReplicas": 2,
        "maxReplicas": 10,
        "metrics": [
            {"type": "Resource", "resource": {"name": "cpu", "targetAverageUtilization": 70}},
            {"type": "Resource", "resource": {"name": "memory", "targetAverageUtilization": 80}},
            {"type": "Pods", "pods": {"metricName": "ml_serving_requests_per_second", "targetAverageValue": "50"}},
        ],
    }
    (adapter,) = [r for r in plan.releases if r["name"] == "prometheus-adapter"]
    (rule,) = adapter["values"]["rules"]["custom"]
    assert rule["name"]["as"] == "ml_serving_requests_per_second"
    assert "rest_server_requests_total" in rule["seriesQuery"]
    (release,) = [r for r in plan.releases if r["name"] == "seldon-core"]
    assert release["values"]["keda"]["enabled"] is False
    if schemas.CRD_DIR.is_dir():
        for obj in plan.objects:
            schemas.validate(obj)


def test_prod_installs_the_platform_pinned(prod):
    releases = {r["name"]: r for r in prod.releases}
    assert releases["seldon-core"]["chart"] == "seldon-core-operator"
    assert releases["seldon-core"]["version"] == "1.18.2"
    assert releases["seldon-core"]["values"]["istio"] == {"enabled": True, "gateway": "istio-system/seldon-gateway"}
    assert releases["seldon-core"]["values"]["keda"] == {"enabled": True}
    assert releases["keda"]["chart"] == "keda"
    (gateway,) = prod.find("Gateway")
    assert (gateway["metadata"]["namespace"], gateway["metadata"]["name"]) == ("istio-system", "seldon-gateway")
    # The charts' namespaces too, so `destroy` removes them (tests/test_charts.py).
    assert sorted(ns["metadata"]["name"] for ns in prod.find("Namespace")) == [
        "keda", "models", "monitoring", "nvidia-dcgm-exporter", "nvidia-device-plugin", "seldon-system"
    ]  # fmt: skip


def test_dev_targets_the_kube_context_with_one_variant_resolved_from_the_registry(dev, registry):
    assert not dev.releases, "dev assumes Seldon and KEDA are there: no chart downloads"
    (provider,) = dev.components("pulumi:providers:kubernetes")
    assert "renderYamlToDirectory" not in provider.inputs, "dev talks to the current kube context"
    assert not dev.images, "servingImage.build: false: the image is built outside `pulumi up`"
    champion = predictors(dev, "churn")["champion"]
    image = champion["componentSpecs"][0]["spec"]["containers"][0]["image"]
    assert re.fullmatch(r"ml-serving-dev/churn:[0-9a-f]{16}", image), "the same content-addressed tag CI builds"
    assert champion["traffic"] == 100
    assert champion["labels"][labels.MODEL_VERSION] == "1"
    assert champion["annotations"][labels.RESOLVED_FROM] == "@champion"
    assert champion["graph"]["modelUri"].startswith((registry.root / "artifacts").as_uri())
    assert len(champion["annotations"][labels.RUN_ID]) == 32


def test_components_use_the_project_type_tokens(prod):
    types = {r.type for r in prod.resources if not r.custom}
    assert {
        "ml-serving:platform:ServingPlatform",
        "ml-serving:serving:ModelDeployment",
        "ml-serving:image:ServingImage",
        "ml-serving:gpu:GpuNodePool",
    } <= types
    assert len(prod.components("ml-serving:serving:ModelDeployment")) == 3


def test_each_predictor_tells_its_server_the_registry_version(prod):
    """Seldon sets MLSERVER_MODEL_VERSION=v1 for every predictor; the server answers as the registry's version."""
    from ml_serving.server import VERSION_ENV

    for name, predictor in predictors(prod, "churn").items():
        (container,) = predictor["componentSpecs"][0]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env[VERSION_ENV] == predictor["labels"][labels.MODEL_VERSION], name
