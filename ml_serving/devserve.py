"""A stack served by the one-machine cluster the way a cloud cluster serves it (`ml-serving cluster --node --up`).

The registry's artifacts sit behind a real S3 endpoint (`rclone serve s3` on the node's gateway), each variant is
pinned to its s3:// URI there with `artifactStore` pointing at the store, the images the pods run are pushed under
their own names to the local OCI registry the node pulls from (nothing beyond this machine can be pulled), and the
real engine runs `up` on a copy of the project. The team's own stack file is never edited: the store's keys are
made per run.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ml_serving import labels
from ml_serving.artifactstore import RCLONE_BINARY, S3Store, s3_uri
from ml_serving.localcluster import ClusterError, tools_env
from ml_serving.localnode import LocalNode, ready_pods
from ml_serving.nodeimages import (
    EXECUTOR_BINARY,
    SeldonImages,
    executor_image,
    initializer_image,
    on_mirror,
    seldon_images,
)
from ml_serving.ocipush import PushError, push_archive, push_uncompressed
from ml_serving.processes import listening
from ml_serving.registry import RegistryError, RegistryResolver, resolve_model
from ml_serving.seed import sqlite_database
from ml_serving.settings import Settings
from ml_serving.stackfile import edit, load_settings, parse_settings, read_config, stack_file

if TYPE_CHECKING:
    from ml_serving.plan import Plan

# The stack's serving image under a name on loopback: a pull the node tries for an image it lacks never leaves
# the machine.
LOCAL_REPOSITORY = "localhost/ml-serving-dev"
# The stack config keys `on_store` rewrites; the rest of the stack file (secrets too) is copied as it is.
PINNED = ("ml-serving:registry", "ml-serving:models", "ml-serving:artifactStore", "ml-serving:servingImage")
# What a copy of the project leaves out: environments, outputs, the registry itself (served from where it is).
NOT_COPIED = (".venv", ".git", "rendered", ".mlflow", ".pulumi-state", "__pycache__", "*.egg-info", ".*_cache")


def copy_project(source: Path, destination: Path) -> Path:
    """The project's sources without environments or outputs, to run a stack file that is not the team's."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(*NOT_COPIED))
    return destination


def registry_root(tracking_uri: str, project_dir: Path) -> Path:
    """The folder of a local (sqlite) registry, which holds its artifacts (`ml-serving seed` puts them there)."""
    database = sqlite_database(tracking_uri, project_dir)
    if database is None:
        raise ClusterError(
            f"ml-serving:registry.trackingUri is {tracking_uri}: --up serves a local registry (sqlite:///…); with a "
            "remote one, point artifactStore at its bucket and run `ml-serving up` yourself"
        )
    return database.parent


def absolute_tracking_uri(tracking_uri: str, project_dir: Path) -> str:
    """A relative sqlite URI (sqlite:///.mlflow/…) made absolute, so a copy of the project finds the same registry."""
    database = sqlite_database(tracking_uri, project_dir)
    return tracking_uri if database is None else f"sqlite:///{database}"


def on_store(config: dict[str, Any], settings: Settings, resolver: RegistryResolver, store: S3Store) -> dict[str, Any]:
    """The stack config with every variant pinned to its version's s3:// URI on `store`, and `artifactStore` set
    to reach it (the variant's other keys, e.g. weight and runtime, stay as they are)."""
    config = copy.deepcopy(config)
    config["ml-serving:registry"] = {**config.get("ml-serving:registry", {}), "trackingUri": resolver.tracking_uri}
    for model_key, model in settings.models.items():
        variants = config["ml-serving:models"][model_key]["variants"]
        for name, resolved in resolve_model(model_key, model, resolver).items():
            folder = Path(urlsplit(resolved.model_uri).path)
            try:
                uri = s3_uri(store.root, folder)
            except ValueError:
                raise ClusterError(
                    f"ml-serving:models.{model_key}.variants.{name}: {resolved.model_uri} is not in the registry's "
                    f"folder {store.root}, so the store cannot serve it"
                ) from None
            variant = {k: v for k, v in variants[name].items() if k not in ("alias", "pinnedFrom")}
            variants[name] = {**variant, "version": resolved.version, "modelUri": uri}
    config["ml-serving:artifactStore"] = {"rclone": store.rclone_env()}
    image = config.get("ml-serving:servingImage", {})
    config["ml-serving:servingImage"] = {**image, "repository": LOCAL_REPOSITORY, "build": False, "push": False}
    return config


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block (the plan reads each model's requirements over S3 in this process)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def push_serving_image(node: LocalNode, name: str, model_folder: Path) -> None:
    """Build a model's serving image from the context the program writes (plain `docker build`, cached layers
    reused) and push it to the node's registry under the name the SeldonDeployment runs: the kubelet pulls it."""
    from ml_serving import containers, image

    context = image.build_context(image.read_environment(model_folder))
    path = image.write_context(context, node.root / "serving-context", with_model=False)
    try:
        containers.build_image(path, name)
    except containers.ContainerError as exc:
        raise ClusterError(str(exc)) from None
    with pushing(name):
        push_uncompressed(on_mirror(name, mirror_of(node)), work_dir=node.root, source=name)


@contextmanager
def pushing(name: str) -> Iterator[None]:
    """A failed push of `name` as the ClusterError the CLI reports (requests' errors are OSErrors: the registry
    stopped answering)."""
    try:
        yield
    except (PushError, OSError) as exc:
        raise ClusterError(f"pushing {name} to the node's registry: {exc}") from None


def push_seldon_images(node: LocalNode, images: SeldonImages) -> None:
    """The executor and the storage initializer, made here, into the node's registry as the chart names them."""
    for archive, name in (
        (executor_image(node.bin_dir, node.root / "images", images.executor), images.executor),
        (initializer_image(node.bin_dir, node.root / "images", images.initializer), images.initializer),
    ):
        with pushing(name):
            push_archive(archive, on_mirror(name, mirror_of(node)))


def missing_binaries(bin_dir: Path) -> list[str]:
    """What serving a stack needs beyond the cluster and the node: the executor and the initializer's rclone (the
    images made here) and the S3 store's rclone."""
    return [str(bin_dir / name) for name in (EXECUTOR_BINARY, RCLONE_BINARY) if not (bin_dir / name).exists()]


def mirror_of(node: LocalNode) -> str:
    """The registry `node` pulls from; a node started without one can only run imported images."""
    if node.mirror is None:
        raise ClusterError("the node has no registry to pull the stack's images from: start it with `mirror=`")
    return node.mirror


def serving_images(sdeps: list[dict[str, Any]]) -> dict[str, str]:
    """Each serving image the SeldonDeployments run, by the s3:// model URI it serves (one image per environment)."""
    images: dict[str, str] = {}
    for sdep in sdeps:
        for predictor in sdep["spec"]["predictors"]:
            graph = predictor["graph"]
            for spec in predictor["componentSpecs"]:
                for container in spec["spec"]["containers"]:
                    if container["name"] != graph["name"]:
                        continue
                    if "modelUri" not in graph:
                        raise ClusterError(
                            f"{sdep['metadata']['name']}/{predictor['name']} bakes its model into the image "
                            "(serving.bake): --up builds images without models; set bake: false to serve it here"
                        )
                    images.setdefault(container["image"], graph["modelUri"])
    return images


@dataclass
class ServedStack:
    """A stack `up` on the node: the copy of the project that holds its pinned stack file, and how to run it."""

    stack: str
    settings: Settings
    project: Path
    plan: Plan  # what `up` applied: the SeldonDeployments, and the monitors and rules the node's Prometheus selects
    env: dict[str, str]  # the engine's: tools, KUBECONFIG, state backend, the store's client keys
    images_seconds: float = 0.0  # building (cached) and pushing the images
    up_started: float = 0.0  # time.monotonic() at `up`'s start
    up_seconds: float = 0.0

    @property
    def sdeps(self) -> list[dict[str, Any]]:
        """The SeldonDeployments as planned."""
        from ml_serving.plan import revealed

        return [revealed(s) for s in self.plan.find("SeldonDeployment")]

    def up(self, timeout: float = 1200) -> subprocess.CompletedProcess:
        """`ml-serving up` of the copy (again, e.g. after editing its stack file)."""
        command = [sys.executable, "-m", "ml_serving.cli", "--project-dir", str(self.project), "up", self.stack]
        return subprocess.run(command, cwd=self.project, env=self.env, capture_output=True, text=True, timeout=timeout)


def serve_stack(
    project_dir: Path,
    stack: str,
    node: LocalNode,
    operator_env: dict[str, str],
    operator_config_map: dict[str, Any],
    store: S3Store,
    work: Path,
    tools: Path,
    tracking_uri: str | None = None,
    change: Callable[[dict[str, Any]], None] = lambda config: None,
    say: Callable[[str], None] = lambda line: None,
) -> ServedStack:
    """Pin `stack` to `store`, push what its pods run to `node`'s registry, and `up` it with the real engine from a
    copy of the project in `work` (its state there too). `change` edits the copy's config too (a test's scrape
    interval). The passphrase comes from the caller's environment."""
    from ml_serving.plan import run_program

    if not any(os.environ.get(k) for k in ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE")):
        raise ClusterError(
            "PULUMI_CONFIG_PASSPHRASE is not set: the stack file's secrets are encrypted with it (the sample "
            "stacks' is `ml-serving-example`; README, 'Secrets')"
        )
    path = stack_file(project_dir, stack)
    config, _ = read_config(path)
    settings = parse_settings(config, path.name)
    uri = tracking_uri or (settings.registry.tracking_uri if settings.registry else None)
    if uri is None:
        raise ClusterError(f"{path.name} has no ml-serving:registry.trackingUri: --up serves the registry's models")
    try:
        pinned = on_store(config, settings, RegistryResolver(absolute_tracking_uri(uri, project_dir)), store)
    except RegistryError as exc:
        raise ClusterError(f"{path.name}: {exc}") from None

    project = copy_project(project_dir, work / "project")

    def pin(document: Any) -> None:
        document["config"].update({k: pinned[k] for k in PINNED})
        change(document["config"])

    edit(stack_file(project, stack), pin)
    with environ(store.client_env()):
        plan = run_program(project, stack)
    (work / "state").mkdir(exist_ok=True)
    env = {**os.environ, **tools_env(tools), **store.client_env(), "KUBECONFIG": str(node.cluster.kubeconfig),
           "PULUMI_BACKEND_URL": (work / "state").as_uri()}  # fmt: skip
    served = ServedStack(stack, load_settings(project, stack), project, plan, env)

    started = time.monotonic()
    push_seldon_images(node, seldon_images(operator_env, operator_config_map))
    for name, model_uri in serving_images(served.sdeps).items():
        say(f"building (cached) {name} and pushing it to the node's registry {node.mirror}")
        push_serving_image(node, name, store.root / model_uri.split("://", 1)[1])
    served.images_seconds = time.monotonic() - started

    say(f"ml-serving up {stack} (log: {work / 'up.log'})")
    served.up_started = time.monotonic()
    done = served.up()
    served.up_seconds = time.monotonic() - served.up_started
    (work / "up.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise ClusterError(f"`ml-serving up {stack}` failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return served


def predictor_urls(api_client: Any, served: ServedStack) -> dict[str, str]:
    """`/invocations` of each predictor's Service (the ClusterIP kube-proxy answers on this host), by variant."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    urls = {}
    for sdep in served.sdeps:
        for predictor in sdep["spec"]["predictors"]:
            name = f"{sdep['metadata']['name']}-{predictor['name']}"
            service = core.read_namespaced_service(name, sdep["metadata"]["namespace"])
            port = next(p.port for p in service.spec.ports if p.name == "http")
            urls[f"{sdep['metadata']['name']}/{predictor['name']}"] = f"http://{service.spec.cluster_ip}:{port}"
    return urls


def refusing(
    urls: Mapping[str, str], seconds: float, *, clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:  # fmt: skip
    """Waits until every URL's host and port accept TCP and returns the names still refusing when `seconds` run out:
    kube-proxy writes a Service's rules a moment after its pod is Ready, and until then the ClusterIP refuses."""
    deadline = clock() + seconds
    while True:
        closed = [name for name, url in urls.items() if not listening(*_host_port(url))]
        if not closed or clock() >= deadline:
            return closed
        sleep(1)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or 80


def ready_model_pods(api_client: Any, served: ServedStack) -> list[Any]:
    """The stack's Ready model pods (the operator labels each with the model key)."""
    return ready_pods(api_client, served.settings.namespace, labels.MODEL)
