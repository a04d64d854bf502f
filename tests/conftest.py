"""Shared fixtures: the project, a real MLflow registry seeded once per session, and plan helpers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from ml_serving.plan import Plan, run_program
from ml_serving.stackfile import read_config, stack_file

PROJECT_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LocalRegistry:
    """A sqlite MLflow registry in a temporary folder: churn-classifier v1 @champion, v2 @candidate."""

    root: Path
    tracking_uri: str


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> LocalRegistry:
    from ml_serving.seed import register_churn_model, seed

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'registry.db'}"
    seed(uri)
    register_churn_model(uri, aliases=("candidate",), random_state=1)
    return LocalRegistry(root, uri)


@pytest.fixture(scope="session")
def project_dir() -> Path:
    return PROJECT_DIR


def stack_config(stack: str) -> dict:
    config, _ = read_config(stack_file(PROJECT_DIR, stack))
    return config


def plan_stack(stack: str, config: dict | None = None, registry: LocalRegistry | None = None) -> Plan:
    """Run the real __main__.py for `stack` under the mock engine, pointing it at `registry` if given."""
    config = dict(config if config is not None else stack_config(stack))
    if registry is not None:
        config["ml-serving:registry"] = {"trackingUri": registry.tracking_uri}
    return run_program(PROJECT_DIR, stack, config=config)


@pytest.fixture(scope="module")
def prod() -> Plan:
    """The prod stack as planned under the mock engine (pinned: no registry)."""
    return plan_stack("prod")


@pytest.fixture(scope="module")
def dev(registry: LocalRegistry) -> Plan:
    """The dev stack, its aliases resolved in the test registry."""
    return plan_stack("dev", registry=registry)


def copy_project(destination: Path) -> Path:
    """A copy of the project's sources (no venv, no rendered output), to edit stack files freely."""
    from ml_serving.devserve import copy_project as copied

    return copied(PROJECT_DIR, destination)


@pytest.fixture(scope="session")
def tools() -> Path:
    """The folder `./run tools` built (the real Pulumi CLI, Kubernetes provider, etcd, kube-apiserver)."""
    import os

    from ml_serving.localcluster import tools_dir

    folder = tools_dir()
    if folder is None:
        if os.environ.get("ML_SERVING_REQUIRE_ENGINE"):  # .ci/run built them: a missing tool is a failure there
            pytest.fail("ML_SERVING_REQUIRE_ENGINE is set but `./run tools` has not built every tool")
        pytest.skip("the real Pulumi CLI, provider, etcd and kube-apiserver are not built: run `./run tools`")
    return folder


@pytest.fixture(scope="session")
def cluster(tools: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real API server on loopback for every engine test (each test uses its own namespace); its folder is
    pytest's, so old runs' etcd data does not pile up on a CI machine."""
    from ml_serving.localcluster import LocalCluster

    cluster = LocalCluster(tools / "bin", root=tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()
