"""The rollout under faults: a fake Prometheus answering chosen values, the stand-in `pulumi`, an injected clock.

Each test here failed on the rollout before it became a state machine (issue 10); the number is the item.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from ml_serving import metrics
from ml_serving.rollout import (
    EXIT_CODES,
    Action,
    Counters,
    Gate,
    Mode,
    Prometheus,
    PulumiStack,
    Result,
    RolloutError,
    RolloutRun,
    Verdict,
    decide,
    judge,
    rollout_run,
)
from ml_serving.settings import Rollout
from ml_serving.stackfile import load_settings
from tests.conftest import PROJECT_DIR, copy_project
from tests.test_rollout import canary, deploy, rollout, standin_env, ups, weights

# Which gate a query belongs to, told apart by what only its PromQL contains.
QUERY_KINDS = {
    "requests": lambda q: "increase(" in q,
    "error_ratio": lambda q: f'status_code=~"{metrics.SERVER_ERROR_STATUS}"' in q,
    "rejected": lambda q: f'status_code=~"{metrics.REFUSED_STATUS}"' in q,
    "latency": lambda q: "histogram_quantile" in q,
}


def vector(**values: float | str) -> dict:
    """A Prometheus instant-query answer with one sample per variant."""
    result = [{"metric": {metrics.MODEL: "churn", metrics.VARIANT: v}, "value": [0, str(x)]} for v, x in values.items()]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


class FakePrometheus:
    """An HTTP server speaking Prometheus' query API, answering each kind of query with what the test chose."""

    def __init__(self) -> None:
        self.answers: dict[str, object] = {
            "requests": vector(champion=500, challenger=500),
            "error_ratio": vector(champion=0.0, challenger=0.0),
            "rejected": vector(champion=0.0, challenger=0.0),
            "latency": vector(champion=0.05, challenger=0.05),
        }
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)["query"][0]
                kind = next(k for k, matches in QUERY_KINDS.items() if matches(query))
                body = json.dumps(fake.answers[kind]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def prometheus():
    fake = FakePrometheus()
    yield fake
    fake.close()


PLAN = Rollout.model_validate({"stages": [25, 50, 100], "minRequests": 10, "inconclusiveThreshold": 2,
                               "failureThreshold": 1})  # fmt: skip


def judged(prometheus: FakePrometheus, plan: Rollout = PLAN):
    return judge(Prometheus(prometheus.url), "churn", plan, 0, {"challenger": 25, "champion": 75}, "60s")


def check(judgement, name: str):
    return next(c for c in judgement.checks if c.name == name)


# -- the decision, exhaustively --------------------------------------------------------------------------------


@pytest.mark.parametrize("on_inconclusive", ["rollback", "pause"])
def test_decide_covers_every_verdict_counter_and_stage(on_inconclusive):
    for failure_threshold, inconclusive_threshold in itertools.product((1, 2, 3), (1, 2, 3)):
        plan = Rollout.model_validate({"failureThreshold": failure_threshold, "onInconclusive": on_inconclusive,
                                       "inconclusiveThreshold": inconclusive_threshold})  # fmt: skip
        for failures, inconclusive, last, verdict in itertools.product(range(4), range(4), (False, True), Verdict):
            action, after = decide(verdict, Counters(failures, inconclusive), last, plan)
            if verdict == Verdict.FAILED:
                assert after == Counters(failures + 1, inconclusive)
                assert action == (Action.ROLLBACK if failures + 1 >= failure_threshold else Action.HOLD)
            elif verdict in (Verdict.INCONCLUSIVE, Verdict.ERROR):
                assert after == Counters(failures, inconclusive + 1)
                give_up = Action.PAUSE if on_inconclusive == "pause" else Action.ROLLBACK
                assert action == (give_up if inconclusive + 1 >= inconclusive_threshold else Action.HOLD)
            else:
                assert after == Counters(), "a pass starts the counting again"
                assert action == (Action.PROMOTE if last else Action.ADVANCE)


def test_exit_codes_are_distinct_per_ending():
    endings = [Result.PROMOTED, Result.ROLLED_BACK, Result.PAUSED, Result.STOPPED, Result.NOT_DEPLOYED, Result.FAILED]
    codes = [int(EXIT_CODES[r]) for r in endings]
    assert len(set(codes)) == len(codes) and 2 not in codes, "2 stays every command's usage error"


# -- 1-4: the verdict of one judgement -------------------------------------------------------------------------


def test_1_a_failed_gate_wins_over_a_missing_one(prometheus):
    prometheus.answers["error_ratio"] = vector(champion=0.0, challenger=0.5)
    prometheus.answers["latency"] = vector(champion=0.05, challenger="NaN")
    judgement = judged(prometheus)
    assert check(judgement, Gate.LATENCY_P95).verdict == Verdict.INCONCLUSIVE
    assert judgement.verdict == Verdict.FAILED
    assert decide(judgement.verdict, Counters(), False, PLAN)[0] == Action.ROLLBACK, "failureThreshold 1: at once"
    prometheus.answers["error_ratio"] = vector(champion=0.0, challenger=0.0)
    prometheus.answers["latency"] = {"status": "error", "error": "bad query"}
    assert judged(prometheus).verdict == Verdict.ERROR, "an error outranks inconclusive and passed"


def test_2_infinite_p95_fails_the_latency_gate(prometheus):
    prometheus.answers["latency"] = vector(champion=0.05, challenger="+Inf")
    judgement = judged(prometheus)
    assert math.isinf(check(judgement, Gate.LATENCY_P95).challenger)
    assert check(judgement, Gate.LATENCY_P95).verdict == Verdict.FAILED
    assert check(judgement, Gate.LATENCY_P95_VS_CHAMPION).verdict == Verdict.FAILED
    assert judgement.verdict == Verdict.FAILED


def test_3_a_champion_without_data_makes_the_relative_gates_inconclusive(prometheus):
    prometheus.answers["error_ratio"] = vector(challenger=0.019)
    prometheus.answers["latency"] = vector(challenger=0.45)
    judgement = judged(prometheus)
    for gate in (Gate.ERROR_RATIO_VS_CHAMPION, Gate.LATENCY_P95_VS_CHAMPION, Gate.REJECTED_VS_CHAMPION):
        assert check(judgement, gate).verdict in (Verdict.INCONCLUSIVE, Verdict.PASSED)
    assert check(judgement, Gate.LATENCY_P95_VS_CHAMPION).verdict == Verdict.INCONCLUSIVE
    assert "no value for the champion" in check(judgement, Gate.LATENCY_P95_VS_CHAMPION).note
    assert judgement.verdict == Verdict.INCONCLUSIVE, "never promoted on absolute gates alone"
    assert any("no value for the champion" in reason for reason in judgement.reasons)


def test_3_at_the_last_stage_the_champion_serves_nothing_and_relative_gates_do_not_apply(prometheus):
    prometheus.answers["error_ratio"] = vector(challenger=0.0)
    prometheus.answers["latency"] = vector(challenger=0.05)
    prometheus.answers["rejected"] = vector(challenger=0.0)
    judgement = judge(Prometheus(prometheus.url), "churn", PLAN, 2, {"challenger": 100, "champion": 0}, "60s")
    assert {c.name for c in judgement.checks} == {Gate.REQUESTS, Gate.ERROR_RATIO, Gate.LATENCY_P95}
    assert judgement.verdict == Verdict.PASSED


@pytest.mark.parametrize(
    "answer",
    [[], {"status": "success"}, {"status": "success", "data": {"resultType": "scalar", "result": [0, "1"]}},
     {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": "x"}]}}],
    ids=["list", "no-data", "scalar", "bad-sample"],
)  # fmt: skip
def test_4_a_malformed_answer_is_an_error_check_with_its_reason(prometheus, answer):
    prometheus.answers["requests"] = answer
    judgement = judged(prometheus)
    assert judgement.verdict == Verdict.ERROR
    assert check(judgement, Gate.REQUESTS).note.startswith("Prometheus answered")


def test_4_a_malformed_answer_never_crashes_the_run(tmp_path, prometheus):
    project = copy_project(tmp_path / "project")
    canary(project, prometheus=prometheus.url)
    prometheus.answers["requests"] = {"status": "success"}
    run = rollout(project)
    assert "Traceback" not in run.stderr
    assert run.returncode == 1, "two inconclusive (error) checks, then the rollback: its own exit code"
    assert "Prometheus answered" in run.stdout
    assert weights(project) == {"champion": 100, "challenger": 0}


def test_13_a_challenger_refusing_what_the_champion_accepts_fails(prometheus):
    prometheus.answers["rejected"] = vector(champion=0.001, challenger=0.97)
    judgement = judged(prometheus)
    assert check(judgement, Gate.ERROR_RATIO).verdict == Verdict.PASSED, "4xx are not server errors"
    assert check(judgement, Gate.REJECTED_VS_CHAMPION).verdict == Verdict.FAILED
    assert "refuses 97.0% of requests" in check(judgement, Gate.REJECTED_VS_CHAMPION).note


# -- the run, in process, with the stand-in `pulumi` and an injected clock --------------------------------------


class Clock:
    """Time that moves only when the rollout sleeps; `during_sleep` runs what a person does meanwhile."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.during_sleep: list[Callable[[], None]] = []
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept.append(seconds)
        if self.during_sleep:
            self.during_sleep.pop(0)()


@pytest.fixture
def project(tmp_path, monkeypatch, prometheus):
    project = copy_project(tmp_path / "project")
    canary(project, prometheus=prometheus.url, interval=30)
    for key, value in standin_env(project).items():
        monkeypatch.setenv(key, value)
    return project


def runner(project: Path, prometheus: FakePrometheus, clock: Clock, mode: Mode = Mode.RUN) -> RolloutRun:
    return rollout_run(project, "canary", "churn", Prometheus(prometheus.url), PulumiStack(project, "canary"),
                       project / "rollouts" / "canary-churn.jsonl", mode=mode, report=lambda _: None,
                       sleep=clock.sleep, clock=clock.time)  # fmt: skip


def test_healthy_run_walks_every_stage_judging_after_each_deploy(project, prometheus):
    clock = Clock()
    outcome = runner(project, prometheus, clock).run()
    assert outcome.result == Result.PROMOTED, outcome.message
    assert clock.slept == [30, 30, 30] and ups(project) == 4, (
        "three stages judged one interval after their up, then promoted"
    )
    records = [json.loads(line) for line in (project / "rollouts" / "canary-churn.jsonl").read_text().splitlines()]
    assert [r["window"] for r in records if r["event"] == "judgement"] == ["30s"] * 3


def test_too_few_requests_never_advance_and_roll_back(project, prometheus):
    prometheus.answers["requests"] = vector(champion=500, challenger=3)
    outcome = runner(project, prometheus, Clock()).run()
    assert outcome.result == Result.ROLLED_BACK and "only 3 requests; need 10 to judge" in outcome.message
    records = [json.loads(line) for line in (project / "rollouts" / "canary-churn.jsonl").read_text().splitlines()]
    assert [r["weights"]["challenger"] for r in records if r["event"] == "apply"] == [25, 0], "never advanced"


def test_5_step_refuses_to_judge_a_stage_that_is_not_deployed(project, prometheus):
    clock = Clock()
    first = runner(project, prometheus, clock, Mode.STEP).run()
    assert first.result == Result.STEPPED and weights(project) == {"champion": 75, "challenger": 25}
    written = (project / "Pulumi.canary.yaml").read_text()
    second = runner(project, prometheus, clock, Mode.STEP).run()
    assert second.result == Result.NOT_DEPLOYED and "stage 1 (challenger at 25 %) is not deployed yet" in second.message
    assert (project / "Pulumi.canary.yaml").read_text() == written, "nothing written"
    deploy(project)
    clock.now = time.time() + 20  # the stand-in's update ended just now: 20 s of the 30 s interval have passed
    third = runner(project, prometheus, clock, Mode.STEP).run()
    assert third.result == Result.STEPPED and weights(project) == {"champion": 50, "challenger": 50}
    assert clock.slept and 9 <= clock.slept[0] <= 11, "it waits out the rest of the interval after the deploy"
    records = [json.loads(line) for line in (project / "rollouts" / "canary-churn.jsonl").read_text().splitlines()]
    judgement = next(r for r in records if r["event"] == "judgement")
    assert judgement["window"] in ("29s", "30s", "31s"), "the window starts after the deploy ended"


def test_5_step_through_the_cli_says_not_deployed_with_its_exit_code(tmp_path, prometheus):
    project = copy_project(tmp_path / "project")
    canary(project, prometheus=prometheus.url)
    assert rollout(project, "--step").returncode == 0
    again = rollout(project, "--step")
    assert again.returncode == 5 and "is not deployed yet" in again.stdout
    assert weights(project) == {"champion": 75, "challenger": 25}


def test_6_a_hand_edit_mid_rollout_stops_it_touching_nothing(project, prometheus):
    clock = Clock()
    path = project / "Pulumi.canary.yaml"

    def person_sets_it_back() -> None:
        path.write_text(path.read_text().replace("weight: 75", "weight: 100").replace("weight: 25}", "weight: 0}"))

    clock.during_sleep.append(person_sets_it_back)
    outcome = runner(project, prometheus, clock).run()
    assert outcome.result == Result.STOPPED and "someone else changed the weights" in outcome.message
    assert weights(project) == {"champion": 100, "challenger": 0}, "the person's edit stands"
    assert ups(project) == 1, "no up after the edit"
    assert EXIT_CODES[outcome.result] == 4


def test_6_someone_elses_up_is_drift_too(project, prometheus):
    clock = Clock()
    path = project / "Pulumi.canary.yaml"

    def someone_deploys_other_weights() -> None:
        mine = path.read_text()
        path.write_text(mine.replace("weight: 75", "weight: 90").replace("weight: 25}", "weight: 10}"))
        deploy(project)
        path.write_text(mine)

    clock.during_sleep.append(someone_deploys_other_weights)
    outcome = runner(project, prometheus, clock).run()
    assert outcome.result == Result.STOPPED and "someone else ran `pulumi up`" in outcome.message


def test_7_a_failed_up_restores_only_the_rollouts_own_fields(project, prometheus, monkeypatch):
    clock = Clock()
    path = project / "Pulumi.canary.yaml"

    def colleague_edits_elsewhere() -> None:
        text = path.read_text().replace("registeredModel: churn-classifier",
                                        "registeredModel: churn-classifier   # owned by the churn team")  # fmt: skip
        path.write_text(text.replace("ml-serving:namespace: models", "ml-serving:namespace: models-b"))

    clock.during_sleep.append(colleague_edits_elsewhere)
    monkeypatch.setenv("STANDIN_FAIL_UP_AT", "2")
    outcome = runner(project, prometheus, clock).run()
    assert outcome.result == Result.FAILED and "failed" in outcome.message
    text = path.read_text()
    assert "# owned by the churn team" in text and "namespace: models-b" in text, "others' edits stay"
    assert weights(project) == {"champion": 75, "challenger": 25}, "the weights as last applied"


def test_8_a_failed_promotion_up_restores_the_file_and_is_logged(project, prometheus, monkeypatch):
    clock = Clock()
    monkeypatch.setenv("STANDIN_FAIL_UP_AT", "4")
    outcome = runner(project, prometheus, clock).run()
    assert outcome.result == Result.FAILED
    variants = load_settings(project, "canary").models["churn"].variants
    assert (variants["champion"].version, variants["challenger"].version) == ("1", "2"), "not promoted on paper"
    assert weights(project) == {"champion": 0, "challenger": 100}, "what the cluster still runs"
    records = [json.loads(line) for line in (project / "rollouts" / "canary-churn.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "apply-failed" and "promote" not in [r["event"] for r in records]


def test_9_a_third_weighted_variant_is_refused_up_front(project, prometheus):
    path = project / "Pulumi.canary.yaml"
    path.write_text(path.read_text().replace("weight: 100\n", "weight: 90\n").replace(
        "        challenger:", '        legacy: {version: "3", modelUri: "file:///models/churn/3", weight: 10}\n        challenger:'))  # fmt: skip
    with pytest.raises(RolloutError, match="legacy keeps 10 % of the traffic"):
        runner(project, prometheus, Clock())
    assert ups(project) == 0


def test_11_a_promoted_model_is_not_rolled_out_again(project, prometheus):
    path = project / "Pulumi.canary.yaml"
    path.write_text(path.read_text().replace('version: "2", modelUri: "file:///models/churn/2"',
                                             'version: "1", modelUri: "file:///models/churn/1"'))  # fmt: skip
    with pytest.raises(RolloutError, match="promoted already"):
        runner(project, prometheus, Clock()).run()
    assert ups(project) == 0


def test_11_gate_edits_during_a_run_apply_from_the_next_judgement(project, prometheus):
    clock = Clock()
    path = project / "Pulumi.canary.yaml"
    prometheus.answers["latency"] = vector(champion=0.2, challenger=0.25)

    def tighten() -> None:
        path.write_text(path.read_text().replace("minRequests: 10", "minRequests: 10\n        maxP95Seconds: 0.1"))

    clock.during_sleep.extend([lambda: None, tighten])
    outcome = runner(project, prometheus, clock).run()
    assert outcome.result == Result.ROLLED_BACK and "limit 0.1" in outcome.message


def test_11_the_picture_draws_each_gates_limit_beside_its_values(project, prometheus):
    from ml_serving.rollout.report import limit_series, read_log, write_picture

    clock = Clock()
    path = project / "Pulumi.canary.yaml"
    clock.during_sleep.extend([lambda: None, lambda: path.write_text(
        path.read_text().replace("minRequests: 10", "minRequests: 10\n        maxP95Seconds: 0.3"))])  # fmt: skip
    runner(project, prometheus, clock).run()
    records = read_log(project / "rollouts" / "canary-churn.jsonl")
    judged = [r for r in records if r["event"] == "judgement"]
    assert [limit for _, limit in limit_series(judged, Gate.LATENCY_P95, records[0]["time"])] == [0.5, 0.3, 0.3]
    assert write_picture(records, project / "picture.png").stat().st_size > 10_000


def test_10_abort_stops_a_running_rollout_which_rolls_back_once(tmp_path, prometheus):
    project = copy_project(tmp_path / "project")
    canary(project, prometheus=prometheus.url, interval=600)
    running = rollout(project, wait=False)
    deadline = time.monotonic() + 120
    while ups(project) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    aborted = rollout(project, "--abort")
    out, err = running.communicate(timeout=120)
    assert aborted.returncode == 0 and "asked the running rollout" in aborted.stdout, aborted.stdout + aborted.stderr
    assert running.returncode == 1 and "Traceback" not in err, err
    assert "interrupted by SIGTERM" in out
    assert weights(project) == {"champion": 100, "challenger": 0} and ups(project) == 2, "one rollback"


def test_10_ctrl_c_rolls_back_cleanly(tmp_path, prometheus):
    project = copy_project(tmp_path / "project")
    canary(project, prometheus=prometheus.url, interval=600)
    running = rollout(project, wait=False)
    deadline = time.monotonic() + 120
    while ups(project) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    running.send_signal(2)
    _, err = running.communicate(timeout=120)
    assert running.returncode == 1 and "Traceback" not in err, err
    assert weights(project) == {"champion": 100, "challenger": 0}


def test_12_no_rollout_lock_is_tracked_by_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True).stdout
    assert not [line for line in tracked.splitlines() if line.startswith(".rollout-")]


# -- issue 24: a stack file that stops parsing, a second signal during the rollback, the small ones --------------


def log_of(project: Path) -> list[dict]:
    return [json.loads(line) for line in (project / "rollouts" / "canary-churn.jsonl").read_text().splitlines()]


BROKEN = "  ml-serving:broken: [unclosed\n"  # a person's half-typed edit: the file no longer parses


def test_24_a_file_that_stops_parsing_while_a_stage_waits_is_a_drift_stop_that_records_what_runs(project, prometheus):
    clock = Clock()
    path = project / "Pulumi.canary.yaml"
    clock.during_sleep.append(lambda: path.write_text(path.read_text() + BROKEN))
    outcome = runner(project, prometheus, clock).run()
    assert outcome.result == Result.STOPPED and EXIT_CODES[outcome.result] == 4, outcome.message
    assert "no longer parses" in outcome.message and "challenger 25 %" in outcome.message
    stopped = log_of(project)[-1]
    assert stopped["event"] == "stopped" and stopped["weights"] == {"challenger": 25, "champion": 75}
    assert path.read_text().endswith(BROKEN), "the person's edit stands" and ups(project) == 1


class BreakingStack(PulumiStack):
    """`pulumi up` during which a person leaves the stack file unparseable (and, told so, the up fails)."""

    def up(self) -> None:
        path = self.project_dir / "Pulumi.canary.yaml"
        if ups(self.project_dir) == 1:
            path.write_text(path.read_text() + BROKEN)
        super().up()


def test_24_a_failed_up_restores_its_own_fields_however_the_file_looks(project, prometheus, monkeypatch):
    monkeypatch.setenv("STANDIN_FAIL_UP_AT", "2")
    path = project / "Pulumi.canary.yaml"
    run = rollout_run(project, "canary", "churn", Prometheus(prometheus.url), BreakingStack(project, "canary"),
                      project / "rollouts" / "canary-churn.jsonl", report=lambda _: None, sleep=Clock().sleep,
                      clock=Clock().time)  # fmt: skip
    outcome = run.run()
    assert outcome.result == Result.FAILED and EXIT_CODES[outcome.result] == 6, outcome.message
    failed = log_of(project)[-1]
    assert failed["event"] == "apply-failed" and failed["restored"] == {"challenger": 25, "champion": 75}
    assert path.read_text().endswith(BROKEN), "the person's edit stays"
    path.write_text(path.read_text().removesuffix(BROKEN))  # the person fixes the syntax
    assert weights(project) == {"champion": 75, "challenger": 25}, "the file says what the stack runs"


def test_24_a_second_signal_during_the_rollbacks_up_is_ignored(tmp_path, prometheus):
    project = copy_project(tmp_path / "project")
    canary(project, prometheus=prometheus.url, interval=600)
    running = rollout(project, env={"STANDIN_SLEEP_UP_AT": "2"}, wait=False)
    deadline = time.monotonic() + 120
    while ups(project) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    running.send_signal(15)
    while ups(project) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    running.send_signal(15)  # the rollback's `pulumi up` (60 s in the stand-in) is under way
    out, err = running.communicate(timeout=180)
    assert "Traceback" not in err, err
    assert running.returncode == 1 and "rolled back (interrupted by SIGTERM)" in out
    assert [r["event"] for r in log_of(project)][-1] == "rollback"
    assert "rollout checks" in out, "the table is printed"
    assert weights(project) == {"champion": 100, "challenger": 0}


def test_24_an_http_error_page_is_reported_as_what_it_is(prometheus):
    class HtmlError(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(500)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html><body>Internal Server Error</body></html>")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), HtmlError)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judgement = judge(Prometheus(f"http://127.0.0.1:{server.server_address[1]}"), "churn", PLAN, 0,
                          {"challenger": 25, "champion": 75}, "60s")  # fmt: skip
    finally:
        server.shutdown()
    note = check(judgement, Gate.REQUESTS).note
    assert judgement.verdict == Verdict.ERROR
    assert "HTTP 500" in note and "unreachable" not in note and "JSONDecodeError" not in note, note


def test_24_a_zero_interval_says_it_must_be_greater_than_zero():
    from ml_serving.settings import ConfigError, parse_settings

    with pytest.raises(ConfigError) as raised:
        parse_settings({"ml-serving:models": {"churn": {"registeredModel": "churn", "rollout": {"intervalSeconds": 0},
                        "variants": {"a": {"version": "1", "modelUri": "file:///m", "weight": 100}}}}}, "x")  # fmt: skip
    message = str(raised.value)
    assert "rollout.intervalSeconds" in message and "greater than 0" in message and "at least" not in message


def test_24_a_step_that_is_not_deployed_writes_no_record_and_no_picture(tmp_path, prometheus):
    project = copy_project(tmp_path / "project")
    canary(project, prometheus=prometheus.url)
    assert rollout(project, "--step").returncode == 0
    log, picture = project / "rollouts" / "canary-churn.jsonl", project / "rollouts" / "canary-churn.png"
    before, drawn = log.read_text(), picture.stat().st_mtime_ns
    again = rollout(project, "--step")
    assert again.returncode == 5, again.stdout + again.stderr
    assert log.read_text() == before, "nothing written: not even a start record"
    assert picture.stat().st_mtime_ns == drawn, "the picture is not redrawn"


def test_24_a_rollback_after_a_signal_whose_up_fails_ends_as_failed_not_as_a_usage_error(project, prometheus,
                                                                                          monkeypatch):  # fmt: skip
    from ml_serving.rollout import Interrupted

    def signal_arrives() -> None:
        raise Interrupted("SIGTERM")

    clock = Clock()
    clock.during_sleep.append(signal_arrives)
    monkeypatch.setenv("STANDIN_FAIL_UP_AT", "2")
    outcome = runner(project, prometheus, clock).run()
    assert outcome.result == Result.FAILED and EXIT_CODES[outcome.result] == 6, outcome.message
    assert "rollback failed" in outcome.message
    assert log_of(project)[-1]["event"] == "apply-failed"
    assert weights(project) == {"champion": 75, "challenger": 25}, "the file says what the stack runs"
