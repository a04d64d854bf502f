"""`ml-serving rollout` with a stand-in `pulumi` on PATH (the process boundary) and Prometheus real or absent."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_serving.stackfile import load_settings
from tests import processes
from tests.conftest import copy_project

STANDIN = Path(__file__).resolve().parent / "standin"
CLI = [sys.executable, "-m", "ml_serving.cli"]

CANARY = """\
# canary: the stack the rollout tests move
config:
  ml-serving:namespace: models
  ml-serving:platform: {{seldon: existing, keda: existing, istioGateway: existing}}
  ml-serving:monitoring: {{stack: existing, prometheusUrl: "{prometheus}"}}
  ml-serving:models:
    churn:
      registeredModel: churn-classifier
      rollout:
        stages: [25, 50, 100]
        intervalSeconds: {interval}
        minRequests: {min_requests}
        inconclusiveThreshold: 2
        onInconclusive: {on_inconclusive}
      variants:
        champion:   # serving production today
          version: "1"
          modelUri: file:///models/churn/1
          weight: 100
        challenger: {{version: "2", modelUri: "file:///models/churn/2", weight: 0}}   # the candidate
"""


def canary(project: Path, prometheus: str = "http://127.0.0.1:9", interval: float = 0.2, min_requests: int = 10,
           on_inconclusive: str = "rollback") -> Path:  # fmt: skip
    path = project / "Pulumi.canary.yaml"
    path.write_text(CANARY.format(prometheus=prometheus, interval=interval, min_requests=min_requests,
                                  on_inconclusive=on_inconclusive))  # fmt: skip
    return path


def weights(project: Path, stack: str = "canary") -> dict[str, int]:
    variants = load_settings(project, stack).models["churn"].variants
    return {name: v.weight for name, v in variants.items()}


def standin_env(project: Path) -> dict[str, str]:
    """The stand-in `pulumi` first on PATH, run by this Python, recording into the project."""
    return {"PATH": f"{STANDIN}:{os.environ['PATH']}", "STANDIN_LOG": str(project / "calls.jsonl"),
            "STANDIN_PYTHON": sys.executable, "PULUMI_CONFIG_PASSPHRASE": "unused-by-the-stand-in"}  # fmt: skip


def deploy(project: Path) -> None:
    """What a pull request's merge does: `pulumi up` of the stack file as it is (here, the stand-in's)."""
    subprocess.run([str(STANDIN / "pulumi"), "up", "--yes", "--stack", "canary"], cwd=project,
                   env={**os.environ, **standin_env(project)}, check=True, capture_output=True)  # fmt: skip


def rollout(project: Path, *args: str, env: dict | None = None, wait: bool = True):
    environment = {**os.environ, **standin_env(project), "COLUMNS": "200", **(env or {})}
    command = [*CLI, "--project-dir", str(project), "rollout", "churn", "--stack", "canary", *args]
    if not wait:
        return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)


def ups(project: Path) -> int:
    calls = project / "calls.jsonl"
    if not calls.exists():
        return 0
    return sum(1 for line in calls.read_text().splitlines() if json.loads(line)["args"][:1] == ["up"])


def log_records(project: Path) -> list[dict]:
    return [json.loads(line) for line in (project / "rollouts" / "canary-churn.jsonl").read_text().splitlines()]


@pytest.fixture
def project(tmp_path):
    return copy_project(tmp_path / "project")


def test_prometheus_unreachable_is_inconclusive_then_rolls_back(project):
    canary(project)
    run = rollout(project)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "rolled-back" in run.stdout and "inconclusive" in run.stdout
    assert "unreachable" in run.stdout
    assert weights(project) == {"champion": 100, "challenger": 0}
    text = (project / "Pulumi.canary.yaml").read_text()
    assert "# serving production today" in text and "# the candidate" in text, "comments survive every edit"
    records = log_records(project)
    judged = [r for r in records if r["event"] == "judgement"]
    assert len(judged) == 2 and all(r["verdict"] == "error" for r in judged), (
        "unreachable is an error, counted as inconclusive"
    )
    assert "increase(rest_server_requests_total" in judged[0]["checks"][0]["query"]
    assert [r["weights"]["challenger"] for r in records if r["event"] == "apply"] == [25, 0]
    assert ups(project) == 2, "stage 1 applied, then the rollback applied"


def test_inconclusive_can_pause_instead(project):
    canary(project, on_inconclusive="pause")
    run = rollout(project)
    assert run.returncode == 3, "paused has its own exit code"
    assert "paused at 25 %" in run.stdout
    assert weights(project) == {"champion": 75, "challenger": 25}, "a pause leaves the stage as applied"


def test_empty_query_says_which_query_was_empty(project, tmp_path):
    shutil_which("prometheus")
    with processes.prometheus_server({"global": {"scrape_interval": "1s"}, "scrape_configs": []}, tmp_path) as url:
        canary(project, prometheus=url)
        run = rollout(project)
    assert run.returncode == 1
    assert "the query returned nothing" in run.stdout
    judged = [r for r in log_records(project) if r["event"] == "judgement"]
    assert judged[0]["checks"][0]["name"] == "requests" and judged[0]["checks"][0]["note"].startswith("the query")


def shutil_which(name: str) -> str:
    import shutil

    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return found


def test_a_second_rollout_of_the_stack_is_refused(project):
    canary(project)
    with (project / ".rollout-canary.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        run = rollout(project)
    assert run.returncode == 2
    assert "another rollout of stack canary is running" in run.stderr
    assert weights(project) == {"champion": 100, "challenger": 0} and ups(project) == 0


def test_failed_pulumi_up_leaves_the_file_as_last_applied(project):
    canary(project, on_inconclusive="pause", min_requests=1)
    first = rollout(project, "--step")
    assert first.returncode == 0, first.stderr
    assert weights(project) == {"champion": 75, "challenger": 25}
    applied = (project / "Pulumi.canary.yaml").read_text()
    run = rollout(project, "--abort", env={"STANDIN_FAIL_UP_AT": "1"})
    assert run.returncode == 6, "stopped by an error"
    assert "`pulumi up` for stack canary failed" in run.stdout
    assert (project / "Pulumi.canary.yaml").read_text() == applied, "the file still says what was applied"


def killed_temp(project: Path) -> dict[str, str]:
    """A temp folder for a run the test kills with SIGKILL, which cannot remove its engine's temp folder itself."""
    (project / "tmp").mkdir(exist_ok=True)
    return {"TMPDIR": str(project / "tmp")}


def test_killed_during_up_then_resume_continues_at_the_right_stage(project):
    canary(project, on_inconclusive="pause")
    assert rollout(project, "--step").returncode == 0
    # --step again: judges stage 1 (inconclusive, pauses) ... so move on by hand to stage 2 as a PR would:
    path = project / "Pulumi.canary.yaml"
    path.write_text(path.read_text().replace("weight: 75", "weight: 50").replace("weight: 25}", "weight: 50}"))
    running = rollout(project, "--resume", env={"STANDIN_SLEEP_UP_AT": "1", **killed_temp(project)}, wait=False)
    deadline = time.monotonic() + 60
    while ups(project) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    running.send_signal(signal.SIGKILL)
    running.wait()
    assert weights(project) == {"champion": 50, "challenger": 50}, "the file is valid and says what was asked"
    resumed = rollout(project, "--resume")
    assert "resuming at 50 %" in resumed.stdout
    assert "paused at 50 %" in resumed.stdout, "it judged stage 2, not stage 1"
    assert ups(project) == 2


def selects(project: Path) -> int:
    calls = project / "calls.jsonl"
    return sum(1 for line in calls.read_text().splitlines() if json.loads(line)["args"][:2] == ["stack", "select"])


def test_killed_between_the_file_write_and_up_then_resume(project):
    canary(project, on_inconclusive="pause")
    running = rollout(project, env={"STANDIN_SLEEP_SELECT_AT": "1", **killed_temp(project)}, wait=False)
    deadline = time.monotonic() + 60
    while (not (project / "calls.jsonl").exists() or selects(project) < 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    running.send_signal(signal.SIGKILL)
    running.wait()
    assert ups(project) == 0, "killed before `pulumi up`"
    assert weights(project) == {"champion": 75, "challenger": 25}, "the file was written whole: it parses"
    resumed = rollout(project, "--resume")
    assert "resuming at 25 %" in resumed.stdout and "paused at 25 %" in resumed.stdout
    assert ups(project) == 1, "resume applied what the file says"


def test_dry_run_changes_nothing(project):
    canary(project)
    run = rollout(project, "--dry-run")
    assert run.returncode == 0
    assert "dry run, nothing written" in run.stdout
    assert weights(project) == {"champion": 100, "challenger": 0} and ups(project) == 0
    assert not (project / "rollouts").exists(), "no log, no picture"


def test_already_running_rollout_needs_resume_or_abort(project):
    canary(project, on_inconclusive="pause", min_requests=1)
    assert rollout(project, "--step").returncode == 0
    run = rollout(project)
    assert run.returncode == 2
    assert "already at 25 %: continue with --resume, or roll back with --abort" in run.stderr


def test_step_writes_each_edit_for_a_pull_request_and_never_applies(project):
    canary(project, on_inconclusive="rollback", min_requests=1, interval=1)
    first = rollout(project, "--step")
    assert first.returncode == 0, first.stderr
    assert "wrote stage 1 (25 %) to Pulumi.canary.yaml" in first.stdout
    assert weights(project) == {"champion": 75, "challenger": 25} and ups(project) == 0
    # The pull request merged and deployed stage 1; the next --step judges it (Prometheus is down here, so the
    # checks are errors) and, after the threshold, writes the rollback for the next pull request.
    deploy(project)
    second = rollout(project, "--step")
    assert len([r for r in log_records(project) if r["event"] == "judgement"]) == 2
    assert second.returncode == 1
    assert "written to Pulumi.canary.yaml: merge it now" in second.stdout
    assert weights(project) == {"champion": 100, "challenger": 0} and ups(project) == 1, "only the merge's deploy"
    text = (project / "Pulumi.canary.yaml").read_text()
    assert "# serving production today" in text and "# the candidate" in text


def test_without_the_pulumi_cli_nothing_is_written(project):
    canary(project)
    before = (project / "Pulumi.canary.yaml").read_text()
    path = str(Path(sys.executable).parent) + ":/usr/bin:/bin"
    no_tools = {"PATH": path, "ML_SERVING_TOOLS_CACHE": str(project / "no-tools"), "PULUMI_CONFIG_PASSPHRASE": "x"}
    for args in ((), ("--abort",)):
        run = subprocess.run([*CLI, "--project-dir", str(project), "rollout", "churn", "--stack", "canary", *args],
                             env={**os.environ, **no_tools}, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 2, run.stdout + run.stderr
        assert "no Pulumi CLI: run `./run tools`" in run.stderr and "Traceback" not in run.stderr
        assert (project / "Pulumi.canary.yaml").read_text() == before


def test_dry_run_explains_its_verdict(project):
    canary(project)
    run = rollout(project, "--dry-run")
    assert "before stage 1" in run.stdout and "unreachable" in run.stdout
    assert "UserWarning" not in run.stderr


def test_stage_edits_work_on_the_real_prod_stack_and_keep_its_secrets(project):
    """Prod carries encrypted values (`secure:`): an edit must validate them as secrets and keep them verbatim."""
    from ml_serving.rollout import write_weights

    path = project / "Pulumi.prod.yaml"
    before = path.read_text()
    write_weights(path, "churn", {"champion": 75, "challenger": 25})
    after = path.read_text()
    assert load_settings(project, "prod").models["churn"].variants["challenger"].weight == 25
    changed = [(old, new) for old, new in zip(before.splitlines(), after.splitlines(), strict=True) if old != new]
    assert len(changed) == 2 and all("weight" in new for _, new in changed), changed
