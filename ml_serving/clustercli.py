"""`ml-serving cluster`: the one-machine cluster for newcomers and tests (API server, Seldon operator, a node
that runs pods, the Docker engine and OCI registry), until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ml_serving.cliutil import UsageError, console, find_project_dir

if TYPE_CHECKING:
    from ml_serving.settings import Settings

REGISTRY_FOLDER = "oci-registry"  # the OCI registry's folder in the cluster's, with the other processes' logs


def cmd_cluster(args: argparse.Namespace) -> int:
    """A local API server (etcd + kube-apiserver, the upstream CRDs applied) until Ctrl-C."""
    from ml_serving.localcluster import ClusterError, LocalCluster, tools_dir

    for flag, needs in (("monitoring", "runs Prometheus as a pod"), ("up", "serves the stack from pods")):
        if getattr(args, flag) and not args.node:
            raise UsageError(f"--{flag} {needs}: add --node")
    if args.up and not args.operator:
        raise UsageError("--up serves the stack through the Seldon operator: drop --no-operator")
    if args.up and not args.images:
        raise UsageError("--up builds the serving image and the node pulls it from the OCI registry: drop --no-images")
    settings = _stack_settings(args) if args.operator or args.monitoring or args.up else None
    served_registry = _served_registry(args, settings) if args.up and settings else None
    if args.monitoring and settings and settings.monitoring is None:
        raise UsageError(f"stack {args.stack} has no ml-serving:monitoring: nothing for Prometheus to select")
    folder = tools_dir()
    if folder is None:
        raise UsageError("etcd and kube-apiserver are not built: run `./run tools` first (a cold build takes a while)")
    if args.up:
        from ml_serving.devserve import missing_binaries

        missing = missing_binaries(folder / "bin")
        if missing:
            raise UsageError(f"--up needs {', '.join(missing)}, which `./run tools` builds: run it first")
    cluster = LocalCluster(folder / "bin")
    try:
        cluster.start(crd_dir=args.crds, namespaces=tuple(args.namespace))
    except ClusterError as exc:
        raise UsageError(str(exc)) from None
    operator = None
    if args.operator:
        operator = _start_operator(settings, folder, cluster)
    node = engine = registry = prometheus = store = None
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # stop etcd and kube-apiserver on SIGTERM too
    try:
        if args.images:
            # Without them: --no-images; --up cannot go without them (it builds the image the node pulls).
            instead = "--up needs it: the node pulls the serving image from it" if args.up else "or pass --no-images"
            engine = _start_engine(cluster.root, instead)
            registry = start_registry(args.registry_port, cluster.root / REGISTRY_FOLDER, instead)
        if args.node:
            from ml_serving.localnode import LocalNode
            from ml_serving.nodeimages import MIRRORED_REGISTRIES

            node = LocalNode(cluster, folder / "bin", mirror=registry.address if registry else None).start()
            pulls = f"{'/, '.join(MIRRORED_REGISTRIES)}/ images from {registry.address}, " if registry else ""
            console.print(f"node {node.name} is Ready (pods on {node.subnet}, {pulls}logs in {node.root})")
        if args.monitoring:
            prometheus = _start_prometheus(args, settings, node)
        if args.up:
            store = _start_store(served_registry, folder, cluster, node)
            _serve_stack(args, folder, cluster, node, operator, store)
        console.print(f"API server {cluster.server} is up; in another shell:\n  export KUBECONFIG={cluster.kubeconfig}")
        processes = [*cluster.processes, *(node.processes.values() if node else ())]
        while all(p.poll() is None for p in processes) and (operator is None or operator.running()):
            time.sleep(1)
        console.print("[red]a cluster process or the Seldon operator exited[/]; logs in " + str(cluster.root))
        return 1
    except ClusterError as exc:  # the node's NodeError too
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        return 0
    finally:
        for started in (store, registry, engine, prometheus, node):
            if started is not None:
                started.stop()
        if node is not None:
            node.remove_images()
        if registry is not None:
            shutil.rmtree(registry.root / "data", ignore_errors=True)  # images pushed for this cluster; the log stays
        if operator is not None:
            operator.stop()
        cluster.stop()


def _start_engine(log_dir: Path, instead: str):  # type: ignore[no-untyped-def]
    """The Docker engine that builds the serving images (`--images`): one that answers is used as it is, else
    `dockerd` is started here (its log in `log_dir`) and stopped with the cluster."""
    from ml_serving.containers import ContainerError, start_engine

    try:
        engine = start_engine(log_dir=log_dir)
    except ContainerError as exc:
        raise UsageError(f"{exc} (it builds the serving images; {instead})") from None
    console.print(f"Docker engine {'started here' if engine.started_here else 'already running'}")
    return engine


def start_registry(port: int, root: Path, instead: str):  # type: ignore[no-untyped-def]
    """The local OCI registry, keeping its log and images in `root`: a node's pods pull from it, and
    `servingImage.build: true` pushes to it. `instead` says what to do without it."""
    from ml_serving.containers import ContainerError, LocalRegistry, registry_binary

    binary = registry_binary()
    if binary is None:
        raise UsageError(f"the OCI registry is not built: run `tools/build.sh registry` ({instead})")
    root.mkdir(parents=True, exist_ok=True)
    try:
        registry = LocalRegistry(binary, root=root, port=port).start()
    except ContainerError as exc:
        raise UsageError(f"{exc} ({instead})") from None
    console.print(
        f"OCI registry on {registry.address}. To build, push and deploy by digest, set in the stack file:\n"
        f"  ml-serving:servingImage: {{repository: {registry.address}/ml-serving-dev, build: true, "
        "builder: dynamic, push: true}"
    )
    return registry


def _stack_settings(args: argparse.Namespace) -> Settings:
    """`--stack`'s settings, read once and before anything starts, so a bad stack file starts nothing."""
    from ml_serving.stackfile import load_settings

    return load_settings(args.project_dir or find_project_dir(), args.stack)


def _start_operator(settings: Settings, folder: Path, cluster):  # type: ignore[no-untyped-def]
    """The Seldon operator, set up by its chart with `--stack`'s values; stops the cluster if it cannot start."""
    from ml_serving.localcluster import ClusterError
    from ml_serving.localoperator import LocalOperator
    from ml_serving.specs.platform import seldon_operator

    operator = LocalOperator(folder / "bin", cluster.kubeconfig, seldon_operator(settings), root=cluster.root)
    try:
        operator.start(cluster.api_client())
    except ClusterError as exc:
        cluster.stop()
        raise UsageError(f"{exc} (or run without it: --no-operator)") from None
    console.print(f"Seldon operator {operator.chart.version} reconciles SeldonDeployments (log: {operator.log})")
    return operator


def _start_prometheus(args: argparse.Namespace, settings: Settings, node):  # type: ignore[no-untyped-def]
    """prometheus-operator and its Prometheus on the node, selecting `--stack`'s PodMonitor and rules."""
    from ml_serving.localprometheus import NodePrometheus

    prometheus = NodePrometheus(node, settings).start()
    console.print(
        f"Prometheus (the StatefulSet prometheus-operator generates) answers on {prometheus.url}; it scrapes the pods "
        f"of `up {args.stack}`'s PodMonitor and evaluates its rules (operator log: {prometheus.operator.log})"
    )
    return prometheus


def _served_registry(args: argparse.Namespace, settings: Settings) -> Path:
    """`--up`: the folder of the stack's local registry, checked before anything starts."""
    from ml_serving.devserve import registry_root
    from ml_serving.localcluster import ClusterError

    if settings.registry is None:
        raise UsageError(f"Pulumi.{args.stack}.yaml has no ml-serving:registry: --up serves the registry's models")
    try:
        root = registry_root(settings.registry.tracking_uri, args.project_dir or find_project_dir())
    except ClusterError as exc:
        raise UsageError(str(exc)) from None
    if not root.is_dir():
        raise UsageError(f"no registry at {root}: run `./run plan {args.stack}` (it seeds the dev registry) first")
    return root


def _start_store(root: Path, folder: Path, cluster, node):  # type: ignore[no-untyped-def]
    """`--up`: the registry folder `root` over S3 on the node's gateway."""
    from ml_serving.artifactstore import S3Store

    store = S3Store(folder / "bin", root, node.node_ip, cluster.root / "rclone-s3.log").start()
    console.print(f"the registry's artifacts ({root}) over S3 on {store.endpoint}")
    return store


def _serve_stack(args: argparse.Namespace, folder: Path, cluster, node, operator, store) -> None:  # type: ignore[no-untyped-def]
    """`--up`: `up` of a copy of the stack pinned to `store`, its images in the registry the node pulls from; waits
    for Ready model pods and prints where each predictor answers."""
    from ml_serving.devserve import predictor_urls, ready_model_pods, refusing, serve_stack

    served = serve_stack(args.project_dir or find_project_dir(), args.stack, node, operator.env, operator.config_map,
                         store, cluster.root / "up", folder, say=console.print)  # fmt: skip
    console.print(f"`ml-serving up {args.stack}` took {served.up_seconds:.0f} s; waiting for Ready model pods")
    api = cluster.api_client()
    deadline = time.monotonic() + 900
    while len(ready_model_pods(api, served)) < len(served.sdeps) and time.monotonic() < deadline:
        time.sleep(2)
    if not ready_model_pods(api, served):
        console.print(f"[red]no Ready model pod after 900 s[/]: `kubectl get pods -n {served.settings.namespace}`")
    urls = predictor_urls(api, served)
    closed = refusing(urls, max(deadline - time.monotonic(), 0))
    for name, url in urls.items():
        model = name.split("/", 1)[0]
        if name in closed:
            console.print(f"[red]{name}'s Service {url} refuses connections[/]: see kube-proxy's log in {node.root}")
        else:
            console.print(f"{name} answers on {url}: curl -s {url}/v2/models/{model}  (and POST {url}/invocations)")
    console.print(
        f"the stack file `up` ran is {served.project / f'Pulumi.{args.stack}.yaml'} (pinned to the store); "
        f"state in {served.env['PULUMI_BACKEND_URL']}"
    )
