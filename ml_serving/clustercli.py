"""`ml-serving cluster`: the one-machine cluster for newcomers and tests (API server, Seldon operator, a node
that runs pods, the Docker engine and OCI registry), until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from ml_serving.cliutil import UsageError, console, find_project_dir


def cmd_cluster(args: argparse.Namespace) -> int:
    """A local API server (etcd + kube-apiserver, the upstream CRDs applied) until Ctrl-C."""
    from ml_serving.localcluster import ClusterError, LocalCluster, tools_dir

    folder = tools_dir()
    if folder is None:
        raise UsageError("etcd and kube-apiserver are not built: run `./run tools` first (a cold build takes a while)")
    cluster = LocalCluster(folder / "bin")
    try:
        cluster.start(crd_dir=args.crds, namespaces=tuple(args.namespace))
    except ClusterError as exc:
        raise UsageError(str(exc)) from None
    operator = None
    if args.operator:
        operator = _start_operator(args, folder, cluster)
    node = engine = registry = prometheus = None
    if args.monitoring and not args.node:
        cluster.stop()
        raise UsageError("--monitoring runs Prometheus as a pod: add --node")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # stop etcd and kube-apiserver on SIGTERM too
    try:
        if args.node:
            from ml_serving.localnode import LocalNode

            node = LocalNode(cluster, folder / "bin").start()
            console.print(f"node {node.name} is Ready (pods on {node.subnet}, logs in {node.root})")
        if args.monitoring:
            prometheus = _start_prometheus(args, node)
        if args.images:
            engine, registry = start_image_services(args.registry_port)
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
        for started in (registry, engine, prometheus, node):
            if started is not None:
                started.stop()
        if operator is not None:
            operator.stop()
        cluster.stop()


def start_image_services(port: int):  # type: ignore[no-untyped-def]
    """A Docker engine (dockerd, unless one answers) and the local OCI registry, for `servingImage.build: true`."""
    from ml_serving.containers import ContainerError, LocalRegistry, registry_binary, start_engine

    binary = registry_binary()
    if binary is None:
        raise UsageError("the OCI registry is not built: run `tools/build.sh registry`, or pass --no-images")
    try:
        engine = start_engine()
        registry = LocalRegistry(binary, port=port).start()
    except ContainerError as exc:
        raise UsageError(f"{exc} (or pass --no-images)") from None
    where = "started here" if engine.started_here else "already running"
    console.print(
        f"Docker engine {where}; OCI registry on {registry.address}. To build, push and deploy by digest, set in "
        f"the stack file:\n  ml-serving:servingImage: {{repository: {registry.address}/ml-serving-dev, build: true, "
        "builder: dynamic, push: true}"
    )
    return engine, registry


def _start_operator(args: argparse.Namespace, folder: Path, cluster):  # type: ignore[no-untyped-def]
    """The Seldon operator, set up by its chart with `--stack`'s values; stops the cluster if it cannot start."""
    from ml_serving.localcluster import ClusterError
    from ml_serving.localoperator import LocalOperator
    from ml_serving.specs.platform import seldon_operator
    from ml_serving.stackfile import load_settings

    settings = load_settings(args.project_dir or find_project_dir(), args.stack)
    operator = LocalOperator(folder / "bin", cluster.kubeconfig, seldon_operator(settings), root=cluster.root)
    try:
        operator.start(cluster.api_client())
    except ClusterError as exc:
        cluster.stop()
        raise UsageError(f"{exc} (or run without it: --no-operator)") from None
    console.print(f"Seldon operator {operator.chart.version} reconciles SeldonDeployments (log: {operator.log})")
    return operator


def _start_prometheus(args: argparse.Namespace, node):  # type: ignore[no-untyped-def]
    """prometheus-operator and its Prometheus on the node, selecting `--stack`'s PodMonitor and rules."""
    from ml_serving.localprometheus import NodePrometheus
    from ml_serving.stackfile import load_settings

    settings = load_settings(args.project_dir or find_project_dir(), args.stack)
    if settings.monitoring is None:
        raise UsageError(f"stack {args.stack} has no ml-serving:monitoring: nothing for Prometheus to select")
    prometheus = NodePrometheus(node, settings).start()
    console.print(
        f"Prometheus (the StatefulSet prometheus-operator generates) answers on {prometheus.url}; it scrapes the pods "
        f"of `up {args.stack}`'s PodMonitor and evaluates its rules (operator log: {prometheus.operator.log})"
    )
    return prometheus
