"""What a real cluster needs beyond schemas: storage credentials, scraping the DCGM exporter, who may reach the
pods (NetworkPolicy, mTLS, access policy, HTTPS), no service-account token, one chart list, checkov on the pods."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pulumi
import pytest
import yaml

from ml_serving import labels
from ml_serving.image import METRICS_PORT
from ml_serving.plan import revealed, run_program
from ml_serving.specs import charts, seldon
from ml_serving.stackfile import load_settings
from tests import operator_fixtures
from tests.conftest import PROJECT_DIR, stack_config

seldon_operator = operator_fixtures.seldon_operator  # the operator fixtures, for the checkov test
prod_reconciled = operator_fixtures.prod_reconciled


def predictors(plan):
    return [(s["metadata"]["name"], p) for s in plan.find("SeldonDeployment") for p in s["spec"]["predictors"]]


# 1. The artifact store -------------------------------------------------------------------------------------------


def test_pods_that_download_from_s3_carry_the_credentials_and_the_account(prod):
    for model, predictor in predictors(prod):
        graph, pod = predictor["graph"], predictor["componentSpecs"][0]["spec"]
        if "modelUri" not in graph:  # a baked model: nothing to download, no credentials
            assert model == "fraud" and "initContainers" not in pod and "serviceAccountName" not in pod
            continue
        assert graph["modelUri"].startswith("s3://")
        (initializer,) = pod["initContainers"]
        assert initializer["name"] == seldon.initializer_name(model), "the operator then injects none of its own"
        assert initializer["envFrom"] == [{"secretRef": {"name": seldon.ARTIFACT_SECRET}}], (
            f"{model}/{predictor['name']}"
        )
        assert pod["serviceAccountName"] == "mlflow-artifacts-reader", "IRSA: the pod's account, not the graph's"
        assert "serviceAccountName" not in graph and "envSecretRefName" not in graph, "the operator would use neither"
    (secret,) = prod.find("Secret", seldon.ARTIFACT_SECRET)
    data = revealed(secret).get("stringData", {})
    assert data["RCLONE_CONFIG_S3_TYPE"] == "s3" and data["RCLONE_CONFIG_S3_ENV_AUTH"] == "true"
    assert secret["metadata"]["namespace"] == "models"


def test_the_initializer_reaches_the_store_past_the_sidecar_and_passes_pod_security(prod):
    """Istio never redirects its proxy's UID (1337): the init container downloads before any sidecar runs."""
    initializers = [i for _, p in predictors(prod) for i in p["componentSpecs"][0]["spec"].get("initContainers", [])]
    assert len(initializers) == 4, "every downloading predictor declares it (fraud's model is baked)"
    for initializer in initializers:
        assert initializer["securityContext"] == {
            "runAsUser": seldon.ISTIO_PROXY_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert initializer["image"] == seldon.STORAGE_INITIALIZER_IMAGE


def _refused(config: dict) -> str:
    declared: list = []
    with pytest.raises(pulumi.RunError) as raised:
        run_program(PROJECT_DIR, "prod", config=config, declared=declared)
    assert not [d for d in declared if d.custom], "nothing may be declared"
    return str(raised.value)


def test_an_s3_model_uri_without_credentials_is_a_config_error_naming_the_fix():
    config = copy.deepcopy(stack_config("prod"))
    del config["ml-serving:artifactStore"]
    message = _refused(config)
    assert message.startswith("Pulumi.prod.yaml: ml-serving:models.churn.variants.champion:")
    assert "set ml-serving:artifactStore" in message and "serving.bake: true" in message
    assert "Traceback" not in message


def test_an_rclone_config_without_the_uri_s_remote_is_refused():
    config = copy.deepcopy(stack_config("prod"))
    config["ml-serving:artifactStore"]["rclone"] = {"RCLONE_CONFIG_GS_TYPE": "google cloud storage"}
    message = _refused(config)
    assert "ml-serving:artifactStore.rclone: defines no rclone remote 's3'" in message
    assert "RCLONE_CONFIG_S3_TYPE" in message


def test_baked_models_need_no_credentials():
    config = copy.deepcopy(stack_config("prod"))
    del config["ml-serving:artifactStore"]
    for model in config["ml-serving:models"].values():
        model.setdefault("serving", {})["bake"] = True
    plan = run_program(PROJECT_DIR, "prod", config=config)
    assert all("initContainers" not in p["componentSpecs"][0]["spec"] for _, p in predictors(plan))
    assert not plan.find("Secret", seldon.ARTIFACT_SECRET)


# 2-3. Scraping ---------------------------------------------------------------------------------------------------


def test_a_monitor_the_prometheus_selects_scrapes_the_dcgm_exporter(prod):
    releases = {r["name"]: r for r in prod.releases}
    monitor = releases["dcgm-exporter"]["values"]["serviceMonitor"]
    prometheus = releases["kube-prometheus-stack"]["values"]["prometheus"]["prometheusSpec"]
    assert monitor["enabled"] is True
    # Every ServiceMonitor (tests/test_charts.py checks the rendered Prometheus); the labels still say whose it is.
    assert prometheus["serviceMonitorSelectorNilUsesHelmValues"] is False and "serviceMonitorSelector" not in prometheus
    assert monitor["additionalLabels"] == {"release": "kube-prometheus-stack"}
    assert monitor["honorLabels"] is True, "the exporter's namespace/pod labels join GPU use to the serving pods"


# 4-5, 11. Who may reach the pods --------------------------------------------------------------------------------


def test_the_models_namespace_denies_ingress_except_what_serving_needs(prod):
    policies = {p["metadata"]["name"]: p for p in prod.find("NetworkPolicy")}
    deny = policies.pop("ml-serving-default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}, "every pod, no ingress rule: nothing allowed"
    opened = {}
    for name, policy in policies.items():
        spec = policy["spec"]
        sources = {
            rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]: {
                p["port"] for p in rule["ports"]
            }
            for rule in spec["ingress"]
        }
        opened[(name, spec["podSelector"]["matchLabels"][labels.RUNTIME])] = sources
    assert opened == {
        ("ml-serving-allow-serving", "mlserver"): {"istio-system": {9000, 9500}, "monitoring": {METRICS_PORT}},
        ("ml-serving-allow-bentoml", "bentoml"): {"istio-system": {3000}, "monitoring": {3000}},
    }, "no executor ports (8000/5001): every predictor is no-engine"
    assert all(p["metadata"]["namespace"] == "models" for p in prod.find("NetworkPolicy"))


def test_the_models_namespace_injects_sidecars_and_enforces_pod_security_restricted(prod, dev):
    for plan in (prod, dev):
        (namespace,) = [n for n in plan.find("Namespace") if n["metadata"]["name"].startswith("models")]
        found = namespace["metadata"]["labels"]
        assert found["istio-injection"] == "enabled"
        assert {k: v for k, v in found.items() if k.startswith("pod-security")} == {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted",
            "pod-security.kubernetes.io/audit": "restricted",
        }


def test_a_revision_labels_the_namespace_for_that_istiod_and_mtls_off_injects_nothing():
    config = copy.deepcopy(stack_config("prod"))
    config["ml-serving:security"]["istioRevision"] = "1-24"
    (namespace,) = run_program(PROJECT_DIR, "prod", config=config).find("Namespace", "models")
    assert namespace["metadata"]["labels"]["istio.io/rev"] == "1-24"
    assert "istio-injection" not in namespace["metadata"]["labels"]
    config["ml-serving:security"] = {"mtls": "off"}
    (namespace,) = run_program(PROJECT_DIR, "prod", config=config).find("Namespace", "models")
    assert not {"istio.io/rev", "istio-injection"} & set(namespace["metadata"]["labels"])


def test_the_gateway_principal_is_stack_config_defaulting_to_istioctl_s_account():
    config = copy.deepcopy(stack_config("prod"))
    config["ml-serving:security"]["gatewayServiceAccount"] = "istio-ingressgateway"  # Helm: named after the release
    (policy,) = run_program(PROJECT_DIR, "prod", config=config).find("AuthorizationPolicy")
    (source,) = policy["spec"]["rules"][0]["from"]
    assert source["source"]["principals"] == ["cluster.local/ns/istio-system/sa/istio-ingressgateway"]


def test_network_policies_can_be_switched_off_for_clusters_whose_cni_ignores_them():
    config = copy.deepcopy(stack_config("prod"))
    config["ml-serving:security"]["networkPolicies"] = False
    assert not run_program(PROJECT_DIR, "prod", config=config).find("NetworkPolicy")


def test_model_pods_mount_no_service_account_token(prod):
    for model, predictor in predictors(prod):
        for component in predictor["componentSpecs"]:
            assert component["spec"]["automountServiceAccountToken"] is False, f"{model}/{predictor['name']}"


def test_prod_gateway_serves_https_for_its_hosts_and_redirects_http(prod, dev):
    (gateway,) = prod.find("Gateway")
    servers = {s["port"]["protocol"]: s for s in gateway["spec"]["servers"]}
    assert set(servers) == {"HTTPS", "HTTP"}
    assert servers["HTTPS"]["hosts"] == ["models.example.com"] and servers["HTTPS"]["port"]["number"] == 443
    assert servers["HTTPS"]["tls"]["mode"] == "SIMPLE" and servers["HTTPS"]["tls"]["credentialName"]
    assert servers["HTTP"]["tls"] == {"httpsRedirect": True}, "port 80 only redirects"
    (local,) = dev.find("Gateway")
    assert [s["port"]["protocol"] for s in local["spec"]["servers"]] == ["HTTP"], "dev: a local sandbox"


def test_mesh_mtls_is_strict_and_only_the_gateway_with_a_valid_token_reaches_a_model(prod):
    peer = {p["metadata"]["name"]: p["spec"] for p in prod.find("PeerAuthentication")}
    assert peer["default"] == {"mtls": {"mode": "STRICT"}}, "namespace-wide"
    for model in ("churn", "fraud", "embeddings"):  # Prometheus has no sidecar: the metrics port stays plain
        assert peer[f"ml-serving-metrics-{model}"]["portLevelMtls"] == {str(METRICS_PORT): {"mode": "PERMISSIVE"}}
    assert peer["ml-serving-metrics-churn-bentoml"]["portLevelMtls"] == {"3000": {"mode": "PERMISSIVE"}}
    (authn,) = prod.find("RequestAuthentication")
    (rule,) = authn["spec"]["jwtRules"]
    assert rule["issuer"] == "https://auth.example.com" and rule["jwksUri"].startswith("https://")
    (policy,) = prod.find("AuthorizationPolicy")
    assert policy["spec"]["action"] == "ALLOW"
    serving, metrics_only, bentoml_metrics = policy["spec"]["rules"]
    (source,) = serving["from"]
    assert source["source"]["principals"] == ["cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]
    assert source["source"]["requestPrincipals"] == ["https://auth.example.com/*"], "a token of the issuer"
    assert serving["to"][0]["operation"]["ports"] == ["9000", "9500", "3000"], "what the operator routes to"
    assert metrics_only == {"to": [{"operation": {"ports": [str(METRICS_PORT)]}}]}
    assert bentoml_metrics == {"to": [{"operation": {"ports": ["3000"], "paths": ["/metrics"], "methods": ["GET"]}}]}


# 6. One owner for the chart list -------------------------------------------------------------------------------


@pytest.mark.parametrize("autoscaler", ["keda", "hpa"])
def test_the_stack_installs_exactly_the_charts_the_one_list_returns(autoscaler):
    config = copy.deepcopy(stack_config("prod"))
    config["ml-serving:platform"]["autoscaler"] = autoscaler
    if autoscaler == "hpa":
        for model in config["ml-serving:models"].values():
            model["autoscaling"].pop("scaleUp", None)
            model["autoscaling"].pop("scaleDown", None)
    plan = run_program(PROJECT_DIR, "prod", config=config)
    settings = load_settings(PROJECT_DIR, "prod").model_copy(
        update={"platform": load_settings(PROJECT_DIR, "prod").platform.model_copy(update={"autoscaler": autoscaler})}
    )
    listed = sorted(r.chart.release for r in charts.charts(settings))
    assert sorted(r["name"] for r in plan.releases) == listed
    assert ("prometheus-adapter" in listed) == (autoscaler == "hpa")


# 8. checkov on what the operator makes of the pods (tests/operator_fixtures.py) ----------------------------------------------------------------------------

CHECKOV_SKIPS = {
    "CKV_K8S_15": "a content-addressed tag never changes, so IfNotPresent pulls exactly the image declared",
    # Seen only on the operator's real Deployments (the synthesized templates lacked the initializer):
    "CKV_K8S_35": "rclone takes its remotes from RCLONE_CONFIG_* variables (envFrom the artifact-store Secret, as "
    "Seldon's initializer gets them); with IRSA, prod's Secret holds no key, only the remote's type and region",
}
# Our model containers are named by digest (pushed images); the containers the operator injects are not.
OPERATOR_SKIPS = {
    "CKV_K8S_43": "the executor and storage initializer the operator injects are named by tag by Seldon's chart "
    "(seldon-config); the test asserts the model container is `repo@sha256:…` itself",
}


def checkov() -> str:
    found = shutil.which("checkov") or str(Path.home() / ".cache" / "ml-serving" / "checkov" / "bin" / "checkov")
    if not Path(found).exists():
        pytest.skip("checkov not installed (.ci/run installs it into ~/.cache/ml-serving/checkov)")
    return found


def operator_deployments(stack) -> list[dict]:
    """The Deployments the real operator made of prod's SeldonDeployments, as manifests (no status)."""
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {k: d["metadata"][k] for k in ("name", "namespace", "labels")},
            "spec": d["spec"],
        }
        for d in stack.deployments()
    ]


@pytest.mark.operator
def test_checkov_finds_nothing_in_the_operator_s_deployments_beyond_the_written_skips(prod_reconciled, tmp_path):
    prod = prod_reconciled.plan
    deployments = operator_deployments(prod_reconciled)
    objects = deployments + [
        o for o in prod.objects if o["kind"] in ("NetworkPolicy", "Namespace", "ConfigMap", "Secret")
    ]
    (tmp_path / "objects.yaml").write_text(yaml.safe_dump_all(json.loads(json.dumps(revealed(objects)))))
    run = subprocess.run(
        [checkov(), "-d", str(tmp_path), "--framework", "kubernetes", "--compact", "-o", "json",
         "--skip-check", ",".join(CHECKOV_SKIPS | OPERATOR_SKIPS)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    reports = json.loads(run.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(f["check_id"], f["resource"]) for r in reports for f in r["results"]["failed_checks"]]
    assert not failed, failed
    passed = {(f["check_id"], f["resource"]) for r in reports for f in r["results"]["passed_checks"]}
    assert len(deployments) == 5, "one per predictor"
    for deployment in deployments:  # the model container runs exactly what was pushed
        images = {c["name"]: c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
        assert sum("@sha256:" in image for image in images.values()) == 1, images
    for deployment in deployments:  # every Deployment was read: the token, UID, root fs, probe checks
        resource = f"Deployment.{deployment['metadata']['namespace']}.{deployment['metadata']['name']}"
        for check in ("CKV_K8S_38", "CKV_K8S_40", "CKV_K8S_22", "CKV_K8S_8"):
            assert (check, resource) in passed, (check, resource)
