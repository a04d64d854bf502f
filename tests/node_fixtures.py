"""Fixtures for the `pods` tests: a private API server with a real node (containerd, kubelet, scheduler, proxy)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_serving.localcluster import LocalCluster
from ml_serving.localnode import LocalNode, missing_prerequisites
from ml_serving.tools import tools_folder


def node_bin_dir() -> Path:
    """The tools' `bin/`; fails (under ML_SERVING_REQUIRE_ENGINE) or skips, naming what is missing."""
    bin_dir = (tools_folder() or Path("tools-not-built")) / "bin"
    missing = [f"{bin_dir / n}: run `./run tools`" for n in ("etcd", "kube-apiserver") if not (bin_dir / n).exists()]
    missing += missing_prerequisites(bin_dir)
    if missing:
        why = "a node cannot start here:\n  " + "\n  ".join(missing)
        if os.environ.get("ML_SERVING_REQUIRE_ENGINE"):
            pytest.fail(why)
        pytest.skip(why)
    return bin_dir


@pytest.fixture(scope="module")
def node() -> Iterator[LocalNode]:
    """A fresh API server and one node for the module; stopped (and its host state removed) afterwards."""
    bin_dir = node_bin_dir()
    started = time.monotonic()
    cluster = LocalCluster(bin_dir).start(crd_dir=None, namespaces=())
    try:
        node = LocalNode(cluster, bin_dir).start()
        node.cluster_started = started  # for the "cluster start -> first Ready pod" figure
    except BaseException:
        cluster.stop()
        raise
    yield node
    node.stop()
    cluster.stop()
    node.remove_root()
