"""A real node: a pod the kubelet runs answers on its pod IP, a Deployment behind a Service heals, and the
tear-down leaves no process, mount, interface, netns, iptables rule or cgroup behind (marker `pods`)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from ml_serving.localnode import HELLO_IMAGE, LocalNode, NodeError, ready_pods
from ml_serving.ociimage import binary_image
from tests.node_fixtures import node  # noqa: F401  (the module's node)

pytestmark = pytest.mark.pods

NAMESPACE = "node-test"


def poll(check: Callable[[], Any], what: str, seconds: float = 120) -> Any:
    """Call `check` until it returns something truthy; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"{what} not within {seconds:.0f} s")


def hello_container() -> dict:
    return {
        "name": "hello",
        "image": HELLO_IMAGE,
        "imagePullPolicy": "Never",
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
    }


@pytest.fixture(scope="module")
def core(node: LocalNode) -> Any:  # noqa: F811
    from kubernetes import client

    node.import_image(binary_image(node.root / "images" / "hello.tar", HELLO_IMAGE, node.bin_dir / "node-hello"))
    node.cluster.create_namespace(NAMESPACE)
    return client.CoreV1Api(node.cluster.api_client())


def test_a_pod_runs_is_ready_and_answers_on_its_pod_ip(node: LocalNode, core: Any) -> None:  # noqa: F811
    core.create_namespaced_pod(
        NAMESPACE,
        {"metadata": {"name": "hello", "labels": {"app": "hello-pod"}}, "spec": {"containers": [hello_container()]}},
    )
    pod = poll(lambda: ready_pods(core.api_client, NAMESPACE, "app=hello-pod"), "pod hello Ready")[0]
    print(f"cluster start -> first Ready pod: {time.monotonic() - node.cluster_started:.1f} s")
    assert pod.spec.node_name == node.name  # the scheduler bound it to the node
    assert ipaddress.ip_address(pod.status.pod_ip) in node.subnet and pod.status.pod_ip != node.node_ip
    answer = requests.get(f"http://{pod.status.pod_ip}:8080/", timeout=5)
    assert answer.text == "hello from hello\n"

    def memory() -> int:  # the kubelet's stats need a housekeeping pass after the pod starts
        try:
            return node.pod_memory(NAMESPACE, "hello")
        except NodeError:
            return 0

    print(f"hello pod working set: {poll(memory, 'the kubelet reporting the pod memory') / 2**20:.1f} MiB")


def test_a_deployment_behind_a_service_answers_and_replaces_a_deleted_pod(node: LocalNode, core: Any) -> None:  # noqa: F811
    from kubernetes import client

    labels = {"app": "hello-deploy"}
    client.AppsV1Api(node.cluster.api_client()).create_namespaced_deployment(
        NAMESPACE,
        {
            "metadata": {"name": "hello"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [hello_container()]}},
            },
        },
    )
    service = core.create_namespaced_service(
        NAMESPACE,
        {"metadata": {"name": "hello"}, "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 8080}]}},
    )
    first = poll(lambda: ready_pods(core.api_client, NAMESPACE, "app=hello-deploy"), "the Deployment's pod Ready")[0]

    def through_service() -> str:
        try:  # kube-proxy's rules take a moment to follow the endpoints
            return requests.get(f"http://{service.spec.cluster_ip}/", timeout=2).text
        except requests.RequestException:
            return ""

    assert poll(through_service, "an answer through the Service") == f"hello from {first.metadata.name}\n"
    core.delete_namespaced_pod(first.metadata.name, NAMESPACE, grace_period_seconds=0)
    second = poll(
        lambda: [
            p
            for p in ready_pods(core.api_client, NAMESPACE, "app=hello-deploy")
            if p.metadata.name != first.metadata.name
        ],
        "a new pod Ready after the first was deleted",
    )[0]
    assert poll(lambda: through_service() == f"hello from {second.metadata.name}\n", "the new pod through the Service")


def test_the_seldon_executor_image_runs_beside_a_model_as_the_operator_injects_it(node: LocalNode, core: Any) -> None:  # noqa: F811
    """The executor image made here (nodeimages.py), pushed to the node's registry under the name the chart gives
    it, is pulled by the kubelet, starts as user 8888 with the operator's arguments and is Ready once its graph's
    model answers on localhost:9000 (here the node's test server stands in for the model)."""
    import base64
    import json

    from ml_serving.nodeimages import executor_image, on_mirror
    from ml_serving.ocipush import push_archive
    from tests.node_fixtures import chart_images

    image = chart_images(node.bin_dir, node.root / "chart").executor
    assert image.startswith("docker.io/seldonio/"), image
    assert node.mirror and image not in node.ctr("images", "list", "--quiet").stdout.split()
    push_archive(executor_image(node.bin_dir, node.root / "images", image), on_mirror(image, node.mirror))
    graph = {
        "name": "m",
        "type": "MODEL",
        "endpoint": {"service_host": "localhost", "service_port": 9000, "type": "REST"},
    }
    predictor = base64.b64encode(json.dumps({"name": "p", "graph": graph}).encode()).decode()
    model = {**hello_container(), "args": [":9000"], "ports": [], "readinessProbe": None}
    executor = {
        "name": "seldon-container-engine",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["--sdep", "s", "--namespace", NAMESPACE, "--predictor", "p", "--http_port", "8000",
                 "--grpc_port", "5001", "--protocol", "v2", "--transport", "rest", "--prometheus_path", "/prometheus"],
        "env": [{"name": "ENGINE_PREDICTOR", "value": predictor}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8000}, "periodSeconds": 1},
        "securityContext": {"runAsUser": 8888, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
    }  # fmt: skip
    core.create_namespaced_pod(
        NAMESPACE,
        {"metadata": {"name": "executor", "labels": {"app": "executor"}}, "spec": {"containers": [model, executor]}},
    )
    pod = poll(lambda: ready_pods(core.api_client, NAMESPACE, "app=executor"), "the executor pod Ready")[0]
    metrics = requests.get(f"http://{pod.status.pod_ip}:8000/prometheus", timeout=5)
    assert metrics.status_code == 200 and "go_gc_duration_seconds" in metrics.text
    assert image in node.ctr("images", "list", "--quiet").stdout.split(), "the kubelet pulled it from the registry"


def test_tear_down_leaves_nothing_behind(node: LocalNode) -> None:  # noqa: F811
    running = node.ctr("tasks", "ls").stdout
    assert "RUNNING" in running  # the pods above still run: stop() has something to clean
    left = node.stop(check=True)
    assert left is not None and not left, f"the node left this behind: {left}"
