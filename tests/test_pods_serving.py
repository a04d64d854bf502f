"""The dev stack on a real node: the operator's pods download the model over S3 from a real store (marker `pods`).

The dev registry's artifacts are served by `rclone serve s3` on the pod bridge's gateway; the dev stack's model is
pinned to its s3:// URI there and its `artifactStore.rclone` points at the store, so the operator's pod runs the
storage initializer image (made here from rclone, named as the chart's `seldon-config` names it) exactly as it
would download from a cloud bucket.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from ml_serving.artifactstore import RCLONE_BINARY, S3Store, s3_uri
from ml_serving.localnode import LocalNode
from ml_serving.localoperator import LocalOperator
from ml_serving.nodeimages import full_reference, initializer_image, seldon_images
from ml_serving.plan import revealed
from ml_serving.seed import CHURN_MODEL
from ml_serving.specs import platform, seldon
from ml_serving.stackfile import parse_settings
from tests import container_fixtures
from tests.conftest import LocalRegistry, stack_config
from tests.node_fixtures import crd_node  # noqa: F401  (the module's node, with the CRDs)
from tests.operator_fixtures import SELDON_ID, Reconciled
from tests.test_node import poll
from tests.test_serving import ROWS, v2_body

docker_engine = container_fixtures.docker_engine  # the engine that builds the serving image

pytestmark = pytest.mark.pods


@pytest.fixture(scope="module")
def operator(crd_node: LocalNode) -> Iterator[LocalOperator]:  # noqa: F811
    """The real operator on the node's API server, set up by the chart with dev's values."""
    settings = parse_settings(stack_config("dev"), "Pulumi.dev.yaml")
    cluster = crd_node.cluster
    operator = LocalOperator(crd_node.bin_dir, cluster.kubeconfig, platform.seldon_operator(settings))
    operator.start(cluster.api_client())
    yield operator
    operator.stop()


@pytest.fixture(scope="module")
def store(crd_node: LocalNode, registry: LocalRegistry) -> Iterator[S3Store]:  # noqa: F811
    """The registry's artifacts over S3 on the node's gateway address (what pods reach; not loopback)."""
    if not (crd_node.bin_dir / RCLONE_BINARY).exists():
        why = f"{crd_node.bin_dir / RCLONE_BINARY} is not built: run `tools/build.sh rclone`"
        if os.environ.get("ML_SERVING_REQUIRE_ENGINE"):
            pytest.fail(why)
        pytest.skip(why)
    store = S3Store(crd_node.bin_dir, registry.root, crd_node.node_ip, crd_node.root / "rclone-s3.log").start()
    saved = {k: os.environ.get(k) for k in store.client_env()}
    os.environ.update(store.client_env())  # the plan (in this process) reads the model's requirements over S3
    yield store
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    store.stop()


def champion(registry: LocalRegistry) -> tuple[str, Path]:
    """The dev model's champion version and its artifact folder (a local MLflow path)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(registry.tracking_uri, registry_uri=registry.tracking_uri)
    version = str(client.get_model_version_by_alias(CHURN_MODEL, "champion").version)
    return version, Path(urlsplit(client.get_model_version_download_uri(CHURN_MODEL, version)).path)


def dev_on_store(registry: LocalRegistry, store: S3Store) -> dict[str, Any]:
    """dev's stack config with its model pinned to the s3:// URI of the store and `artifactStore` pointing there."""
    config = copy.deepcopy(stack_config("dev"))
    version, folder = champion(registry)
    config["ml-serving:registry"] = {"trackingUri": registry.tracking_uri}
    churn = config["ml-serving:models"]["churn"]
    churn["variants"]["champion"] = {"version": version, "modelUri": s3_uri(store.root, folder), "weight": 100}
    config["ml-serving:artifactStore"] = {"rclone": store.rclone_env()}
    # A name on loopback: a pull the node attempts for an image it lacks never leaves the machine.
    config["ml-serving:servingImage"] = {**config["ml-serving:servingImage"], "repository": "localhost/ml-serving-dev"}
    return config


def operator_pods(node: LocalNode, namespace: str, sdep: str) -> list:
    from kubernetes import client

    core = client.CoreV1Api(node.cluster.api_client())
    return core.list_namespaced_pod(namespace, label_selector=f"{SELDON_ID}={sdep}").items


def test_the_chart_names_the_initializer_the_stack_declares(crd_node: LocalNode, operator: LocalOperator) -> None:  # noqa: F811
    images = seldon_images(operator.env, operator.config_map)
    assert images.initializer == full_reference(seldon.STORAGE_INITIALIZER_IMAGE)
    assert images.initializer == "docker.io/seldonio/rclone-storage-initializer:1.18.2"


@dataclass
class DevStack:
    """dev applied to the node's API server (model on the S3 store), as the operator reconciled it."""

    stack: Reconciled
    sdep: dict[str, Any]
    model_key: str
    folder: Path  # the model's artifacts in the registry (what the store serves)

    @property
    def name(self) -> str:
        return self.sdep["metadata"]["name"]


@pytest.fixture(scope="module")
def dev_stack(crd_node: LocalNode, operator: LocalOperator, store: S3Store, registry: LocalRegistry) -> DevStack:  # noqa: F811
    images = seldon_images(operator.env, operator.config_map)
    crd_node.import_image(initializer_image(crd_node.bin_dir, crd_node.root / "images", images.initializer))
    stack = Reconciled(crd_node.cluster, operator, dev_on_store(registry, store), "dev")
    (sdep,) = [revealed(s) for s in stack.plan.find("SeldonDeployment")]
    (model_key,) = stack.settings.models
    return DevStack(stack, sdep, model_key, champion(registry)[1])


def test_the_operator_pod_downloads_the_model_over_s3_from_the_store(
    crd_node: LocalNode,  # noqa: F811
    store: S3Store,
    dev_stack: DevStack,
) -> None:
    from kubernetes import client

    assert store.host == crd_node.node_ip and not store.host.startswith("127.")

    def initialized() -> Any:
        for pod in operator_pods(crd_node, dev_stack.stack.namespace, dev_stack.name):
            for status in pod.status.init_container_statuses or []:
                if status.state.terminated is not None:
                    return pod, status
        return None

    pod, status = poll(initialized, "the operator's pod's storage initializer finished", seconds=240)
    assert status.name == seldon.initializer_name(dev_stack.model_key)
    core = client.CoreV1Api(crd_node.cluster.api_client())
    log = core.read_namespaced_pod_log(pod.metadata.name, dev_stack.stack.namespace, container=status.name)
    assert status.state.terminated.exit_code == 0, log
    for name in ("MLmodel", "model.skops", "requirements.txt"):
        assert (dev_stack.folder / name).exists()
        assert f"{name}: Copied" in log, log


# --- item 4: the dev stack serves through the predictor's Service -------------------------------------------------


def serving_container(stack: Reconciled, sdep: dict[str, Any]) -> dict[str, Any]:
    (predictor,) = sdep["spec"]["predictors"]
    (spec,) = predictor["componentSpecs"]
    (container,) = [c for c in spec["spec"]["containers"] if c["name"] == predictor["graph"]["name"]]
    return container


def load_serving_image(node: LocalNode, name: str, model_folder: Path, docker_engine: Any) -> float:
    """Build the dev model's serving image from the context the program writes (plain `docker build`, cached
    layers reused), and load it into the node's containerd under the name the SeldonDeployment runs."""
    import subprocess
    import time

    from ml_serving import containers, image

    started = time.monotonic()
    context = image.build_context(image.read_environment(model_folder))
    path = image.write_context(context, node.root / "serving-context", with_model=False)
    containers.build_image(path, name)
    archive = node.root / "images" / "serving.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["docker", "save", "--output", str(archive), name], check=True, timeout=900)
    node.import_image(archive)
    archive.unlink()
    return time.monotonic() - started


def ready_pods(node: LocalNode, stack: DevStack) -> list:
    return [
        p
        for p in operator_pods(node, stack.stack.namespace, stack.name)
        if p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]


@pytest.mark.xfail(
    reason="issue 25 item 4 not done: no Ready model pod within 600 s on 2026-12-03, cause not yet read; waits 180 s"
)
def test_up_dev_ends_with_ready_pods_that_serve_through_the_predictor_service(
    crd_node: LocalNode,  # noqa: F811
    dev_stack: DevStack,
    docker_engine: Any,
) -> None:
    import time

    import mlflow
    import pandas as pd
    import requests
    from kubernetes import client

    container = serving_container(dev_stack.stack, dev_stack.sdep)
    seconds = load_serving_image(crd_node, container["image"], dev_stack.folder, docker_engine)
    print(f"serving image built (cached) and loaded into the node: {seconds:.0f} s")
    started = time.monotonic()
    try:
        first = poll(lambda: ready_pods(crd_node, dev_stack), "a Ready pod of the dev model", seconds=180)[0]
    except BaseException:
        pods = operator_pods(crd_node, dev_stack.stack.namespace, dev_stack.name)
        print("pods:", [(p.metadata.name, p.status.phase, p.status.container_statuses) for p in pods])
        raise
    print(f"image loaded -> first Ready model pod: {time.monotonic() - started:.1f} s")
    core = client.CoreV1Api(crd_node.cluster.api_client())
    (predictor,) = dev_stack.sdep["spec"]["predictors"]
    service = core.read_namespaced_service(f"{dev_stack.name}-{predictor['name']}", dev_stack.stack.namespace)
    http = next(p.port for p in service.spec.ports if p.name == "http")
    base = f"http://{service.spec.cluster_ip}:{http}"
    expected = [int(x) for x in mlflow.pyfunc.load_model(str(dev_stack.folder)).predict(pd.DataFrame(ROWS))]

    def answers() -> Any:
        try:
            v2 = requests.post(f"{base}/v2/models/{dev_stack.model_key}/infer", json=v2_body(), timeout=10)
            inv = requests.post(f"{base}/invocations", json={"dataframe_records": ROWS}, timeout=10)
        except requests.RequestException:
            return None
        return (v2.status_code, inv.status_code) == (200, 200) and (v2.json(), inv.json())

    v2, invocations = poll(answers, "answers through the predictor's Service", seconds=120)
    assert v2["outputs"][0]["data"] == expected and invocations["predictions"] == expected
    memory = poll(lambda: _memory(crd_node, dev_stack.stack.namespace, first.metadata.name), "kubelet memory")
    print(f"one dev model replica's working set (kubelet): {memory / 2**20:.0f} MiB")

    core.delete_namespaced_pod(first.metadata.name, dev_stack.stack.namespace)
    second = poll(
        lambda: [p for p in ready_pods(crd_node, dev_stack) if p.metadata.name != first.metadata.name],
        "a new Ready pod after the first was deleted",
        seconds=600,
    )[0]
    assert second.metadata.name != first.metadata.name
    v2, invocations = poll(answers, "answers from the new pod through the Service", seconds=120)
    assert v2["outputs"][0]["data"] == expected and invocations["predictions"] == expected


def _memory(node: LocalNode, namespace: str, pod: str) -> int:
    from ml_serving.localnode import NodeError

    try:
        return node.pod_memory(namespace, pod)
    except NodeError:
        return 0
