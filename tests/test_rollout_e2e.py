"""A whole canary with real processes: two serving processes, a real Prometheus, traffic split by the stack file,
and the real Pulumi engine against a real API server (tests marked `engine`); promotion by MLflow alias uses the
stand-in `pulumi`, since what it proves is the alias move."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from ml_serving.stackfile import load_settings
from tests import processes
from tests.conftest import copy_project
from tests.test_rollout import CANARY, CLI, rollout, weights

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
INTERVAL = 4
ROW = {"tenure_months": 3, "monthly_charges": 99.5, "support_calls": 4, "plan": "basic", "region": "north"}


def flaky_model(target: Path, fault_rate: float = 0.0) -> Path:
    """The challenger: an MLflow model-from-code that fails on demand (tests/fixtures/flaky_model.py), or at
    `fault_rate` when no control file is set."""
    import mlflow
    from mlflow.models import infer_signature

    from ml_serving.seed import churn_frame

    frame, _ = churn_frame(rows=5)
    code = Path(__file__).resolve().parent / "fixtures" / "flaky_model.py"
    mlflow.pyfunc.save_model(
        str(target), python_model=str(code), signature=infer_signature(frame, (frame["support_calls"] > 2).astype("int64")),
        input_example=frame.head(2), pip_requirements=["mlflow"], model_config={"fault_rate": fault_rate},
    )  # fmt: skip
    return target


class Traffic(threading.Thread):
    """Sends `rate` requests a second, split between the variants by the weights in the stack file right now, from
    `senders` keep-alive clients (more than one keeps the rate when one request at a time cannot)."""

    def __init__(self, project: Path, urls: dict[str, str], rate: float = 40.0, stack: str = "canary",
                 senders: int = 1) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.project, self.urls, self.rate, self.stop = project, urls, rate, threading.Event()
        self.stack, self.senders = stack, senders

    def run(self) -> None:
        helpers = [threading.Thread(target=self.send, daemon=True) for _ in range(self.senders - 1)]
        for helper in helpers:
            helper.start()
        self.send()
        for helper in helpers:
            helper.join()

    def send(self) -> None:
        session, credit = requests.Session(), dict.fromkeys(self.urls, 0.0)
        split, checked, sent, rate = {"champion": 100, "challenger": 0}, 0.0, 0, self.rate / self.senders
        started = time.monotonic()
        while not self.stop.is_set():
            if time.monotonic() - checked > 0.25:
                with suppress(Exception):  # the file is being replaced this instant: the last split stands
                    split = weights(self.project, self.stack)
                checked = time.monotonic()
            for variant in credit:
                credit[variant] += split.get(variant, 0) / 100
            variant = max(credit, key=credit.get)
            credit[variant] -= 1
            with suppress(requests.RequestException):
                session.post(self.urls[variant], json={"dataframe_records": [ROW]}, timeout=5)
            sent += 1
            time.sleep(max(0.0, started + sent / rate - time.monotonic()))


@pytest.fixture(scope="module")
def world(registry, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("canary")
    project = copy_project(workdir / "project")
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    models = {
        "champion": client.get_model_version_download_uri("churn-classifier", "1").removeprefix("file://"),
        "challenger": str(flaky_model(workdir / "flaky")),
    }
    control = workdir / "fault-rate"
    control.write_text("0")
    with processes.serving_servers(models, workdir, env={"FLAKY_CONTROL_FILE": str(control)}) as ports:
        config = {
            "global": {"scrape_interval": "1s"},
            "scrape_configs": [{"job_name": "ml-serving", "static_configs": [
                {"targets": [f"127.0.0.1:{ports[v]['metrics']}"], "labels": {"ml_model": "churn", "ml_variant": v}}
                for v in models]}],
        }  # fmt: skip
        with processes.prometheus_server(config, workdir) as prometheus:
            urls = {v: f"http://127.0.0.1:{ports[v]['http']}/invocations" for v in models}
            (project / "models.json").write_text(json.dumps(models))  # for the stacks that read the real folders
            yield project, prometheus, control, urls


def fresh_canary(project: Path, prometheus: str) -> None:
    (project / "Pulumi.canary.yaml").write_text(
        CANARY.format(prometheus=prometheus, interval=INTERVAL, min_requests=10, on_inconclusive="rollback")
    )
    for stale in (project / "rollouts").glob("*"):
        stale.unlink()
    (project / "calls.jsonl").unlink(missing_ok=True)


def run_with_traffic(project: Path, urls: dict[str, str], env: dict | None = None, **traffic_options):
    traffic = Traffic(project, urls, **traffic_options)
    traffic.start()
    try:
        return rollout(project, env=env)
    finally:
        traffic.stop.set()
        traffic.join()


def test_promotion_by_alias_moves_the_champion_alias_in_mlflow(world, registry):
    project, prometheus, control, urls = world
    control.write_text("0")
    fresh_canary(project, prometheus)
    path = project / "Pulumi.canary.yaml"
    text = path.read_text().replace("inconclusiveThreshold: 2", "inconclusiveThreshold: 2\n        promote: alias")
    text = text.replace('version: "1"\n          modelUri: file:///models/churn/1', "alias: champion")
    text = text.replace(
        '{version: "2", modelUri: "file:///models/churn/2", weight: 0}', "{alias: candidate, weight: 0}"
    )
    text = text.replace(
        "ml-serving:namespace: models",
        f"ml-serving:namespace: models\n  ml-serving:registry: {{trackingUri: '{registry.tracking_uri}'}}",
    )
    path.write_text(text)
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    try:
        run = run_with_traffic(project, urls)
        assert run.returncode == 0, run.stdout + run.stderr
        assert str(client.get_model_version_by_alias("churn-classifier", "champion").version) == "2"
    finally:
        client.set_registered_model_alias("churn-classifier", "champion", "1")
    settings = load_settings(project, "canary")
    assert settings.models["churn"].variants["champion"].alias == "champion", "the config keeps following the alias"
    assert weights(project) == {"champion": 100, "challenger": 0}


# -- the same rollouts with the real Pulumi engine and a real API server (tests marked `engine`) -----------------


@pytest.fixture(scope="module")
def engine_env(tools, cluster, tmp_path_factory):
    from ml_serving.localcluster import tools_env
    from tests.test_engine import PASSPHRASE

    state = tmp_path_factory.mktemp("canary-state")
    return {**tools_env(tools), "KUBECONFIG": str(cluster.kubeconfig), "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE,
            "PULUMI_BACKEND_URL": state.as_uri()}  # fmt: skip


def engine_canary(project: Path, prometheus: str, stack: str) -> None:
    """The canary stack in namespace `stack`, with the served models' real folders (the program reads their
    requirements and signatures), images not built, secrets under the committed dev salt."""
    models = json.loads((project / "models.json").read_text())
    salt = next(line for line in (project / "Pulumi.dev.yaml").read_text().splitlines() if line.startswith("encryp"))
    text = CANARY.format(prometheus=prometheus, interval=INTERVAL, min_requests=10, on_inconclusive="rollback")
    text = text.replace("config:\n", f"{salt}\nconfig:\n  ml-serving:servingImage: {{build: false}}\n", 1)
    text = text.replace("ml-serving:namespace: models\n", f"ml-serving:namespace: {stack}\n")
    for variant, version in (("champion", "1"), ("challenger", "2")):
        text = text.replace(f"file:///models/churn/{version}", Path(models[variant]).as_uri())
    (project / f"Pulumi.{stack}.yaml").write_text(text)
    for stale in (project / "rollouts").glob("*"):
        stale.unlink()


class Watcher(threading.Thread):
    """Records each distinct traffic split `read()` finds on the API server (the SeldonDeployment's, or under
    KServe the VirtualService's), as it changes."""

    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        super().__init__(daemon=True)
        self.read, self.seen, self.stop = read, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            with suppress(Exception):  # not created yet
                split = self.read()
                if not self.seen or self.seen[-1] != split:
                    self.seen.append(split)


def engine_rollout(project: Path, stack: str, urls: dict[str, str], env: dict[str, str], cluster):
    from tests.test_engine import traffic as split_of

    watcher = Watcher(lambda: split_of(cluster, stack, "churn"))
    watcher.start()
    traffic = Traffic(project, urls, stack=stack)
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


def history(project: Path, stack: str, env: dict[str, str]) -> list[dict]:
    done = subprocess.run(["pulumi", "--non-interactive", "stack", "history", "--json", "--stack", stack],
                          cwd=project, env={**os.environ, **env}, capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout)


@pytest.mark.engine
def test_real_engine_rollout_walks_every_stage_into_the_api_server(world, engine_env, cluster):
    project, prometheus, control, urls = world
    control.write_text("0")
    engine_canary(project, prometheus, "canary-real")
    run, seen = engine_rollout(project, "canary-real", urls, engine_env, cluster)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    records = [json.loads(line) for line in (project / "rollouts" / "canary-real-churn.jsonl").read_text().splitlines()]
    judged = [r for r in records if r["event"] == "judgement"]
    assert {r["stage"] for r in judged if r["verdict"] == "passed"} == {0, 1, 2}, "every stage passed before the next"
    assert "failed" not in {r["verdict"] for r in judged}
    assert (project / "rollouts" / "canary-real-churn.png").stat().st_size > 10_000
    applied = [r["weights"] for r in records if r["event"] == "apply"] + [{"champion": 100, "challenger": 0}]
    assert seen == applied, "every stage, then the promotion, reached the API server in order"
    updates = [u for u in history(project, "canary-real", engine_env) if u["kind"] == "update"]
    assert len(updates) == 4 and all(u["result"] == "succeeded" for u in updates), "one update per step"


@pytest.mark.engine
def test_real_engine_rollout_rolls_a_faulty_challenger_back_in_the_api_server(world, engine_env, cluster):
    project, prometheus, control, urls = world
    control.write_text("0.5")
    engine_canary(project, prometheus, "canary-faulty")
    try:
        run, seen = engine_rollout(project, "canary-faulty", urls, engine_env, cluster)
    finally:
        control.write_text("0")
    assert run.returncode == 1, run.stdout[-4000:] + run.stderr[-4000:]
    records = [
        json.loads(line) for line in (project / "rollouts" / "canary-faulty-churn.jsonl").read_text().splitlines()
    ]
    judged = [r for r in records if r["event"] == "judgement"]
    assert len(judged) <= 2 and judged[-1]["verdict"] == "failed", "judged and undone within two analysis intervals"
    error_check = next(c for c in judged[-1]["checks"] if c["name"] == "error_ratio")
    assert "rest_server_requests_total" in error_check["query"] and error_check["challenger"] > 0.02
    assert error_check["champion"] == 0, "the healthy champion's own series, split by the stack file's weights"
    assert seen == [{"challenger": 25, "champion": 75}, {"challenger": 0, "champion": 100}]
    assert weights(project, "canary-faulty") == {"champion": 100, "challenger": 0}
    updates = [u for u in history(project, "canary-faulty", engine_env) if u["kind"] == "update"]
    assert len(updates) == 2, "the stage and the rollback"
