"""What the real Seldon Core v1.18.2 operator makes of the stack's SeldonDeployments, checked against the stack.

Needs the API server and the operator `./run tools` builds (tests/operator_fixtures.py); `.ci/run` fails these
tests when a tool is missing, `./run test` skips them with the reason.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from typing import Any

import pytest

from ml_serving import labels
from ml_serving.rollout import stage_weights, write_weights
from ml_serving.specs import monitoring, platform, security, seldon
from ml_serving.stackfile import read_config
from tests import operator_fixtures
from tests.conftest import PROJECT_DIR
from tests.operator_fixtures import Reconciled, reconciled

pytestmark = pytest.mark.operator
seldon_operator = operator_fixtures.seldon_operator  # the fixtures, for this module
prod_reconciled = operator_fixtures.prod_reconciled
CHURN = "churn"
GRPC_ROUTE = 1  # the operator's VirtualService: route 0 is HTTP (/seldon/<ns>/<name>/), route 1 gRPC (by headers)


def template(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return template(deployment)["metadata"]["labels"]


def model_container(deployment: dict[str, Any]) -> dict[str, Any]:
    key = pod_labels(deployment)[labels.MODEL]
    (container,) = [c for c in template(deployment)["spec"]["containers"] if c["name"] == key]
    return container


def by_predictor(stack: Reconciled) -> dict[tuple[str, str], dict[str, Any]]:
    """The operator's Deployments by (model, variant), from the labels it copies from each predictor."""
    found = {}
    for deployment in stack.deployments():
        pod = pod_labels(deployment)
        found[(pod[labels.MODEL], pod[labels.VARIANT])] = deployment
    return found


def selects(selector: dict[str, Any], found: dict[str, str]) -> bool:
    """A label selector (matchLabels, matchExpressions with In/Exists) against labels."""
    if any(found.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        value = found.get(expression["key"])
        if expression["operator"] == "Exists" and value is None:
            return False
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
    return True


# 2. What the operator generates -------------------------------------------------------------------------------


def test_each_predictor_gets_a_deployment_services_a_pdb_and_a_scaled_object(prod_reconciled):
    stack = prod_reconciled
    deployments = by_predictor(stack)
    wanted = {
        (s["metadata"]["name"], p["name"]) for s in stack.plan.find("SeldonDeployment") for p in s["spec"]["predictors"]
    }
    assert set(deployments) == wanted
    services = {s["metadata"]["name"]: s for s in stack.items("v1", "Service")}
    pdbs = {p["metadata"]["name"] for p in stack.items("policy/v1", "PodDisruptionBudget")}
    scaled = {s["metadata"]["name"]: s for s in stack.items("keda.sh/v1alpha1", "ScaledObject")}
    for (model, variant), deployment in deployments.items():
        name = deployment["metadata"]["name"]
        assert f"{model}-{variant}" in services, "the predictor's Service, which the VirtualService routes to"
        assert name in pdbs and name in scaled, name
        assert scaled[name]["spec"]["scaleTargetRef"]["name"] == name
        container = model_container(deployment)
        settings_model = stack.settings.models[model]
        variant_spec = settings_model.variants[variant]
        assert container["image"].startswith("registry.example.com/ml-serving/")
        assert container["resources"]["requests"]["memory"] == settings_model.resources.memory
        pod = pod_labels(deployment)
        assert pod[labels.RUNTIME] == variant_spec.runtime and pod[labels.MODEL_VERSION] == variant_spec.version
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if variant_spec.runtime == "bentoml":
            assert ports["http"] == seldon.BENTOML_PORT and container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        else:
            assert (ports["http"], ports["grpc"]) == seldon.MODEL_PORTS and ports["metrics"] == seldon.METRICS_PORT
            assert env["MLSERVER_HTTP_PORT"] == str(seldon.MODEL_PORTS[0])
            assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert [c["name"] for c in template(deployment)["spec"]["containers"]] == [model], "no executor: no-engine"


def _weights(vs: dict[str, Any], namespace: str) -> tuple[dict[str, int], str | None]:
    """The VirtualService's HTTP route weights by predictor, and the predictor it mirrors to."""
    route = vs["spec"]["http"][0]
    weights = {d["destination"]["subset"]: d.get("weight", 0) for d in route["route"]}
    mirror = route.get("mirror", {}).get("subset")
    return weights, mirror


def _configured(stack: Reconciled, model: str) -> tuple[dict[str, int], str | None]:
    variants = stack.settings.models[model].variants
    shadows = [n for n, v in variants.items() if v.shadow]
    return {n: v.weight for n, v in variants.items() if not v.shadow}, (shadows[0] if shadows else None)


def test_the_virtual_service_routes_the_configured_weights_and_mirrors_the_shadow(prod_reconciled):
    stack = prod_reconciled
    for sdep in stack.plan.find("SeldonDeployment"):
        model = sdep["metadata"]["name"]
        vs = stack.virtual_service(model)
        assert _weights(vs, stack.namespace) == _configured(stack, model), model
        assert vs["spec"]["gateways"] == [stack.settings.platform.gateway]
    rules = {r["metadata"]["name"] for r in stack.items("networking.istio.io/v1beta1", "DestinationRule")}
    assert {f"{CHURN}-{v}" for v in stack.settings.models[CHURN].variants} <= rules


def test_weights_follow_a_weight_edit_and_a_rollout_step(cluster, seldon_operator, tmp_path):
    stack = reconciled(cluster, seldon_operator, "models-weights")

    def edited(config: dict[str, Any], weights: dict[str, int]) -> dict[str, Any]:
        changed = copy.deepcopy(config)
        for name, weight in weights.items():
            changed["ml-serving:models"][CHURN]["variants"][name]["weight"] = weight
        return changed

    stack.apply(edited(stack.config, {"champion": 75, "challenger": 25}))
    stack.mark_available()
    want = _configured(stack, CHURN)
    assert want[0] == {"champion": 75, "challenger": 25}
    stack.virtual_service(CHURN, lambda vs: _weights(vs, stack.namespace) == want)

    # A rollout step writes the stage's weights into the stack file with the rollout's own code.
    path = tmp_path / "Pulumi.prod.yaml"
    shutil.copy(PROJECT_DIR / "Pulumi.prod.yaml", path)
    model = stack.settings.models[CHURN]
    write_weights(path, CHURN, stage_weights(model, model.rollout, 50))
    config, _ = read_config(path)
    config["ml-serving:namespace"] = stack.namespace
    stack.apply(config)
    stack.mark_available()
    want = _configured(stack, CHURN)
    assert want[0] == {"champion": 50, "challenger": 50}
    stack.virtual_service(CHURN, lambda vs: _weights(vs, stack.namespace) == want)


# 3a, 3i. The namespace: sidecars, Pod Security ---------------------------------------------------------------


def test_the_models_namespace_gets_sidecars_and_enforces_pod_security_restricted(prod_reconciled):
    from kubernetes import client

    found = client.CoreV1Api(prod_reconciled.cluster.api_client()).read_namespace(prod_reconciled.namespace)
    namespace_labels = found.metadata.labels
    assert namespace_labels[platform.ISTIO_INJECTION] == "enabled", "STRICT mTLS and the policies need a sidecar"
    for mode in ("enforce", "warn", "audit"):
        assert namespace_labels[f"{platform.POD_SECURITY}/{mode}"] == "restricted"


def _dry_run(stack: Reconciled, path: str, body: dict[str, Any]) -> tuple[int, str, list[str]]:
    """POST `body` with dryRun=All: the status, the answer, and the API server's Warning headers."""
    import requests

    cluster = stack.cluster
    answer = requests.post(
        f"{cluster.server}{path}?dryRun=All",
        json=body,
        headers={"Authorization": f"Bearer {cluster.token}"},
        verify=False,
        timeout=30,
    )
    warning = answer.headers.get("Warning")
    return answer.status_code, answer.text, [warning] if warning else []


def test_pod_security_admission_accepts_every_generated_pod_template(prod_reconciled):
    """The namespace enforces `restricted`: a pod of each Deployment would be created, and the Deployment itself
    draws no PodSecurity warning (what `warn: restricted` reports on workload objects)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    stack = prod_reconciled
    # A namespace of its own, labelled as the stack labels its namespace, so the admission is checked even where
    # the namespace labels themselves were wrong (test_the_models_namespace_gets_sidecars_and_enforces_…).
    checked = f"{stack.namespace}-pod-security"
    enforced = {f"{platform.POD_SECURITY}/{m}": platform.POD_SECURITY_LEVEL for m in ("enforce", "warn")}
    try:
        client.CoreV1Api(stack.cluster.api_client()).create_namespace(
            {"metadata": {"name": checked, "labels": enforced}}
        )
    except ApiException as exc:
        assert exc.status == 409, exc
    for deployment in stack.deployments():
        name = deployment["metadata"]["name"]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-check"[:63], "labels": pod_labels(deployment)},
               "spec": template(deployment)["spec"]}  # fmt: skip
        status, text, _ = _dry_run(stack, f"/api/v1/namespaces/{checked}/pods", pod)
        assert status == 201, f"{name}: {text[:800]}"
        copy_of = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": f"{name}-check"[:63]},
                   "spec": deployment["spec"]}  # fmt: skip
        status, text, warnings = _dry_run(stack, f"/apis/apps/v1/namespaces/{checked}/deployments", copy_of)
        assert status == 201, text[:800]
        assert not [w for w in warnings if "PodSecurity" in w], f"{name}: {warnings}"


# 3b, 3c. The storage initializer: its identity and its way out -----------------------------------------------


def test_a_downloading_pod_runs_as_the_artifact_store_account_with_our_initializer(prod_reconciled):
    stack = prod_reconciled
    store = stack.settings.artifact_store
    assert store is not None and store.service_account_name
    for (model, variant), deployment in by_predictor(stack).items():
        spec = template(deployment)["spec"]
        if stack.settings.models[model].serving.bake:
            assert not spec.get("initContainers") and "serviceAccountName" not in spec, "nothing to download"
            continue
        assert spec["serviceAccountName"] == store.service_account_name, f"{model}/{variant}: IRSA reaches rclone"
        (initializer,) = spec["initContainers"]  # ours: the operator injected no second one
        assert initializer["name"] == seldon.initializer_name(model)
        assert initializer["securityContext"]["runAsUser"] == seldon.ISTIO_PROXY_UID, "bypasses the sidecar"
        assert initializer["envFrom"] == [{"secretRef": {"name": seldon.ARTIFACT_SECRET}}]
        uri = stack.settings.models[model].variants[variant].model_uri
        assert initializer["args"] == [uri, seldon.MODEL_MOUNT_PATH]
        mounts = {m["mountPath"]: m for m in model_container(deployment)["volumeMounts"]}
        assert mounts[seldon.MODEL_MOUNT_PATH]["name"] == seldon.model_volume(model)
        assert mounts[seldon.MODEL_MOUNT_PATH].get("readOnly") is True, "the operator mounts it into the server"
        env = {e["name"]: e.get("value") for e in model_container(deployment).get("env", [])}
        if stack.settings.models[model].variants[variant].runtime == "mlserver":
            assert env["MLSERVER_MODEL_URI"] == seldon.MODEL_MOUNT_PATH


# 3d, 3h. What the gateway may reach is exactly what the operator routes to -----------------------------------


def _routed(stack: Reconciled) -> dict[str, set[int]]:
    """Container ports the VirtualServices reach, per Deployment: route and mirror → Service → targetPort."""
    services = {s["metadata"]["name"]: s for s in stack.items("v1", "Service")}
    deployments = stack.deployments()
    reached: dict[str, set[int]] = {d["metadata"]["name"]: set() for d in deployments}
    for vs in stack.items("networking.istio.io/v1beta1", "VirtualService"):
        for index, route in enumerate(vs["spec"]["http"]):
            destinations = [d["destination"] for d in route["route"]]
            if route.get("mirror"):
                destinations.append(route["mirror"])
            for destination in destinations:
                service = services[destination["host"].split(".")[0]]
                (port,) = [p for p in service["spec"]["ports"] if p["port"] == destination["port"]["number"]]
                for deployment in deployments:
                    if not selects({"matchLabels": service["spec"]["selector"]}, pod_labels(deployment)):
                        continue
                    if index == GRPC_ROUTE and pod_labels(deployment)[labels.RUNTIME] == "bentoml":
                        continue  # BentoML serves no gRPC: nothing listens where that route points
                    reached[deployment["metadata"]["name"]].add(int(port["targetPort"]))
    return reached


def _opened_to(stack: Reconciled, namespace: str, found: dict[str, str]) -> set[int]:
    ports: set[int] = set()
    for policy in stack.plan.find("NetworkPolicy"):
        if not selects(policy["spec"]["podSelector"], found):
            continue
        for rule in policy["spec"].get("ingress", []):
            sources = [f.get("namespaceSelector", {}).get("matchLabels", {}) for f in rule["from"]]
            if {security.NAMESPACE_NAME: namespace} in sources:
                ports |= {p["port"] for p in rule["ports"]}
    return ports


def test_the_gateway_may_reach_exactly_the_ports_the_operator_routes_to(prod_reconciled):
    stack = prod_reconciled
    routed = _routed(stack)
    (policy,) = stack.plan.find("AuthorizationPolicy")
    gateway_rule = next(r for r in policy["spec"]["rules"] if "from" in r)
    authorized = {int(p) for p in gateway_rule["to"][0]["operation"]["ports"]}
    assert authorized == set().union(*routed.values()), "the access policy opens what is routed, nothing more"
    runtimes = set()
    for deployment in stack.deployments():
        name, found = deployment["metadata"]["name"], pod_labels(deployment)
        runtimes.add(found[labels.RUNTIME])
        assert routed[name], f"{name}: no route reaches it"
        assert _opened_to(stack, stack.settings.platform.gateway_namespace, found) == routed[name], name
    assert runtimes == {"mlserver", "bentoml"}, "prod has both runtimes"


# 3e, 3d. One scrape target per pod, on a port Prometheus may reach in plain text ------------------------------


def _meta(source: str, found: dict[str, str], container: str) -> str:
    if source == monitoring.CONTAINER_NAME:
        return container
    for key, value in found.items():
        if monitoring._meta_label(key) == source:
            return value
    return ""


def _targets(pod_monitor: dict[str, Any], deployment: dict[str, Any]) -> list[tuple[str, int]]:
    """What Prometheus' pod discovery and the PodMonitor's keep rules leave of the pod: (container, port)."""
    found, targets = pod_labels(deployment), []
    for endpoint in pod_monitor["spec"]["podMetricsEndpoints"]:
        for container in template(deployment)["spec"]["containers"]:
            for port in container.get("ports", []):
                if port.get("name") != endpoint["port"]:
                    continue
                keeps = [r for r in endpoint.get("relabelings", []) if r.get("action") == "keep"]
                values = [";".join(_meta(s, found, container["name"]) for s in r["sourceLabels"]) for r in keeps]
                if all(re.fullmatch(r["regex"], v) for r, v in zip(keeps, values, strict=True)):
                    targets.append((container["name"], port["containerPort"]))
    return targets


def test_each_pod_is_one_scrape_target_on_its_runtime_s_port_open_to_prometheus(prod_reconciled):
    stack = prod_reconciled
    (pod_monitor,) = stack.plan.find("PodMonitor")
    peer = stack.plan.find("PeerAuthentication")
    for deployment in stack.deployments():
        found = pod_labels(deployment)
        runtime = found[labels.RUNTIME]
        targets = _targets(pod_monitor, deployment)
        assert targets == [(found[labels.MODEL], seldon.scrape_port(runtime))], (
            deployment["metadata"]["name"],
            targets,
        )
        port = seldon.scrape_port(runtime)
        assert port in _opened_to(stack, stack.settings.monitoring.namespace, found)
        permissive = [
            p for p in peer
            if "selector" in p["spec"] and selects(p["spec"]["selector"], found)
            and p["spec"]["portLevelMtls"].get(str(port)) == {"mode": "PERMISSIVE"}
        ]  # fmt: skip
        assert permissive, f"{deployment['metadata']['name']}: Prometheus (no sidecar) cannot scrape {port}"


# 3f. Autoscaling on the stack's own traffic ------------------------------------------------------------------


def test_the_scaled_object_s_request_rate_counts_only_its_own_namespace(prod_reconciled):
    stack = prod_reconciled
    queries = [
        t["metadata"]["query"]
        for s in stack.items("keda.sh/v1alpha1", "ScaledObject")
        for t in s["spec"]["triggers"]
        if t["type"] == "prometheus"
    ]
    assert queries, "prod's churn scales on its request rate"
    for query in queries:
        assert f'namespace="{stack.namespace}"' in query, query


def test_the_scaled_object_carries_the_configured_triggers(prod_reconciled):
    stack = prod_reconciled
    for (model, _), deployment in by_predictor(stack).items():
        (scaled,) = [
            s for s in stack.items("keda.sh/v1alpha1", "ScaledObject")
            if s["metadata"]["name"] == deployment["metadata"]["name"]
        ]  # fmt: skip
        autoscaling = stack.settings.models[model].autoscaling
        assert scaled["spec"]["minReplicaCount"] == autoscaling.min_replicas
        assert scaled["spec"]["maxReplicaCount"] == autoscaling.max_replicas
        kinds = {t["type"] for t in scaled["spec"]["triggers"]}
        assert "cpu" in kinds and ("prometheus" in kinds) == (autoscaling.requests_per_second_per_replica is not None)


def test_dev_reconciles_to_one_restricted_mlserver_predictor_with_all_traffic(cluster, seldon_operator, registry):
    stack = reconciled(cluster, seldon_operator, "models-dev-operator", "dev", registry)
    ((key, deployment),) = by_predictor(stack).items()
    assert key == (CHURN, "champion")
    assert model_container(deployment)["image"].startswith("ml-serving-dev/churn:")
    assert _weights(stack.virtual_service(CHURN), stack.namespace) == ({"champion": 100}, None)
    (scaled,) = stack.items("keda.sh/v1alpha1", "ScaledObject")
    assert [t["type"] for t in scaled["spec"]["triggers"]] == ["cpu"], "dev: cpu only, no Prometheus trigger"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dev-check"}, "spec": template(deployment)["spec"]}
    status, text, _ = _dry_run(stack, f"/api/v1/namespaces/{stack.namespace}/pods", pod)
    assert status == 201, text[:800]


def test_the_operator_ran_with_the_chart_s_istio_and_keda_settings(seldon_operator, cluster):
    from kubernetes import client

    config = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map("seldon-config", "seldon-system")
    initializer = json.loads(config.data["storageInitializer"])
    assert initializer["image"] == seldon.STORAGE_INITIALIZER_IMAGE, "the one we declare is the chart's"
    assert {
        "requests": {"cpu": initializer["cpuRequest"], "memory": initializer["memoryRequest"]},
        "limits": {"cpu": initializer["cpuLimit"], "memory": initializer["memoryLimit"]},
    } == seldon.STORAGE_INITIALIZER_RESOURCES
    env = seldon_operator.env
    assert env["ISTIO_ENABLED"] == "true" and env["KEDA_ENABLED"] == "true", json.dumps(env)[:500]
    assert env["ISTIO_GATEWAY"] == "istio-system/seldon-gateway"
    assert seldon_operator.running()
