"""The kserve backend with the real Pulumi engine and a real API server (the KServe v0.20.0 CRDs applied): a
prod-shaped stack previews and goes up, a weight edit is one in-place update of the VirtualService, and a whole
rollout (real serving processes, a real Prometheus) passes, and rolls a faulty challenger back."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ml_serving.specs import kserve
from tests.conftest import copy_project
from tests.test_engine import CLI, Engine, contained, live, rendered
from tests.test_rollout import weights
from tests.test_rollout_e2e import INTERVAL, Traffic, Watcher, engine_canary, engine_env, history, world  # noqa: F401

pytestmark = pytest.mark.engine


def to_kserve(text: str) -> str:
    """A stack file with `platform.backend: kserve` and Seldon's own switch removed; nothing else changes."""
    for seldon in ("    seldon: existing\n", "    seldon: install\n"):
        text = text.replace(seldon, "    backend: kserve\n")
    text = text.replace("seldon: existing,", "backend: kserve,")
    assert "backend: kserve" in text, "the stack file names no Seldon switch to replace"
    return text


def own_gateway(text: str, name: str) -> str:
    """The stack's Istio Gateway under its own name: the one object a stack keeps outside its namespace, so two
    stacks in the one test cluster (this module's dev and prod, test_engine's dev) would both own
    `istio-system/seldon-gateway` and the second `up` would fail on a server-side apply field conflict."""
    gateway = f"    gateway: istio-system/{name}\n"
    if "    gateway: istio-system/seldon-gateway\n" in text:
        return text.replace("    gateway: istio-system/seldon-gateway\n", gateway)
    assert "    istioGateway: install\n" in text, "the stack file installs no gateway of its own"
    return text.replace("    istioGateway: install\n", "    istioGateway: install\n" + gateway)


@pytest.fixture(scope="module")
def kengine(tools, cluster, tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("kserve-engine")
    project = copy_project(root / "project")
    (root / "state").mkdir()
    env = {**os.environ, **engine_env_for(tools, cluster), "PULUMI_BACKEND_URL": (root / "state").as_uri()}
    engine = Engine(project, env)
    dev = project / "Pulumi.dev.yaml"
    text = to_kserve(dev.read_text()).replace("namespace: models-dev", "namespace: models-kserve")
    dev.write_text(own_gateway(text, "kserve-dev-gateway"))
    engine.run("seed", "--stack", "dev")
    return engine


def engine_env_for(tools, cluster) -> dict[str, str]:
    from ml_serving.localcluster import tools_env
    from tests.test_engine import PASSPHRASE

    return {**tools_env(tools), "KUBECONFIG": str(cluster.kubeconfig), "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE}


def vs_traffic(cluster, namespace: str, model: str) -> dict[str, int]:
    obj = {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
           "metadata": {"name": model, "namespace": namespace}}  # fmt: skip
    return kserve.traffic(live(cluster, obj))


def test_prod_shaped_kserve_stack_previews_and_goes_up(kengine, cluster, registry):
    from mlflow.tracking import MlflowClient

    path = kengine.project / "Pulumi.prod.yaml"
    text = own_gateway(to_kserve(path.read_text()), "kserve-prod-gateway")
    # `up` writes the baked model into fraud's image context: a local model instead of prod's unreachable s3://.
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    local = Path(client.get_model_version_download_uri("churn-classifier", "1").removeprefix("file://")).as_uri()
    text = text.replace("s3://mlflow-artifacts/5/models/m-1e2d3c4b5a6f47e8d9c0b1a2f3e4d5c6/artifacts", local)
    text = text.replace("    keda: install\n", "    keda: existing\n").replace(
        "    stack: install ", "    stack: existing "
    )
    text = text.replace("devicePlugin: device-plugin", "devicePlugin: existing")
    text = text.replace("dcgmExporter: install", "dcgmExporter: existing")
    text = text.replace("    push: true\n", "    push: false\n    build: false\n")
    text = text.replace("ml-serving:namespace: models\n", "ml-serving:namespace: models-kprod\n")
    path.write_text(text)
    kengine.pulumi("stack", "select", "--create", stack="prod")
    created = {s["type"].rsplit(":", 1)[-1] for s in kengine.steps("preview", stack="prod") if s["op"] == "create"}
    assert {"InferenceService", "VirtualService", "ScaledObject", "PodDisruptionBudget"} <= created
    assert "SeldonDeployment" not in created and "Release" not in created
    kengine.steps("up", stack="prod")
    assert vs_traffic(cluster, "models-kprod", "churn") == {"champion": 90, "challenger": 10}
    kengine.run("plan", "prod", "--quiet")
    for obj in rendered(kengine.project, "prod"):
        if obj["kind"] in ("InferenceService", "VirtualService", "ScaledObject", "PodDisruptionBudget"):
            body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
            found = live(cluster, obj)
            assert not contained(body, found), f"{obj['kind']} {obj['metadata']['name']}: {contained(body, found)}"


def test_a_weight_edit_is_one_in_place_update_of_the_virtual_service(kengine, cluster):
    kengine.steps("up")
    path = kengine.project / "Pulumi.dev.yaml"
    text = path.read_text()
    with_challenger = text.replace(
        "        champion: {alias: champion, weight: 100}",
        "        champion: {alias: champion, weight: 100}\n        challenger: {alias: champion, weight: 0}",
    )
    path.write_text(with_challenger)
    kengine.steps("up")
    assert vs_traffic(cluster, "models-kserve", "churn") == {"champion": 100, "challenger": 0}
    path.write_text(with_challenger.replace("weight: 100}", "weight: 75}").replace("weight: 0}", "weight: 25}"))
    changed = [s for s in kengine.steps("preview") if s["op"] not in ("same", "read")]
    kinds = {s["type"].rsplit(":", 1)[-1]: s["op"] for s in changed}
    assert [s["op"] for s in changed if s["type"].endswith(":VirtualService")] == ["update"], "in place, once"
    assert set(kinds.values()) == {"update"}, f"no replace, create or delete anywhere: {changed}"
    assert set(kinds) <= {"VirtualService", "PrometheusRule", "ConfigMap"}, "traffic, its alert, its dashboard"
    kengine.steps("up")
    assert vs_traffic(cluster, "models-kserve", "churn") == {"champion": 75, "challenger": 25}


# -- a whole rollout under kserve ---------------------------------------------------------------------------------


def kserve_rollout(project: Path, stack: str, urls: dict[str, str], env: dict[str, str], cluster):
    path = project / f"Pulumi.{stack}.yaml"
    path.write_text(to_kserve(path.read_text()))
    watcher, traffic = Watcher(lambda: vs_traffic(cluster, stack, "churn")), Traffic(project, urls, stack=stack)
    watcher.start()
    traffic.start()
    try:
        command = [*CLI, "--project-dir", str(project), "rollout", "churn", "--stack", stack]
        run = subprocess.run(command, env={**os.environ, **env, "COLUMNS": "200"}, capture_output=True, text=True,
                             timeout=900)  # fmt: skip
    finally:
        traffic.stop.set()
        traffic.join()
        watcher.stop.set()
        watcher.join()
    return run, watcher.seen


def records(project: Path, stack: str) -> list[dict]:
    lines = (project / "rollouts" / f"{stack}-churn.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_kserve_rollout_walks_every_stage_into_the_virtual_service(world, engine_env, cluster):  # noqa: F811
    project, prometheus, control, urls = world
    control.write_text("0")
    engine_canary(project, prometheus, "kcanary-real")
    run, seen = kserve_rollout(project, "kcanary-real", urls, engine_env, cluster)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    logged = records(project, "kcanary-real")
    judged = [r for r in logged if r["event"] == "judgement"]
    assert {r["stage"] for r in judged if r["verdict"] == "passed"} == {0, 1, 2}, "every stage passed before the next"
    applied = [r["weights"] for r in logged if r["event"] == "apply"] + [{"champion": 100, "challenger": 0}]
    assert seen == applied, "every stage, then the promotion, reached the VirtualService in order"
    updates = [u for u in history(project, "kcanary-real", engine_env) if u["kind"] == "update"][::-1]  # oldest first
    assert len(updates) == 4 and all(u["result"] == "succeeded" for u in updates), "one update per step"
    assert [u["startTime"] for u in updates] == sorted(u["startTime"] for u in updates), "newest first"
    for update in updates[1:]:  # the first stage's `up` created the stack; every later step only updates it
        changes = update.get("resourceChanges", {})
        assert not changes.get("create") and not changes.get("replace") and not changes.get("delete"), update


def test_kserve_rollout_rolls_a_faulty_challenger_back(world, engine_env, cluster):  # noqa: F811
    project, prometheus, control, urls = world
    control.write_text("0.5")
    engine_canary(project, prometheus, "kcanary-faulty")
    try:
        run, seen = kserve_rollout(project, "kcanary-faulty", urls, engine_env, cluster)
    finally:
        control.write_text("0")
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-4000:]
    judged = [r for r in records(project, "kcanary-faulty") if r["event"] == "judgement"]
    assert len(judged) <= 2 and judged[-1]["verdict"] == "failed", (
        "judged and undone within two analysis intervals",
        judged,
    )
    assert seen == [{"champion": 75, "challenger": 25}, {"champion": 100, "challenger": 0}]
    assert weights(project, "kcanary-faulty") == {"champion": 100, "challenger": 0}
    assert INTERVAL > 0
