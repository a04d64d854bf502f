"""The real Pulumi engine against a real Kubernetes API server on loopback (etcd + kube-apiserver, no nodes).

Needs the tools `./run tools` builds from Go modules (the Pulumi CLI, the Kubernetes provider plugin, etcd,
kube-apiserver); `.ci/run` builds them, `./run test` skips these tests with the reason when they are missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ml_serving.localcluster import LocalCluster, tools_env
from tests.conftest import copy_project

pytestmark = pytest.mark.engine
PASSPHRASE = "ml-serving-example"  # the public passphrase of the committed sample stack files
CLI = [sys.executable, "-m", "ml_serving.cli"]


class Engine:
    """A copy of the project with a seeded dev registry, and `ml-serving` run in it against the cluster."""

    def __init__(self, project: Path, env: dict[str, str]) -> None:
        self.project, self.env = project, env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*CLI, "--project-dir", str(self.project), *args], cwd=self.project, env=self.env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        if check:
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    def steps(self, action: str, stack: str = "dev") -> list[dict[str, str]]:
        return json.loads(self.run(action, stack, "--json").stdout.strip().splitlines()[-1])

    def pulumi(self, *args: str, stack: str = "dev") -> str:
        done = subprocess.run(["pulumi", "--non-interactive", *args, "--stack", stack], cwd=self.project,
                              env=self.env, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout


@pytest.fixture(scope="module")
def engine(tools: Path, cluster: LocalCluster, tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("engine")
    project = copy_project(root / "project")
    env = {**os.environ, **tools_env(tools), "KUBECONFIG": str(cluster.kubeconfig),
           "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE, "PULUMI_BACKEND_URL": (root / "state").as_uri()}  # fmt: skip
    (root / "state").mkdir()
    engine = Engine(project, env)
    engine.run("seed", "--stack", "dev")
    return engine


def live(cluster: LocalCluster, obj: dict[str, Any]) -> dict[str, Any]:
    from kubernetes.dynamic import DynamicClient

    api = DynamicClient(cluster.api_client()).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    meta = obj["metadata"]
    return api.get(name=meta["name"], namespace=meta.get("namespace")).to_dict()


def contained(wanted: Any, found: Any, path: str = "") -> list[str]:
    """Where `found` (what the server holds, with its defaults) lacks or differs from `wanted`."""
    if isinstance(wanted, dict):
        if not isinstance(found, dict):
            return [f"{path}: expected a mapping, got {found!r:.80}"]
        return [p for k, v in wanted.items() for p in contained(v, found.get(k), f"{path}.{k}")]
    if isinstance(wanted, list):
        if not isinstance(found, list) or len(found) != len(wanted):
            return [f"{path}: expected {len(wanted)} items, got {found!r:.80}"]
        return [p for i, (w, f) in enumerate(zip(wanted, found, strict=True)) for p in contained(w, f, f"{path}[{i}]")]
    return [] if wanted == found else [f"{path}: expected {wanted!r:.80}, got {found!r:.80}"]


def rendered(project: Path, stack: str) -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted((project / "rendered" / stack).glob("*.yaml"))
            if not p.name.startswith(("helm-release_", "docker-image_"))]  # fmt: skip


def traffic(cluster: LocalCluster, namespace: str, name: str) -> dict[str, int]:
    sdep = live(cluster, {"apiVersion": "machinelearning.seldon.io/v1", "kind": "SeldonDeployment",
                          "metadata": {"name": name, "namespace": namespace}})  # fmt: skip
    return {p["name"]: p.get("traffic", 0) for p in sdep["spec"]["predictors"] if not p.get("shadow")}


def test_preview_then_up_creates_every_planned_object_as_planned(engine, cluster):
    preview = engine.steps("preview")
    kinds = {s["type"].rsplit(":", 1)[-1] for s in preview if s["op"] == "create"}
    assert {"Namespace", "SeldonDeployment", "PodMonitor", "PrometheusRule", "ConfigMap", "Gateway"} <= kinds
    assert {"NetworkPolicy", "PeerAuthentication", "AuthorizationPolicy"} <= kinds, "the models namespace is guarded"
    engine.steps("up")
    engine.run("plan", "dev", "--quiet")
    objects = rendered(engine.project, "dev")
    assert len(objects) == 11, [f"{o['kind']}/{o['metadata']['name']}" for o in objects]
    for obj in objects:
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
        found = live(cluster, obj)
        assert not contained(body, found), f"{obj['kind']} {obj['metadata']['name']}: {contained(body, found)}"
        assert not contained(obj["metadata"].get("labels", {}), found["metadata"].get("labels", {}))


def test_a_weight_edit_is_one_in_place_update_of_the_seldon_deployment(engine, cluster):
    engine.steps("up")
    path = engine.project / "Pulumi.dev.yaml"
    text = path.read_text()
    with_challenger = text.replace(
        "        champion: {alias: champion, weight: 100}",
        "        champion: {alias: champion, weight: 100}\n        challenger: {alias: champion, weight: 0}",
    )
    path.write_text(with_challenger)
    engine.steps("up")
    path.write_text(with_challenger.replace("weight: 100}", "weight: 75}").replace("weight: 0}", "weight: 25}"))
    changed = [s for s in engine.steps("preview") if s["op"] not in ("same", "read")]
    kinds = {s["type"].rsplit(":", 1)[-1]: s["op"] for s in changed}
    assert [s["op"] for s in changed if s["type"].endswith(":SeldonDeployment")] == ["update"], "in place, once"
    assert {op for op in kinds.values()} == {"update"}, f"no replace, create or delete anywhere: {changed}"
    assert set(kinds) <= {"SeldonDeployment", "PrometheusRule", "ConfigMap"}, "traffic, its alert, its dashboard"
    engine.steps("up")
    assert traffic(cluster, "models-dev", "churn") == {"champion": 75, "challenger": 25}
    path.write_text(text)
    engine.steps("up")
    assert traffic(cluster, "models-dev", "churn") == {"champion": 100}


def test_a_run_leaves_no_copy_of_the_kubeconfig_in_the_temp_folder(engine, tmp_path):
    """The Kubernetes provider writes the kubeconfig it is given (KUBECONFIG: the cluster's credentials) to a new temp
    file each time it is configured, and never removes it; the CLI and its plugins get a temp folder of their own."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run([*CLI, "--project-dir", str(engine.project), "preview", "dev"], cwd=engine.project,
                          env={**engine.env, "TMPDIR": str(temp)}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not [str(p.relative_to(temp)) for p in temp.rglob("*")], "left in the temp folder"


def test_secrets_of_the_committed_stack_files_decrypt_and_reach_up(engine):
    committed = (engine.project / "Pulumi.prod.yaml").read_text()
    engine.pulumi("stack", "select", "--create", stack="prod")
    assert (engine.project / "Pulumi.prod.yaml").read_text() == committed, "the committed salt is used as it is"
    assert engine.pulumi("config", "get", "ml-serving:registryPassword", stack="prod").strip() == (
        "change-me-registry-password"
    ), "prod's committed placeholder decrypts with the committed salt and the documented passphrase"
    engine.pulumi("stack", "select", "--create")
    engine.pulumi("config", "set", "--secret", "ml-serving:registryPassword", "s3cr3t-value")
    assert "secure: v1:" in (engine.project / "Pulumi.dev.yaml").read_text()
    assert "s3cr3t-value" not in (engine.project / "Pulumi.dev.yaml").read_text()
    engine.steps("up")


def test_prod_previews_with_its_charts_as_existing(engine):
    """Helm charts cannot be downloaded here: prod's platform and monitoring are `existing` in this copy."""
    path = engine.project / "Pulumi.prod.yaml"
    text = path.read_text()
    for key in ("seldon", "keda"):
        text = text.replace(f"    {key}: install\n", f"    {key}: existing\n")
    text = text.replace("    stack: install ", "    stack: existing ").replace(
        "devicePlugin: device-plugin", "devicePlugin: existing"
    )
    text = text.replace("dcgmExporter: install", "dcgmExporter: existing")
    text = text.replace("    push: true\n", "    push: false\n    build: false\n")
    path.write_text(text)
    steps = engine.steps("preview", stack="prod")
    created = {s["type"].rsplit(":", 1)[-1] for s in steps if s["op"] == "create"}
    assert {"SeldonDeployment", "NodePool", "EC2NodeClass"} <= created
    assert "Release" not in created


def test_destroy_leaves_the_namespace_empty(engine, cluster):
    from kubernetes.dynamic import DynamicClient

    client = DynamicClient(cluster.api_client())
    configmaps = client.resources.get(api_version="v1", kind="ConfigMap")

    def dev_dashboards() -> list[str]:
        names = [c.metadata.name for c in configmaps.get(namespace="monitoring").items]
        return [n for n in names if n.startswith("ml-serving-dashboard-models-dev-")]

    engine.steps("up")
    assert dev_dashboards(), "the stack's dashboards exist before destroy (the check below is not vacuous)"
    engine.steps("destroy")
    for api_version, kind in [("machinelearning.seldon.io/v1", "SeldonDeployment"),
                              ("monitoring.coreos.com/v1", "PodMonitor"),
                              ("monitoring.coreos.com/v1", "PrometheusRule")]:  # fmt: skip
        assert not client.resources.get(api_version=api_version, kind=kind).get(namespace="models-dev").items
    # Only this stack's: other engine tests on the shared cluster keep theirs in the same namespace.
    assert not dev_dashboards()
