"""The `ml-serving` console script as a user runs it: plan, plan --diff REF, pin, seed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ml_serving.stackfile import load_settings
from tests.conftest import copy_project

CLI = shutil.which("ml-serving") or f"{Path(sys.executable).parent / 'ml-serving'}"


def ml_serving(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, env=environment, timeout=300)


def git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", *args],
        cwd=cwd, check=True, capture_output=True,
    )  # fmt: skip


@pytest.fixture
def project(tmp_path):
    project = copy_project(tmp_path / "project")
    git("init", "-q", "-b", "main", cwd=project)
    git("add", "-A", cwd=project)
    git("commit", "-qm", "base", cwd=project)
    return project


def test_plan_prod_needs_no_registry_and_writes_every_object(project):
    run = ml_serving("plan", "prod", cwd=project, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert run.returncode == 0, run.stderr
    rendered = project / "rendered" / "prod"
    files = sorted(p.name for p in rendered.glob("*.yaml"))
    assert "seldondeployment_models_churn.yaml" in files
    assert "seldondeployment_models_fraud.yaml" in files
    assert "namespace__cluster_models.yaml" in files
    assert "gateway_istio-system_seldon-gateway.yaml" in files
    assert "helm-release_seldon-system_seldon-core.yaml" in files
    sdep = yaml.safe_load((rendered / "seldondeployment_models_churn.yaml").read_text())
    assert list(sdep)[:3] == ["apiVersion", "kind", "metadata"]
    for expected in ("SeldonDeployment", "churn", "challenger", "10%", "shadow", "pinned from @candidate"):
        assert expected in run.stdout
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr


def test_plan_diff_shows_exactly_what_a_weight_edit_changes(project):
    stack = project / "Pulumi.prod.yaml"
    stack.write_text(stack.read_text().replace("weight: 90\n", "weight: 75\n").replace("weight: 10\n", "weight: 25\n"))
    run = ml_serving("plan", "prod", "--diff", "HEAD", cwd=project)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "3 object(s) differ from the plan at HEAD" in out
    assert "~ seldondeployment_models_churn (changed)" in out
    assert "~ prometheusrule_models_ml-serving-alerts (changed)" in out, "the no-traffic alert names the weight"
    assert "~ configmap_monitoring_ml-serving-dashboard-models-churn (changed)" in out, "configured weights are drawn"
    sdep_diff = out.split("+++ b/seldondeployment_models_churn.yaml")[1].split("--- a/")[0]
    changed = [line for line in sdep_diff.splitlines() if line.startswith(("+", "-"))]
    assert sorted(changed) == ["+    traffic: 25", "+    traffic: 75", "-    traffic: 10", "-    traffic: 90"]


def test_plan_diff_against_an_identical_ref_is_empty(project):
    run = ml_serving("plan", "prod", "--diff", "HEAD", cwd=project)
    assert run.returncode == 0, run.stderr
    assert "no object changes against HEAD" in run.stdout


def test_plan_diff_with_a_bad_ref_is_a_clear_error(project):
    run = ml_serving("plan", "prod", "--diff", "no-such-branch", cwd=project)
    assert run.returncode == 2
    assert "git cannot read ref 'no-such-branch'" in run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout == "" and not (project / "rendered").exists(), "refused before planning anything"


def test_serve_an_unknown_model_or_alias_is_a_clear_error(project, registry):
    for model, reason in (
        ("models:/no-such-model@champion", "no-such-model"),
        ("models:/churn-classifier@gold", "alias gold not found"),
    ):
        run = ml_serving("serve", model, "--tracking-uri", registry.tracking_uri, cwd=project)
        assert run.returncode == 2, run.stderr
        assert f"cannot fetch {model} from the registry at {registry.tracking_uri}" in run.stderr
        assert reason in run.stderr and "Traceback" not in run.stderr
    folder = ml_serving("serve", str(project / "serving_image"), cwd=project)
    assert folder.returncode == 2 and "has no MLmodel file" in folder.stderr


STAGING = """\
# staging follows the registry's aliases; `ml-serving pin staging` freezes them for review.
config:
  ml-serving:namespace: models-staging
  ml-serving:registry:
    trackingUri: {uri}
  ml-serving:platform: {{seldon: existing, keda: existing, istioGateway: existing}}
  ml-serving:models:
    churn:
      registeredModel: churn-classifier   # the registry's name
      variants:
        champion: {{alias: champion, weight: 90}}   # most traffic
        challenger: {{alias: candidate, weight: 10}}
        mirror:
          alias: candidate
          shadow: true  # sees everything, answers nobody
"""


def test_pin_writes_versions_keeps_comments_and_plans_offline(project, registry):
    stack = project / "Pulumi.staging.yaml"
    stack.write_text(STAGING.format(uri=registry.tracking_uri))
    run = ml_serving("pin", "staging", cwd=project)
    assert run.returncode == 0, run.stderr
    text = stack.read_text()
    for comment in ("# staging follows", "# the registry's name", "# most traffic", "# sees everything"):
        assert comment in text
    settings = load_settings(project, "staging")
    variants = settings.models["churn"].variants
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    assert (variants["champion"].version, variants["champion"].pinned_from) == ("1", "champion")
    assert (variants["challenger"].version, variants["challenger"].pinned_from) == ("2", "candidate")
    assert variants["champion"].model_uri == client.get_model_version_download_uri("churn-classifier", "1")
    assert variants["champion"].run_id == client.get_model_version("churn-classifier", "1").run_id
    assert variants["champion"].weight == 90 and variants["mirror"].shadow is True
    assert variants["champion"].alias is None
    locked = project / "model-lock" / "churn-classifier" / "v2" / "requirements.txt"
    source = client.get_model_version_download_uri("churn-classifier", "2").removeprefix("file://")
    assert locked.read_text() == (Path(source) / "requirements.txt").read_text(), "the image builds from this copy"
    python_env = locked.parent / "python_env.yaml"
    assert python_env.read_text() == (Path(source) / "python_env.yaml").read_text(), "and its Python version"

    stack.write_text(text.replace(registry.tracking_uri, "http://127.0.0.1:9"))
    run = ml_serving("plan", "staging", cwd=project, env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert run.returncode == 0, run.stderr
    assert "pinned from @champion" in run.stdout


def test_pin_again_after_an_alias_move_is_a_one_line_change(project, registry):
    stack = project / "Pulumi.staging.yaml"
    stack.write_text(STAGING.format(uri=registry.tracking_uri))
    assert ml_serving("pin", "staging", cwd=project).returncode == 0
    first = stack.read_text()
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    client.set_registered_model_alias("churn-classifier", "champion", "2")
    try:
        run = ml_serving("pin", "staging", cwd=project)
    finally:
        client.set_registered_model_alias("churn-classifier", "champion", "1")
    assert run.returncode == 0, run.stderr
    assert "1 → 2" in run.stdout
    removed = [line for line in first.splitlines() if line not in stack.read_text().splitlines()]
    assert [line.strip().split(":")[0] for line in removed] == ["version", "modelUri", "runId"]


def test_pin_with_an_unknown_alias_changes_nothing(project, registry):
    stack = project / "Pulumi.staging.yaml"
    original = STAGING.format(uri=registry.tracking_uri).replace("alias: candidate, weight", "alias: gold, weight")
    stack.write_text(original)
    run = ml_serving("pin", "staging", cwd=project)
    assert run.returncode == 2
    assert "has no alias 'gold'" in run.stderr
    assert stack.read_text() == original


def test_seed_registers_a_champion_once(tmp_path, project):
    uri = f"sqlite:///{tmp_path / 'seeded.db'}"
    first = ml_serving("seed", "--tracking-uri", uri, cwd=project)
    assert first.returncode == 0, first.stderr
    assert "churn-classifier v1 @champion" in first.stdout and "registered" in first.stdout
    again = ml_serving("seed", "--tracking-uri", uri, cwd=project)
    assert "already there" in again.stdout


def test_plan_preview_drives_the_pulumi_cli_on_a_local_backend(project, tmp_path):
    """The stand-in `pulumi` records its calls: the process boundary (the real engine has tests of its own)."""
    from tests.test_rollout import standin_env

    run = ml_serving("plan", "prod", "--diff", "main", "--preview", cwd=project, env=standin_env(project))
    assert run.returncode == 0, run.stderr
    assert "no object changes against main" in run.stdout, "--diff and --preview together do both"
    calls = [json.loads(line)["args"] for line in (project / "calls.jsonl").read_text().splitlines()]
    preview = next(call for call in calls if call[0] == "preview")
    assert {"--diff", "--stack", "prod", "--exec-kind", "auto.inline"} <= set(preview), "inline program, diff shown"
    assert (project / ".pulumi-state").is_dir(), "a local file backend unless PULUMI_BACKEND_URL says otherwise"


def test_plan_preview_without_the_cli_says_so(project, tmp_path):
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "ML_SERVING_TOOLS_CACHE": str(tmp_path)}
    run = ml_serving("plan", "prod", "--preview", cwd=project, env=env)
    assert run.returncode == 0, run.stderr
    assert "skipped `pulumi preview`: no Pulumi CLI: run `./run tools`" in run.stdout
