"""prod's first `pulumi up` on an empty cluster, every chart installed from the local folder, then a no-op `up`,
then `destroy`: the real engine and provider (its embedded Helm) against a fresh local API server.

The cluster starts with only what prod does not install: Istio's and Karpenter's CRDs and `istio-system`. Every
other CRD (Seldon's, KEDA's, the Prometheus Operator's) must come from a chart before any object of its kind, in
the same `up`. The charts' pods cannot start here (no node, no image can be pulled), so the stack's
`charts.wait: false` makes Helm create the objects without waiting for pods or running hook Jobs, and the API
server runs without admission webhooks (their servers are those pods). The objects are what is tested.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ml_serving.localcluster import CRD_DIR, LocalCluster, tools_env
from ml_serving.localoperator import LocalOperator, wait_for
from tests.chart_fixtures import _Loader as YamlLoader
from tests.chart_fixtures import chart_folder_fixture  # noqa: F401  (fixture)
from tests.conftest import copy_project
from tests.operator_fixtures import SELDON_ID, seldon_operator_beside
from tests.test_engine import PASSPHRASE, Engine

pytestmark = pytest.mark.engine
PREREQUISITES = ("networking.istio.io_", "security.istio.io_", "karpenter.")  # CRDs of what prod expects to exist
BEFORE = ("istio-system",)


@pytest.fixture(scope="module", name="empty_cluster")
def empty_cluster_fixture(tools: Path, tmp_path_factory):
    crds = tmp_path_factory.mktemp("prerequisite-crds")
    for path in CRD_DIR.glob("*.yaml"):
        if path.name.startswith(PREREQUISITES):
            shutil.copy(path, crds)
    cluster = LocalCluster(
        tools / "bin",
        root=tmp_path_factory.mktemp("cluster"),
        apiserver_flags=("--disable-admission-plugins", "ValidatingAdmissionWebhook,MutatingAdmissionWebhook"),
    ).start(crd_dir=crds, namespaces=BEFORE)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def prod(tools: Path, empty_cluster: LocalCluster, chart_folder: Path, tmp_path_factory) -> Engine:
    return prod_engine(tools, empty_cluster, chart_folder, tmp_path_factory.mktemp("prod-up"))


def prod_engine(
    tools: Path, cluster: LocalCluster, chart_folder: Path, root: Path, edit=lambda doc: doc, charts: str = ""
) -> Engine:
    """prod's project, every chart from `chart_folder` without waiting for pods; `edit` changes its stack file,
    `charts` adds lines to its ml-serving:charts."""
    project = copy_project(root / "project")
    path = project / "Pulumi.prod.yaml"
    document = edit(path.read_text())
    # Nothing here can push an image or download a model from s3: images are CI's (build: false), no model is baked.
    document = document.replace("    push: true\n", "    push: false\n    build: false\n")
    document = document.replace("        bake: true ", "        bake: false ")
    document = document.replace(
        "config:\n", f"config:\n  ml-serving:charts:\n    folder: {chart_folder}\n    wait: false\n{charts}", 1
    )
    path.write_text(document)
    env = {**os.environ, **tools_env(tools), "KUBECONFIG": str(cluster.kubeconfig),
           "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE, "PULUMI_BACKEND_URL": (root / "state").as_uri()}  # fmt: skip
    (root / "state").mkdir()
    engine = Engine(project, env)
    engine.pulumi("stack", "select", "--create", stack="prod")
    return engine


def snapshot(cluster: LocalCluster) -> dict[str, set[str]]:
    """What a stack could leave behind: namespaces, CRDs, cluster-wide RBAC and webhooks, and Helm's records."""
    from kubernetes.dynamic import DynamicClient

    client = DynamicClient(cluster.api_client())

    def names(api_version: str, kind: str) -> set[str]:
        return {o.metadata.name for o in client.resources.get(api_version=api_version, kind=kind).get().items}

    secrets = client.resources.get(api_version="v1", kind="Secret").get().items
    return {
        "namespaces": names("v1", "Namespace"),
        "crds": names("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
        "clusterroles": names("rbac.authorization.k8s.io/v1", "ClusterRole"),
        "webhooks": names("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration")
        | names("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"),
        "helm": {f"{s.metadata.namespace}/{s.metadata.name}" for s in secrets if s.type == "helm.sh/release.v1"},
    }


def every_object(cluster: LocalCluster) -> set[tuple[str, str, str]]:
    """(kind.group, namespace, name) of every object the API server lists, events aside: what `destroy` restores.

    Read through discovery each time, so kinds that a chart added (and removed) count too.
    """
    import requests

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {cluster.token}"

    def get(path: str) -> dict[str, Any]:  # verify per request: REQUESTS_CA_BUNDLE overrides a session's
        deadline = time.monotonic() + 60
        # 429: a kind whose watch cache is still filling (a CRD just established) says "retry after 1 s".
        while (answer := session.get(f"{cluster.server}{path}", verify=False, timeout=30)).status_code == 429:
            assert time.monotonic() < deadline, f"{path}: still 429 after 60 s"
            time.sleep(float(answer.headers.get("Retry-After", "1")))
        answer.raise_for_status()
        return answer.json()

    versions = ["/api/v1", *(f"/apis/{g['preferredVersion']['groupVersion']}" for g in get("/apis")["groups"])]
    found = set()
    for version in versions:
        group = version.removeprefix("/api/v1").removeprefix("/apis/").rpartition("/")[0]
        for kind in get(version)["resources"]:
            if "/" in kind["name"] or "list" not in kind.get("verbs", []) or kind["kind"] == "Event":
                continue
            for item in get(f"{version}/{kind['name']}")["items"]:
                meta = item["metadata"]
                found.add((f"{kind['kind']}.{group}".rstrip("."), meta.get("namespace", ""), meta["name"]))
    return found


def live(cluster: LocalCluster, api_version: str, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    from kubernetes.dynamic import DynamicClient

    api = DynamicClient(cluster.api_client()).resources.get(api_version=api_version, kind=kind)
    return [o.to_dict() for o in api.get(namespace=namespace).items]


def kept_crds(chart_folder: Path) -> set[str]:
    """CRDs in a chart's `crds/` folder: Helm installs them but never deletes them (its documented policy)."""
    found = set()
    for path in chart_folder.glob("**/crds/*.yaml"):
        if not (path.parent.parent / "Chart.yaml").exists() or "gpu-operator" in str(path):  # templates/crds: not
            continue  # kept; the GPU Operator: prod runs the bare device plugin
        for doc in yaml.load_all(path.read_text(), Loader=YamlLoader):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                found.add(doc["metadata"]["name"])
    return found


def reconciled(cluster: LocalCluster, operator: LocalOperator, sdeps: set[str]) -> list[dict[str, Any]]:
    """What the operator made for `sdeps` in `models`, once each has its Deployments marked available (there is no
    kubelet; as envtest-style tests do) and its VirtualService."""
    from kubernetes import client

    def made(api_version: str, kind: str) -> list[dict[str, Any]]:
        return [
            o for o in live(cluster, api_version, kind, "models") if SELDON_ID in (o["metadata"].get("labels") or {})
        ]

    def every_sdep(api_version: str, kind: str) -> list[dict[str, Any]]:
        found = made(api_version, kind)
        return found if {o["metadata"]["labels"][SELDON_ID] for o in found} >= sdeps else []

    apps = client.AppsV1Api(cluster.api_client())
    for deployment in wait_for(lambda: every_sdep("apps/v1", "Deployment"), "Deployments", log=operator.log):
        replicas = deployment["spec"].get("replicas") or 1
        status = {"observedGeneration": deployment["metadata"]["generation"], "replicas": replicas,
                  "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                  "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]}  # fmt: skip
        apps.patch_namespaced_deployment_status(deployment["metadata"]["name"], "models", {"status": status})

    def named_routes() -> list[dict[str, Any]]:  # named after their SeldonDeployment; no seldon-deployment-id
        found = [o for o in live(cluster, "networking.istio.io/v1beta1", "VirtualService", "models")]
        return found if {o["metadata"]["name"] for o in found} >= sdeps else []

    routes = wait_for(named_routes, "VirtualServices", log=operator.log)
    return [*made("apps/v1", "Deployment"), *made("v1", "Service"), *made("keda.sh/v1alpha1", "ScaledObject"), *routes]


def test_prod_comes_up_from_empty_in_one_go_then_changes_nothing_then_destroys_cleanly(
    prod, empty_cluster, chart_folder, tools
):
    before, objects_before = snapshot(empty_cluster), every_object(empty_cluster)
    assert not {"seldondeployments.machinelearning.seldon.io", "podmonitors.monitoring.coreos.com"} & before["crds"]

    steps = prod.steps("up", stack="prod")
    created = [s["type"].rsplit(":", 1)[-1] for s in steps if s["op"] == "create"]
    assert created.count("Release") == 5, created  # keda, seldon-core, device plugin, kube-prometheus-stack, dcgm

    after = snapshot(empty_cluster)
    assert {"keda/sh.helm.release.v1.keda.v1", "seldon-system/sh.helm.release.v1.seldon-core.v1",
            "monitoring/sh.helm.release.v1.kube-prometheus-stack.v1",
            "nvidia-device-plugin/sh.helm.release.v1.nvidia-device-plugin.v1",
            "nvidia-dcgm-exporter/sh.helm.release.v1.dcgm-exporter.v1"} == after["helm"]  # fmt: skip
    for crd in ("seldondeployments.machinelearning.seldon.io", "scaledobjects.keda.sh",
                "podmonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com",
                "servicemonitors.monitoring.coreos.com", "prometheuses.monitoring.coreos.com"):  # fmt: skip
        assert crd in after["crds"], crd
    # The charts' objects, and ours of the charts' kinds (created after their CRDs: the API server refuses otherwise).
    sdeps = {
        o["metadata"]["name"] for o in live(empty_cluster, "machinelearning.seldon.io/v1", "SeldonDeployment", "models")
    }
    assert sdeps == {"churn", "fraud", "embeddings"}
    assert [o["metadata"]["name"] for o in live(empty_cluster, "monitoring.coreos.com/v1", "PodMonitor", "models")] == [
        "ml-serving-models"
    ]
    assert live(empty_cluster, "monitoring.coreos.com/v1", "PrometheusRule", "models")
    monitors = live(empty_cluster, "monitoring.coreos.com/v1", "ServiceMonitor", "nvidia-dcgm-exporter")
    assert [m["spec"]["endpoints"][0]["interval"] for m in monitors] == ["15s"], "the stack's scrape interval"
    (prometheus,) = live(empty_cluster, "monitoring.coreos.com/v1", "Prometheus", "monitoring")
    assert prometheus["spec"]["serviceMonitorSelector"] == {}, "every ServiceMonitor, the DCGM exporter's too"
    deployments = {o["metadata"]["name"] for o in live(empty_cluster, "apps/v1", "Deployment")}
    assert {"keda-operator", "seldon-controller-manager", "kube-prometheus-stack-operator"} <= deployments
    daemonsets = {o["metadata"]["name"] for o in live(empty_cluster, "apps/v1", "DaemonSet")}
    assert {"nvidia-device-plugin", "dcgm-exporter"} <= daemonsets

    # The real Seldon operator, as the chart runs it, reconciles the SeldonDeployments from here on: the no-op `up`
    # and `destroy` meet what it made (Deployments, Services, ScaledObjects, PDBs, then Istio routes).
    with seldon_operator_beside(tools, empty_cluster) as operator:
        made = reconciled(empty_cluster, operator, sdeps)
        assert {o["kind"] for o in made} >= {"Deployment", "Service", "ScaledObject", "VirtualService"}, made

        again = prod.steps("up", stack="prod")
        assert [s for s in again if s["op"] not in ("same", "read")] == [], "the second `up` changes nothing"

        prod.steps("destroy", stack="prod")
    gone = snapshot(empty_cluster)
    assert gone["namespaces"] == before["namespaces"], "every namespace the stack made is deleted"
    assert not gone["helm"] and gone["webhooks"] == before["webhooks"]
    assert gone["clusterroles"] == before["clusterroles"]
    kept = kept_crds(chart_folder)
    assert gone["crds"] - before["crds"] == kept, "only the CRDs Helm never deletes remain"
    left = every_object(empty_cluster) ^ objects_before
    assert {name for kind, _, name in left if kind == "CustomResourceDefinition.apiextensions.k8s.io"} == kept
    # The API server serves each kept CRD's group under a local APIService of its own: those stay with them.
    groups = {name.partition(".")[2] for name in kept}
    served = {o for o in left if o[0] == "APIService.apiregistration.k8s.io" and o[2].partition(".")[2] in groups}
    assert not {o for o in left - served if o[0] != "CustomResourceDefinition.apiextensions.k8s.io"}, "as before"
