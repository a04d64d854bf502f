"""The KServe backend under the mock engine: the prod stack with `platform.backend: kserve`, what it declares, and
that it validates against the upstream CRDs (KServe v0.20.0, Istio, KEDA)."""

from __future__ import annotations

import copy
import re

import pytest

from ml_serving import labels
from ml_serving.settings import ConfigError, parse_settings
from ml_serving.specs import kserve, monitoring, seldon
from tests import schemas
from tests.conftest import plan_stack, stack_config

needs_crds = pytest.mark.skipif(not schemas.CRD_DIR.is_dir(), reason=f"upstream CRDs not found at {schemas.CRD_DIR}")


def kserve_config(stack: str = "prod") -> dict:
    """The stack file with the backend switched and nothing else changed (but Seldon's own switch, removed)."""
    config = copy.deepcopy(stack_config(stack))
    platform = {k: v for k, v in config.get("ml-serving:platform", {}).items() if k != "seldon"}
    config["ml-serving:platform"] = {**platform, "backend": "kserve"}
    return config


@pytest.fixture(scope="module")
def kprod():
    return plan_stack("prod", config=kserve_config())


def isvcs(plan, model: str) -> dict[str, dict]:
    return {
        o["metadata"]["labels"][labels.VARIANT]: o
        for o in plan.find("InferenceService")
        if o["metadata"]["labels"][labels.MODEL] == model
    }


@needs_crds
def test_prod_under_kserve_validates_against_the_crds(kprod):
    kinds = {o["kind"] for o in kprod.objects}
    assert {"InferenceService", "VirtualService", "ScaledObject", "PodDisruptionBudget", "PodMonitor"} <= kinds
    assert "SeldonDeployment" not in kinds
    for obj in kprod.objects:
        schemas.validate(obj)
    (isvc, *_) = kprod.find("InferenceService")
    broken = copy.deepcopy(isvc)
    broken["spec"]["predictor"]["minReplica"] = 1
    with pytest.raises(Exception, match="minReplica"):
        schemas.validate(broken)


def test_one_standard_mode_inference_service_per_variant_serving_its_own_image(kprod, prod):
    churn = isvcs(kprod, "churn")
    assert set(churn) == {"champion", "challenger", "mirror"}
    seldon_images = {
        p["name"]: p["componentSpecs"][0]["spec"]["containers"][0]["image"]
        for p in prod.find("SeldonDeployment", "churn")[0]["spec"]["predictors"]
    }
    for variant, isvc in churn.items():
        assert isvc["metadata"]["name"] == f"churn-{variant}"
        notes = isvc["metadata"]["annotations"]
        assert notes[kserve.DEPLOYMENT_MODE] == "Standard" and notes[kserve.AUTOSCALER_CLASS] == "external"
        assert isvc["metadata"]["labels"][kserve.VISIBILITY] == "cluster-local", "no Ingress of KServe's own"
        predictor = isvc["spec"]["predictor"]
        (container,) = predictor["containers"]
        assert container["name"] == "kserve-container"
        assert container["image"] == seldon_images[variant], "the same per-version image as under Seldon"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert container["ports"][0]["name"] == "http", "KServe's Service maps port 80 to the first port"
        if predictor["labels"][labels.RUNTIME] == "bentoml":
            assert ports == {"http": 3000}
        else:
            assert ports == {"http": 9000, "grpc": 9500, "metrics": 8082}
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["STORAGE_URI"] == kprod_uri(variant)
        assert env["MLSERVER_MODEL_URI"] == "/mnt/models" and env["MLSERVER_MODEL_NAME"] == "churn"
        assert env["MLSERVER_METRICS_ENDPOINT"] == monitoring.METRICS_PATH
        assert (
            env["MLSERVER_HTTP_PORT"] == "9000"
            and env["ML_SERVING_MODEL_VERSION"] == {"champion": "7", "challenger": "9", "mirror": "10"}[variant]
        )
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert (
            predictor["securityContext"]["runAsNonRoot"] is True and predictor["automountServiceAccountToken"] is False
        )
        assert predictor["serviceAccountName"] == "mlflow-artifacts-reader", "the team's IRSA account, as under Seldon"
        assert predictor["labels"][labels.MODEL] == "churn" and predictor["labels"][labels.VARIANT] == variant
        assert predictor["minReplicas"] == 2 and predictor["maxReplicas"] == 10


def kprod_uri(variant: str) -> str:
    return stack_config("prod")["ml-serving:models"]["churn"]["variants"][variant]["modelUri"]


def test_pod_labels_are_the_seldon_predictor_labels(kprod, prod):
    sdep = {p["name"]: p for p in prod.find("SeldonDeployment", "churn")[0]["spec"]["predictors"]}
    for variant, isvc in isvcs(kprod, "churn").items():
        assert isvc["spec"]["predictor"]["labels"] == sdep[variant]["labels"]


def test_a_baked_model_downloads_nothing_and_a_gpu_variant_is_scheduled_as_under_seldon(kprod, prod):
    (fraud,) = isvcs(kprod, "fraud").values()
    env = {e["name"]: e["value"] for e in fraud["spec"]["predictor"]["containers"][0]["env"]}
    assert "STORAGE_URI" not in env and env["MLSERVER_MODEL_URI"] == "/app/model"
    assert "serviceAccountName" not in fraud["spec"]["predictor"]
    (gpu,) = isvcs(kprod, "embeddings").values()
    seldon_pod = prod.find("SeldonDeployment", "embeddings")[0]["spec"]["predictors"][0]["componentSpecs"][0]["spec"]
    predictor = gpu["spec"]["predictor"]
    for key in ("tolerations", "affinity", "nodeSelector"):
        assert predictor.get(key) == seldon_pod.get(key), key
    assert predictor["containers"][0]["resources"] == seldon_pod["containers"][0]["resources"]
    assert predictor["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_virtual_service_owns_the_weights_and_mirrors_the_shadow(kprod):
    (vs,) = kprod.find("VirtualService", "churn")
    assert vs["spec"]["gateways"] == ["istio-system/seldon-gateway"] and vs["spec"]["hosts"] == ["models.example.com"]
    (route,) = vs["spec"]["http"]
    assert route["match"] == [{"uri": {"prefix": "/seldon/models/churn/"}}]
    assert route["route"] == [
        {"destination": {"host": "churn-challenger-predictor.models.svc.cluster.local", "port": {"number": 80}}, "weight": 10},
        {"destination": {"host": "churn-champion-predictor.models.svc.cluster.local", "port": {"number": 80}}, "weight": 90},
    ]  # fmt: skip
    assert route["mirrors"] == [
        {"destination": {"host": "churn-mirror-predictor.models.svc.cluster.local", "port": {"number": 80}},
         "percentage": {"value": 100}}
    ]  # fmt: skip
    assert kserve.traffic(vs) == {"champion": 90, "challenger": 10}


def test_a_weight_edit_changes_only_the_virtual_service(kprod):
    config = kserve_config()
    variants = config["ml-serving:models"]["churn"]["variants"]
    variants["champion"]["weight"], variants["challenger"]["weight"] = 75, 25
    edited = plan_stack("prod", config=config)
    before = {(o["kind"], o["metadata"]["name"]): o for o in kprod.objects}
    after = {(o["kind"], o["metadata"]["name"]): o for o in edited.objects}
    assert before.keys() == after.keys()
    changed = {key for key in before if before[key] != after[key]}
    # The traffic alert and dashboard follow the weights under both backends.
    assert {k for k in changed if k[0] not in ("PrometheusRule", "ConfigMap")} == {("VirtualService", "churn")}
    assert kserve.traffic(after[("VirtualService", "churn")]) == {"champion": 75, "challenger": 25}


def test_autoscaling_is_the_scaled_object_seldon_would_make_on_kserves_deployment(kprod, prod):
    sdep = {p["name"]: p for p in prod.find("SeldonDeployment", "churn")[0]["spec"]["predictors"]}
    assert not kprod.find("HorizontalPodAutoscaler")
    for variant in ("champion", "challenger", "mirror"):
        (scaled,) = kprod.find("ScaledObject", f"churn-{variant}-predictor")
        keda = sdep[variant]["componentSpecs"][0]["kedaSpec"]
        assert scaled["spec"] == {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"churn-{variant}-predictor"},
            **keda,
        }
        (pdb,) = kprod.find("PodDisruptionBudget", f"churn-{variant}-predictor")
        assert pdb["spec"] == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {labels.MODEL: "churn", labels.VARIANT: variant}},
        }


def test_hpa_autoscaler_uses_kserves_hpa_class():
    config = kserve_config()
    config["ml-serving:platform"]["autoscaler"] = "hpa"
    for model in config["ml-serving:models"].values():
        model["autoscaling"] = {
            k: v
            for k, v in model["autoscaling"].items()
            if k not in ("scaleUp", "scaleDown", "requestsPerSecondPerReplica")
        }
    plan = plan_stack("prod", config=config)
    assert not plan.find("ScaledObject")
    isvc = isvcs(plan, "churn")["champion"]
    assert isvc["metadata"]["annotations"][kserve.AUTOSCALER_CLASS] == "hpa"
    assert isvc["spec"]["predictor"]["autoScaling"]["metrics"] == [
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}},
        {"type": "Resource", "resource": {"name": "memory", "target": {"type": "Utilization", "averageUtilization": 80}}},
    ]  # fmt: skip
    if schemas.CRD_DIR.is_dir():
        schemas.validate(isvc)


def test_kserve_installs_no_seldon_operator(kprod):
    assert "seldon-core" not in {r["name"] for r in kprod.releases}
    assert "keda" in {r["name"] for r in kprod.releases}


def test_the_pod_monitor_keeps_kserves_container(kprod):
    (monitor,) = kprod.find("PodMonitor")
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        (keep,) = [r for r in endpoint["relabelings"] if r["sourceLabels"] == [monitoring.CONTAINER_NAME]]
        assert re.fullmatch(keep["regex"], "kserve-container") and not re.fullmatch(keep["regex"], "churn")


def test_backend_is_validated_like_every_field():
    config = kserve_config()
    config["ml-serving:platform"]["backend"] = "kserv"
    with pytest.raises(ConfigError, match=r"platform\.backend.*seldon.*kserve"):
        parse_settings(config, "Pulumi.prod.yaml")
    config = kserve_config()
    config["ml-serving:platform"]["seldon"] = "install"
    with pytest.raises(ConfigError, match=r"platform\.seldon.*remove platform\.seldon"):
        parse_settings(config, "Pulumi.prod.yaml")
    config = kserve_config()
    config["ml-serving:platform"]["autoscaler"] = "hpa"
    with pytest.raises(ConfigError, match=r"requestsPerSecondPerReplica: KServe's HPA scales on cpu and memory"):
        parse_settings(config, "Pulumi.prod.yaml")
    del config["ml-serving:models"]["churn"]["autoscaling"]["requestsPerSecondPerReplica"]
    with pytest.raises(ConfigError, match=r"scaleDown: KServe's HPA \(v0.20\) has no scaling behaviour"):
        parse_settings(config, "Pulumi.prod.yaml")


def test_default_backend_is_seldon():
    settings = parse_settings(stack_config("prod"), "Pulumi.prod.yaml")
    assert settings.platform.backend == "seldon"


def test_a_stack_account_carries_kserves_s3_annotations_and_keys():
    config = kserve_config()
    config["ml-serving:artifactStore"] = {
        "rclone": {
            "RCLONE_CONFIG_S3_TYPE": "s3",
            "RCLONE_CONFIG_S3_REGION": "eu-west-1",
            "RCLONE_CONFIG_S3_ENDPOINT": "https://s3.internal:9000",
            "RCLONE_CONFIG_S3_ACCESS_KEY_ID": "AKIA",
            "RCLONE_CONFIG_S3_SECRET_ACCESS_KEY": "s3cret",
        }
    }
    settings = parse_settings(config, "Pulumi.prod.yaml")
    account = kserve.service_account(settings)
    assert account["metadata"]["annotations"] == {
        "serving.kserve.io/s3-region": "eu-west-1",
        "serving.kserve.io/s3-endpoint": "s3.internal:9000",
        "serving.kserve.io/s3-usehttps": "1",
    }
    assert account["secrets"] == [{"name": kserve.S3_SECRET}]
    assert kserve.s3_secret(settings)["stringData"] == {"awsAccessKeyID": "AKIA", "awsSecretAccessKey": "s3cret"}
    plan = plan_stack("prod", config=config)
    (sa,) = plan.find("ServiceAccount", kserve.SERVICE_ACCOUNT)
    assert sa["metadata"]["annotations"]["serving.kserve.io/s3-region"] == "eu-west-1"
    assert plan.find("Secret", kserve.S3_SECRET) and not plan.find("Secret", seldon.ARTIFACT_SECRET)
    assert isvcs(plan, "churn")["champion"]["spec"]["predictor"]["serviceAccountName"] == kserve.SERVICE_ACCOUNT
    if schemas.CRD_DIR.is_dir():
        for obj in plan.objects:
            schemas.validate(obj)


def test_a_name_kserve_would_make_too_long_is_refused_naming_the_variant():
    settings = parse_settings(kserve_config(), "Pulumi.prod.yaml")
    long_model = "m" * 50
    models = {long_model: settings.models["fraud"]}
    settings = settings.model_copy(update={"models": models})
    with pytest.raises(kserve.KServeConfigError, match=rf"models\.{long_model}\.variants\.champion: .*shorten"):
        kserve.check(settings, lambda m, v: None)


def test_plan_lists_each_variant_with_its_share_under_kserve(tmp_path):
    import yaml

    from tests.conftest import copy_project
    from tests.test_cli import ml_serving

    project = copy_project(tmp_path / "project")
    path = project / "Pulumi.prod.yaml"
    path.write_text(path.read_text().replace("    seldon: install\n", "    backend: kserve\n"))
    run = ml_serving("plan", "prod", cwd=project, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert run.returncode == 0, run.stderr
    rows = {
        line.split("│")[2].strip(): line for line in run.stdout.splitlines() if "│ churn " in line and "pinned" in line
    }
    assert "90%" in rows["champion"] and "10%" in rows["challenger"] and "shadow" in rows["mirror"]
    vs = yaml.safe_load((project / "rendered" / "prod" / "virtualservice_models_churn.yaml").read_text())
    assert kserve.traffic(vs) == {"champion": 90, "challenger": 10}
