"""The pull-request preview and deploy workflows: GitHub's schema, zizmor's audit, pinned actions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ml_serving.stackfile import load_settings
from tests.conftest import PROJECT_DIR

WORKFLOWS = sorted((PROJECT_DIR / ".github" / "workflows").glob("*.yml"))


def tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.skip(f"{name} not installed (pip install {name})")
    return found


def test_there_are_preview_and_deploy_workflows():
    assert {p.name for p in WORKFLOWS} == {"preview.yml", "deploy.yml"}


def test_workflows_validate_against_githubs_schema():
    run = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_zizmor_finds_nothing_high():
    run = subprocess.run(
        [tool("zizmor"), "--offline", "--format", "json", str(PROJECT_DIR / ".github" / "workflows")],
        capture_output=True, text=True,
    )  # fmt: skip
    findings = json.loads(run.stdout or "[]")
    high = [f for f in findings if f.get("determinations", {}).get("severity") == "High"]
    assert not high, json.dumps(high, indent=1)[:3000]


def test_actions_are_pinned_by_commit_and_permissions_are_least():
    for path in WORKFLOWS:
        text = path.read_text()
        for action in re.findall(r"uses:\s*([^\s#]+)", text):
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", action), f"{path.name}: {action} is not pinned"
        workflow = yaml.safe_load(text)
        assert workflow["permissions"] == {}, f"{path.name}: no default permissions"
        for name, job in workflow["jobs"].items():
            assert "write-all" not in str(job.get("permissions")), name
            assert job["permissions"].get("contents") == "read", name


def test_prod_deploys_behind_its_environment_and_previews_post_both_diffs():
    deploy = yaml.safe_load((PROJECT_DIR / ".github" / "workflows" / "deploy.yml").read_text())
    job = deploy["jobs"]["up"]
    assert job["environment"] == "${{ matrix.stack }}" and job["strategy"]["matrix"]["stack"] == ["prod"]
    assert job["strategy"]["max-parallel"] == 1
    preview = (PROJECT_DIR / ".github" / "workflows" / "preview.yml").read_text()
    assert "ml-serving plan" in preview and "--diff" in preview and "gh pr comment" in preview
    assert "command: preview" in preview and "comment-on-pr: true" in preview


def _reachable_from_a_runner(stack: str) -> bool:
    """A stack a CI runner can deploy: its registry is a server (not a file under the checkout) and its provider
    talks to a cluster (not a folder of YAML)."""
    settings = load_settings(PROJECT_DIR, stack)
    registry = settings.registry.tracking_uri if settings.registry else "https://"
    return registry.startswith(("http://", "https://")) and not settings.kubernetes.render_yaml_to_directory


def _steps_until(job: dict, action: str) -> list[dict]:
    names = [str(step.get("uses", "")) for step in job["steps"]]
    index = next(i for i, uses in enumerate(names) if uses.startswith(action))
    return job["steps"][:index]


def test_jobs_that_reach_the_cluster_get_credentials_through_oidc_and_only_for_reachable_stacks():
    deploy = yaml.safe_load((PROJECT_DIR / ".github" / "workflows" / "deploy.yml").read_text())
    preview = yaml.safe_load((PROJECT_DIR / ".github" / "workflows" / "preview.yml").read_text())
    deployed = deploy["jobs"]["up"]["strategy"]["matrix"]["stack"]
    stacks = [p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in PROJECT_DIR.glob("Pulumi.*.yaml")]
    assert sorted(deployed) == sorted(s for s in stacks if _reachable_from_a_runner(s)), "dev is a local sandbox"
    assert f"fromJSON('{json.dumps(deployed)}')" in preview["jobs"]["preview"]["env"]["CLUSTER_STACK"]
    for job in (deploy["jobs"]["up"], preview["jobs"]["preview"]):
        assert job["permissions"].get("id-token") == "write", "OIDC: no stored cloud keys"
        before = _steps_until(job, "pulumi/actions@")
        credentials = [s for s in before if str(s.get("uses", "")).startswith("aws-actions/configure-aws-credentials@")]
        assert credentials and credentials[0]["with"]["role-to-assume"].startswith("${{ vars.")
        assert any("update-kubeconfig" in str(s.get("run", "")) for s in before), "a kubeconfig from the role"
        pulumi_step = job["steps"][len(before)]
        assert pulumi_step["env"]["KUBECONFIG"] == "${{ runner.temp }}/kubeconfig"
        assert "MLFLOW_TRACKING_TOKEN" in pulumi_step["env"], "MLflow's client authenticates from the environment"
        assert "AWS_ACCESS_KEY_ID" not in json.dumps(job) and "AWS_SECRET_ACCESS_KEY" not in json.dumps(job)
