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
from pathlib import Path
from typing import Any

import pytest
import yaml

from ml_serving.localcluster import CRD_DIR, LocalCluster, tools_env
from tests.chart_fixtures import chart_folder_fixture  # noqa: F401  (fixture)
from tests.conftest import copy_project
from tests.test_engine import PASSPHRASE, Engine

pytestmark = pytest.mark.engine
PREREQUISITES = ("networking.istio.io_", "security.istio.io_", "karpenter.")  # CRDs of what prod expects to exist
BEFORE = ("istio-system",)


@pytest.fixture(scope="module")
def empty_cluster(tools: Path, tmp_path_factory):
    crds = tmp_path_factory.mktemp("prerequisite-crds")
    for path in CRD_DIR.glob("*.yaml"):
        if path.name.startswith(PREREQUISITES):
            shutil.copy(path, crds)
    cluster = LocalCluster(
        tools / "bin",
        apiserver_flags=("--disable-admission-plugins", "ValidatingAdmissionWebhook,MutatingAdmissionWebhook"),
    ).start(crd_dir=crds, namespaces=BEFORE)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def prod(tools: Path, empty_cluster: LocalCluster, chart_folder: Path, tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("prod-up")
    project = copy_project(root / "project")
    path = project / "Pulumi.prod.yaml"
    document = path.read_text()
    # Nothing here can push an image or download a model from s3: images are CI's (build: false), no model is baked.
    document = document.replace("    push: true\n", "    push: false\n    build: false\n")
    document = document.replace("        bake: true ", "        bake: false ")
    document = document.replace(
        "config:\n", f"config:\n  ml-serving:charts:\n    folder: {chart_folder}\n    wait: false\n", 1
    )
    path.write_text(document)
    env = {**os.environ, **tools_env(tools), "KUBECONFIG": str(empty_cluster.kubeconfig),
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
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                found.add(doc["metadata"]["name"])
    return found


def test_prod_comes_up_from_empty_in_one_go_then_changes_nothing_then_destroys_cleanly(
    prod, empty_cluster, chart_folder
):
    before = snapshot(empty_cluster)
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

    again = prod.steps("up", stack="prod")
    assert [s for s in again if s["op"] not in ("same", "read")] == [], "the second `up` changes nothing"

    prod.steps("destroy", stack="prod")
    gone = snapshot(empty_cluster)
    assert gone["namespaces"] == before["namespaces"], "every namespace the stack made is deleted"
    assert not gone["helm"] and gone["webhooks"] == before["webhooks"]
    assert gone["clusterroles"] == before["clusterroles"]
    assert gone["crds"] - before["crds"] == kept_crds(chart_folder), "only the CRDs Helm never deletes remain"
