"""Fixtures for the `pods` tests: a private API server with a real node (containerd, kubelet, scheduler, proxy)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_serving.containers import LocalRegistry, registry_binary
from ml_serving.localcluster import LocalCluster
from ml_serving.localnode import LocalNode, missing_prerequisites
from ml_serving.localoperator import manager_settings, operator_ready, render_chart
from ml_serving.nodeimages import SeldonImages, seldon_images
from ml_serving.specs import platform
from ml_serving.stackfile import parse_settings
from ml_serving.tools import tools_folder
from tests.conftest import stack_config


def node_bin_dir() -> Path:
    """The tools' `bin/`; fails (under ML_SERVING_REQUIRE_ENGINE) or skips, naming what is missing."""
    bin_dir = (tools_folder() or Path("tools-not-built")) / "bin"
    missing = [f"{bin_dir / n}: run `./run tools`" for n in ("etcd", "kube-apiserver") if not (bin_dir / n).exists()]
    missing += missing_prerequisites(bin_dir)
    missing += [] if registry_binary() else ["the OCI registry the node pulls from: run `tools/build.sh registry`"]
    if missing:
        why = "a node cannot start here:\n  " + "\n  ".join(missing)
        if os.environ.get("ML_SERVING_REQUIRE_ENGINE"):
            pytest.fail(why)
        pytest.skip(why)
    return bin_dir


def running_node(root: Path, crds: bool = False) -> Iterator[LocalNode]:
    """A fresh API server (with the CRDs when `crds`; its folder `root`) and one node pulling from an OCI registry
    of its own, as `ml-serving cluster --node` runs them; stopped, their host state removed, afterwards."""
    bin_dir = node_bin_dir()
    started = time.monotonic()
    registry = LocalRegistry(registry_binary(), root=root / "oci-registry")  # type: ignore[arg-type]
    registry.root.mkdir(parents=True)
    cluster = LocalCluster(bin_dir, root=root).start(**({} if crds else {"crd_dir": None, "namespaces": ()}))
    try:
        registry.start()
        node = LocalNode(cluster, bin_dir, mirror=registry.address).start()
        node.cluster_started = started  # for the "cluster start -> first Ready pod" figure
    except BaseException:
        registry.stop()
        cluster.stop()
        raise
    try:
        yield node
        node.stop()
    finally:
        registry.stop()
        shutil.rmtree(registry.root / "data", ignore_errors=True)  # the images pushed (a serving image is over 1 GB)
        cluster.stop()
    node.remove_root()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    """A fresh API server and one node for the module."""
    yield from running_node(tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="module")
def crd_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    """A fresh API server with the project's CRDs (SeldonDeployment, ...) and one node, for the operator's pods."""
    yield from running_node(tmp_path_factory.mktemp("cluster"), crds=True)


def chart_images(bin_dir: Path, work: Path) -> SeldonImages:
    """The executor and initializer images as the Seldon chart (dev's values) names them."""
    settings = parse_settings(stack_config("dev"), "Pulumi.dev.yaml")
    problem = operator_ready(bin_dir)
    if problem:
        if os.environ.get("ML_SERVING_REQUIRE_ENGINE"):
            pytest.fail(problem)
        pytest.skip(problem)
    env, config = manager_settings(render_chart(bin_dir, platform.seldon_operator(settings), work))
    return seldon_images(env, config)
