"""prod with the GPU Operator instead of the bare device plugin, every chart from the local folder, where the
GPU Operator's chart is its source tree (Chart.yaml v1.0.0-devel), accepted by `charts.develBuilds`: up from an
empty cluster, then a no-op `up`. What is checked is what the develBuilds path changes: that the provider's Helm
installs a chart whose version is not the pin, with the release's images and the time-slicing config, and that
the second `up` sees no difference (the release records the chart's own version).

No `destroy` here: uninstalling the GPU Operator runs Node Feature Discovery's prune Job (a post-delete hook that
takes its node labels off; the chart has no value to skip it, and the provider runs hooks on uninstall even with
`charts.wait: false`), and Helm waits for that Job, which cannot run without a node. Tried: `destroy` waited on
it for 8 minutes (2026-12-03).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_serving.localcluster import LocalCluster
from ml_serving.specs import gpu
from tests.chart_fixtures import chart_folder_fixture  # noqa: F401  (fixture)
from tests.test_engine import Engine
from tests.test_prod_up import (
    empty_cluster_fixture,  # noqa: F401  (fixture)
    live,
    prod_engine,
    snapshot,
)

pytestmark = pytest.mark.engine


def with_gpu_operator(document: str) -> str:
    return document.replace("    devicePlugin: device-plugin ", "    devicePlugin: gpu-operator ", 1)


@pytest.fixture(scope="module")
def prod_gpu_operator(tools: Path, empty_cluster: LocalCluster, chart_folder: Path, tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("prod-up-gpu-operator")
    return prod_engine(
        tools,
        empty_cluster,
        chart_folder,
        root,
        edit=with_gpu_operator,
        charts="    develBuilds: {gpu-operator: v1.0.0-devel}\n",
    )


def test_prod_with_the_gpu_operator_from_its_source_tree_comes_up_in_one_go_then_changes_nothing(
    prod_gpu_operator, empty_cluster, chart_folder
):
    assert not snapshot(empty_cluster)["helm"]
    steps = prod_gpu_operator.steps("up", stack="prod")
    created = [s["type"].rsplit(":", 1)[-1] for s in steps if s["op"] == "create"]
    assert created.count("Release") == 5, created  # keda, seldon-core, gpu-operator, kube-prometheus-stack, dcgm
    assert "gpu-operator/sh.helm.release.v1.gpu-operator.v1" in snapshot(empty_cluster)["helm"]

    (operator,) = [
        d
        for d in live(empty_cluster, "apps/v1", "Deployment", "gpu-operator")
        if d["metadata"]["name"] == "gpu-operator"
    ]
    (container,) = operator["spec"]["template"]["spec"]["containers"]
    assert container["image"].endswith(f":{gpu.GPU_OPERATOR_VERSION}"), "the release's image, not devel-ubi8"
    (policy,) = live(empty_cluster, "nvidia.com/v1", "ClusterPolicy")
    assert policy["spec"]["validator"]["version"] == gpu.GPU_OPERATOR_VERSION
    assert policy["spec"]["devicePlugin"]["config"] == {"name": gpu.DEVICE_PLUGIN_CONFIG, "default": "default"}

    again = prod_gpu_operator.steps("up", stack="prod")
    assert [s for s in again if s["op"] not in ("same", "read")] == [], "the second `up` changes nothing"
