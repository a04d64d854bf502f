"""`ml-serving rollout`: move a challenger's traffic up stage by stage, judged on Prometheus, undone on failure.

The stack file is the only state: every step is a round-trip edit of `Pulumi.<stack>.yaml` (comments kept, the
file replaced atomically) followed by `pulumi up`, so a rollback is a commit-able edit and a crash leaves a file
that says what was last asked for. Every judgement is written to a JSON-lines log with each query as sent, its
values for champion and challenger, the limit and the verdict.

The loop is a small state machine: `decide` is a pure function of (verdict, counters, stage), and everything with
side effects (the file, `pulumi up`, Prometheus, the clock) sits around it in `RolloutRun`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Any

import requests

from ml_serving import metrics
from ml_serving.metrics import Scope
from ml_serving.settings import ConfigError, Model, Rollout, Settings
from ml_serving.stackfile import edit, load_settings, revert, stack_file


class Verdict(StrEnum):
    """A check's or a judgement's verdict. A judgement takes the worst of its checks, in `SEVERITY` order."""

    PASSED = "passed"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"  # the measurement itself failed: Prometheus unreachable, or an answer that is not a vector
    FAILED = "failed"


SEVERITY = [Verdict.PASSED, Verdict.INCONCLUSIVE, Verdict.ERROR, Verdict.FAILED]  # Argo Rollouts' order


class Gate(StrEnum):
    """What a rollout judges; the names are used in the log, the report and the picture."""

    REQUESTS = "requests"
    ERROR_RATIO = "error_ratio"
    ERROR_RATIO_VS_CHAMPION = "error_ratio_vs_champion"
    LATENCY_P95 = "latency_p95"
    LATENCY_P95_VS_CHAMPION = "latency_p95_vs_champion"
    REJECTED_VS_CHAMPION = "rejected_ratio_vs_champion"


class Event(StrEnum):
    """The kinds of record in a rollout's JSON-lines log."""

    START = "start"
    APPLY = "apply"
    APPLY_FAILED = "apply-failed"
    JUDGEMENT = "judgement"
    ROLLBACK = "rollback"
    PROMOTE = "promote"
    PAUSE = "pause"
    STOPPED = "stopped"


ENDINGS = (Event.ROLLBACK, Event.PROMOTE, Event.PAUSE, Event.STOPPED)


class Result(StrEnum):
    PROMOTED = "promoted"
    STEPPED = "stepped"
    JUDGED = "judged"
    ROLLED_BACK = "rolled-back"
    PAUSED = "paused"
    STOPPED = "stopped"  # someone else changed the weights: nothing was touched
    NOT_DEPLOYED = "not-deployed"  # --step: the stage in the file is not the one running yet
    FAILED = "failed"  # stopped by an error (e.g. `pulumi up` failed); the file says what is applied


class ExitCode(IntEnum):
    """`ml-serving rollout`'s exit codes, one per way a run ends (2 is every usage error, as for all commands)."""

    OK = 0
    ROLLED_BACK = 1
    USAGE = 2
    PAUSED = 3
    STOPPED = 4
    NOT_DEPLOYED = 5
    FAILED = 6


EXIT_MEANINGS = {
    ExitCode.OK: "promoted, or a --step / --dry-run / --abort that did its job",
    ExitCode.ROLLED_BACK: "rolled back",
    ExitCode.USAGE: "bad input or config; nothing written",
    ExitCode.PAUSED: "paused on inconclusive checks (onInconclusive: pause)",
    ExitCode.STOPPED: "stopped: someone else changed the weights; nothing touched",
    ExitCode.NOT_DEPLOYED: "--step: the stage in the file is not deployed yet; nothing written",
    ExitCode.FAILED: "stopped by an error (e.g. pulumi up failed); the file says what is applied",
}


EXIT_CODES = {
    Result.PROMOTED: ExitCode.OK,
    Result.STEPPED: ExitCode.OK,
    Result.JUDGED: ExitCode.OK,
    Result.ROLLED_BACK: ExitCode.ROLLED_BACK,
    Result.PAUSED: ExitCode.PAUSED,
    Result.STOPPED: ExitCode.STOPPED,
    Result.NOT_DEPLOYED: ExitCode.NOT_DEPLOYED,
    Result.FAILED: ExitCode.FAILED,
}


class Mode(StrEnum):
    RUN = "run"  # apply, wait, judge, until promoted, rolled back or paused
    STEP = "step"  # judge what is deployed, write the next edit for a pull request, never `pulumi up`
    DRY_RUN = "dry-run"  # judge the current stage and print; write nothing at all
    RESUME = "resume"  # continue an interrupted run from the stack file
    ABORT = "abort"  # roll back now


class Action(StrEnum):
    ADVANCE = "advance"
    HOLD = "hold"
    ROLLBACK = "rollback"
    PAUSE = "pause"
    PROMOTE = "promote"


class RolloutError(RuntimeError):
    """The rollout cannot start or go on; the message says why and what to do."""


class Interrupted(Exception):
    """SIGTERM, Ctrl-C or `--abort` from another terminal: roll back once and stop."""


@dataclass(frozen=True)
class Check:
    name: str
    query: str
    champion: float | None
    challenger: float | None
    limit: float
    verdict: str
    note: str = ""


@dataclass
class Judgement:
    stage: int
    weights: dict[str, int]
    checks: list[Check] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        """The worst verdict of any check: a failed gate is a failure whatever else is missing."""
        return max((Verdict(c.verdict) for c in self.checks), key=SEVERITY.index, default=Verdict.INCONCLUSIVE)

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.note}" for c in self.checks if c.verdict == self.verdict and c.note]


@dataclass(frozen=True)
class Counters:
    failures: int = 0
    inconclusive: int = 0


def decide(verdict: Verdict, counters: Counters, last_stage: bool, plan: Rollout) -> tuple[Action, Counters]:
    """What to do after a judgement. Errors count like inconclusive checks; a pass resets both counters."""
    if verdict == Verdict.FAILED:
        counters = replace(counters, failures=counters.failures + 1)
        return (Action.ROLLBACK if counters.failures >= plan.failure_threshold else Action.HOLD), counters
    if verdict in (Verdict.INCONCLUSIVE, Verdict.ERROR):
        counters = replace(counters, inconclusive=counters.inconclusive + 1)
        if counters.inconclusive < plan.inconclusive_threshold:
            return Action.HOLD, counters
        return (Action.PAUSE if plan.on_inconclusive == "pause" else Action.ROLLBACK), counters
    return (Action.PROMOTE if last_stage else Action.ADVANCE), Counters()


class MeasurementError(RuntimeError):
    """A query could not be measured: Prometheus unreachable or rejecting it, or an answer of the wrong shape."""


class Prometheus:
    """Prometheus' HTTP API: one number per variant. NaN is no value; +Inf is kept (a histogram's top bucket)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def per_variant(self, promql: str) -> dict[str, float]:
        try:
            response = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise MeasurementError(f"Prometheus at {self.url} is unreachable ({type(exc).__name__})") from None
        try:
            answer = response.json()
        except ValueError:
            body = " ".join(response.text.split())[:120] or "an empty body"
            raise MeasurementError(
                f"Prometheus at {self.url} answered HTTP {response.status_code} with a body that is not JSON: {body}"
            ) from None
        if not isinstance(answer, dict):
            raise MeasurementError(f"Prometheus answered {type(answer).__name__}, not an object")
        if answer.get("status") != "success":
            raise MeasurementError(f"Prometheus rejected the query: {answer.get('error', answer)}")
        data = answer.get("data")
        if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
            kind = data.get("resultType") if isinstance(data, dict) else type(data).__name__
            raise MeasurementError(f"Prometheus answered a {kind!s} where a vector was expected")
        values = {}
        for item in data["result"]:
            try:
                variant, value = item["metric"].get(metrics.VARIANT, ""), float(item["value"][1])
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                raise MeasurementError(f"Prometheus answered a sample that is not a number: {item!r:.120}") from None
            if not math.isnan(value):
                values[variant] = value
        return values


def judge(
    prometheus: Prometheus, model_key: str, plan: Rollout, stage: int, weights: dict[str, int], window: str
) -> Judgement:
    """Absolute gates on the challenger and gates relative to the champion; missing data is inconclusive."""
    judgement = Judgement(stage, weights)
    champion, challenger = plan.champion, plan.challenger
    scope = Scope(model=model_key)

    def measure(name: str, promql: str) -> tuple[float | None, float | None] | None:
        try:
            found = prometheus.per_variant(promql)
        except MeasurementError as exc:
            judgement.checks.append(Check(name, promql, None, None, 0, Verdict.ERROR, str(exc)))
            return None
        return found.get(champion), found.get(challenger)

    requests_query = metrics.requests_in_window(scope, window)
    counted = measure(Gate.REQUESTS, requests_query)
    if counted is None:
        return judgement
    champ_requests, chall_requests = counted
    if chall_requests is None or chall_requests < plan.min_requests:
        note = "the query returned nothing" if chall_requests is None else f"only {chall_requests:.0f} requests"
        judgement.checks.append(
            Check(Gate.REQUESTS, requests_query, champ_requests, chall_requests, plan.min_requests,
                  Verdict.INCONCLUSIVE, f"{note}; need {plan.min_requests} to judge")
        )  # fmt: skip
        return judgement
    judgement.checks.append(
        Check(Gate.REQUESTS, requests_query, champ_requests, chall_requests, plan.min_requests, Verdict.PASSED)
    )
    gates = [
        (Gate.ERROR_RATIO, Gate.ERROR_RATIO_VS_CHAMPION, metrics.error_ratio, plan.max_error_ratio,
         plan.max_error_ratio_vs_champion),
        (Gate.LATENCY_P95, Gate.LATENCY_P95_VS_CHAMPION, metrics.latency_p95, plan.max_p95_seconds,
         plan.max_p95_vs_champion),
    ]  # fmt: skip
    # At a stage where the champion serves nothing (the last, at 100 %), there is nothing to compare with: the
    # relative gates do not apply. Elsewhere a champion without data makes them inconclusive.
    compared = weights.get(champion, 0) > 0
    for name, relative_name, query_of, absolute, relative in gates:
        promql = query_of(scope, window)
        found = measure(name, promql)
        if found is None:
            continue
        champ, chall = found
        judgement.checks.append(_absolute(name, promql, champ, chall, absolute))
        if compared:
            judgement.checks.append(_relative(relative_name, promql, champ, chall, relative))
    rejected = metrics.rejected_ratio(scope, window)
    if compared and (found := measure(Gate.REJECTED_VS_CHAMPION, rejected)) is not None:
        judgement.checks.append(_increase(Gate.REJECTED_VS_CHAMPION, rejected, *found, plan.max_rejected_increase))
    return judgement


def _absolute(name: str, promql: str, champ: float | None, chall: float | None, limit: float) -> Check:
    if chall is None:
        return Check(name, promql, champ, chall, limit, Verdict.INCONCLUSIVE, "no value for the challenger")
    if chall <= limit:
        return Check(name, promql, champ, chall, limit, Verdict.PASSED)
    return Check(name, promql, champ, chall, limit, Verdict.FAILED, f"challenger {chall:.4g} > limit {limit:g}")


def _relative(name: str, promql: str, champ: float | None, chall: float | None, factor: float) -> Check:
    """The challenger against `factor` times the champion; a champion without data cannot vouch for anything."""
    if chall is None:
        return Check(name, promql, champ, chall, factor, Verdict.INCONCLUSIVE, "no value for the challenger")
    if champ is None:
        return Check(name, promql, champ, chall, factor, Verdict.INCONCLUSIVE,
                     "no value for the champion: nothing to compare the challenger with")  # fmt: skip
    if chall <= champ * factor or (champ == 0 and chall == 0):
        return Check(name, promql, champ, chall, factor, Verdict.PASSED)
    times = "infinitely" if champ == 0 or math.isinf(chall) else f"{chall / champ:.2f}x"
    return Check(name, promql, champ, chall, factor, Verdict.FAILED,
                 f"challenger {chall:.4g} is {times} the champion's {champ:.4g} (limit {factor:g}x)")  # fmt: skip


def _increase(name: str, promql: str, champ: float | None, chall: float | None, limit: float) -> Check:
    """The challenger's share may exceed the champion's by at most `limit` (a ratio of 0 makes factors useless)."""
    if chall is None or champ is None:
        side = "challenger" if chall is None else "champion"
        return Check(name, promql, champ, chall, limit, Verdict.INCONCLUSIVE, f"no value for the {side}")
    if chall - champ <= limit:
        return Check(name, promql, champ, chall, limit, Verdict.PASSED)
    note = f"challenger refuses {chall:.1%} of requests, the champion {champ:.1%} (limit +{limit:.1%})"
    return Check(name, promql, champ, chall, limit, Verdict.FAILED, note)


def stage_weights(model: Model, plan: Rollout, challenger_weight: int) -> dict[str, int]:
    """The challenger at `challenger_weight`, the champion gets the rest; other variants keep theirs."""
    return {plan.challenger: challenger_weight, plan.champion: 100 - _others(model, plan) - challenger_weight}


def _others(model: Model, plan: Rollout) -> int:
    return sum(
        v.weight or 0 for n, v in model.variants.items() if not v.shadow and n not in (plan.champion, plan.challenger)
    )


def current_weights(model: Model, plan: Rollout) -> dict[str, int]:
    return {name: model.variants[name].weight or 0 for name in (plan.challenger, plan.champion)}


def write_weights(path: Path, model_key: str, weights: dict[str, int]) -> str:
    def change(document: Any) -> None:
        variants = document["config"]["ml-serving:models"][model_key]["variants"]
        for name, weight in weights.items():
            variants[name]["weight"] = weight

    return edit(path, change)


# What a variant serves: its version (by alias, or pinned) and the runtime that serves it; promotion moves all.
VERSION_KEYS = ("alias", "version", "modelUri", "runId", "pinnedFrom", "runtime")


def variant_fields(path: Path, model_key: str, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The rollout's own fields of `names` as the file has them now (to put back if an `up` fails)."""
    from ml_serving.stackfile import load_document

    variants = load_document(path)["config"]["ml-serving:models"][model_key]["variants"]
    return {n: {k: variants[n][k] for k in (*VERSION_KEYS, "weight") if k in variants[n]} for n in names}


def restore_fields(path: Path, model_key: str, saved: dict[str, dict[str, Any]]) -> None:
    """Put back only these variants' version and weight fields: other models and comments edited since stay."""

    def change(document: Any) -> None:
        variants = document["config"]["ml-serving:models"][model_key]["variants"]
        for name, fields in saved.items():
            for key in (*VERSION_KEYS, "weight"):
                variants[name].pop(key, None)
            for key, value in fields.items():
                variants[name][key] = value

    edit(path, change)


def promote_in_config(path: Path, model_key: str, plan: Rollout) -> str:
    """The challenger's version becomes the champion's; the champion serves 100 % again."""

    def change(document: Any) -> None:
        variants = document["config"]["ml-serving:models"][model_key]["variants"]
        champion, challenger = variants[plan.champion], variants[plan.challenger]
        for key in VERSION_KEYS:
            champion.pop(key, None)
        for key in VERSION_KEYS:
            if key in challenger:
                champion[key] = challenger[key]
        champion["weight"], challenger["weight"] = 100, 0

    return edit(path, change)


@dataclass(frozen=True)
class Deployed:
    """What the stack's last successful update applied: each model's traffic fingerprint, and when it ended."""

    traffic: dict[str, str]
    ended: float


class PulumiStack:
    """`pulumi up` for one stack through the Automation API (the Pulumi CLI as a subprocess), and its state."""

    def __init__(self, project_dir: Path, stack: str, on_output: Callable[[str], None] | None = None) -> None:
        self.project_dir, self.stack, self.on_output = project_dir, stack, on_output
        self._selected: Any = None

    def ensure_cli(self) -> None:
        """Fail before the stack file is touched when there is no Pulumi CLI to apply it with."""
        from ml_serving.engine import EngineError, environment

        try:
            environment(self.project_dir)
        except EngineError as exc:
            raise RolloutError(f"{exc}; or use --dry-run to judge, or --step to write the next edit") from None

    def _stack(self) -> Any:
        """Selected once per run: each selection is two CLI calls."""
        from ml_serving.engine import EngineError, select

        if self._selected is None:
            try:
                self._selected = select(self.project_dir, self.stack)
            except EngineError as exc:
                raise RolloutError(str(exc)) from None
        return self._selected

    def up(self) -> None:
        from pulumi import automation as auto

        from ml_serving.engine import failure

        try:
            self._stack().up(on_output=self.on_output)
        except auto.errors.CommandError as exc:
            raise RolloutError(f"`pulumi up` for stack {self.stack} failed: {failure(exc)}") from None

    def deployed(self) -> Deployed | None:
        """The stack's state, or None when it has never been updated (or cannot be read)."""
        from pulumi import automation as auto

        try:
            selected = self._stack()
            outputs = selected.outputs()
            history = selected.history(page_size=10, page=1)
        except (auto.errors.CommandError, RolloutError):
            return None
        succeeded = [u for u in history if u.result == "succeeded" and u.kind == "update" and u.end_time]
        if not succeeded:
            return None
        traffic = outputs.get("traffic")
        value = traffic.value if traffic is not None else {}
        return Deployed(dict(value or {}), _timestamp(succeeded[0].end_time))


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def lock_path(project_dir: Path, stack: str) -> Path:
    return project_dir / f".rollout-{stack}.lock"


@contextlib.contextmanager
def locked(project_dir: Path, stack: str) -> Iterator[None]:
    """One rollout per stack at a time; the lock goes with the process, so a killed rollout leaves none behind."""
    path = lock_path(project_dir, stack)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RolloutError(f"another rollout of stack {stack} is running (lock {path.name}): wait for it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def running_rollout(project_dir: Path, stack: str) -> int | None:
    """The PID of the rollout holding the stack's lock, or None when no rollout runs."""
    path = lock_path(project_dir, stack)
    if not path.exists():
        return None
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def stop_running(project_dir: Path, stack: str, seconds: float = 600, poll: float = 0.2) -> int | None:
    """`--abort` while a rollout runs: ask it (SIGTERM) to roll back and wait until it has let go of the lock."""
    pid = running_rollout(project_dir, stack)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + seconds
    while running_rollout(project_dir, stack) == pid:
        if time.monotonic() > deadline:
            raise RolloutError(f"the rollout (PID {pid}) did not stop within {seconds:.0f} s")
        time.sleep(poll)
    return pid


@contextlib.contextmanager
def _signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM (e.g. from `--abort`) and Ctrl-C raise `Interrupted` in the loop, so it can roll back once."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    with _signals(handler):
        yield


@contextlib.contextmanager
def deferred_interrupts(then_raise: bool = True) -> Iterator[None]:
    """Hold SIGTERM/Ctrl-C until the block is done (a `pulumi up` is never left running behind our back).

    `then_raise=False` drops them: a rollback under way is finished, not interrupted a second time.
    """
    if _deferring:  # an enclosing block holds the signals already and decides what becomes of them
        yield
        return
    pending: list[str] = []
    _deferring.append(pending)
    try:
        with _signals(lambda signum, frame: pending.append(signal.Signals(signum).name)):
            yield
    finally:
        _deferring.remove(pending)
    if pending and then_raise:
        raise Interrupted(pending[0])


_deferring: list[list[str]] = []  # the signals held by the outermost `deferred_interrupts` block now running


@dataclass
class Outcome:
    result: Result
    judgements: list[Judgement]
    message: str

    @property
    def exit_code(self) -> int:
        return int(EXIT_CODES[self.result])


@dataclass(frozen=True)
class Restore:
    """How to undo one edit if its `pulumi up` fails: its fields through the YAML, or its lines as text."""

    fields: Callable[[], None]
    text_before: str
    text_after: str


class Drift(Exception):
    """Someone else changed the model's weights (in the file or in the stack's state) during the rollout."""


class RolloutRun:
    """One rollout run in one `Mode`: where it starts, each stage's apply/wait/judge, and how it ends."""

    def __init__(
        self,
        project_dir: Path,
        stack: str,
        model_key: str,
        prometheus: Prometheus,
        pulumi: PulumiStack,
        log_path: Path,
        mode: Mode = Mode.RUN,
        report: Callable[[str], None] = print,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.project_dir, self.stack, self.model_key, self.mode = project_dir, stack, model_key, mode
        self.path = stack_file(project_dir, stack)
        self.prometheus, self.pulumi, self.log_path = prometheus, pulumi, log_path
        self.report, self.sleep, self.clock = report, sleep, clock
        model = self.model()
        if model.rollout is None:
            raise RolloutError(f"{self.path.name}: models.{model_key}.rollout is not set: add the stages and gates")
        self.plan = model.rollout
        self._check_variants(model)
        self.expected = current_weights(model, self.plan)  # what the file must say until this run writes again
        self.deployed_at: float | None = None
        self.step_deployed: Deployed | None = None  # --step: the stack's update that deployed the stage to judge
        self.started = False  # True once this run may have written something

    # -- reading the stack -------------------------------------------------------------------------------------

    def settings(self) -> Settings:
        return load_settings(self.project_dir, self.stack)

    def model(self, settings: Settings | None = None) -> Model:
        settings = settings or self.settings()
        model = settings.models.get(self.model_key)
        if model is None:
            raise RolloutError(f"{self.path.name}: no model {self.model_key!r} (models: {', '.join(settings.models)})")
        return model

    def _check_variants(self, model: Model) -> None:
        """Every stage must fit beside the model's other weighted variants, checked before anything is written."""
        plan, where = self.plan, f"{self.path.name}: models.{self.model_key}"
        for name in (plan.champion, plan.challenger):
            if name not in model.variants:
                raise RolloutError(f"{where}.variants has no {name!r} (rollout.champion/challenger name it)")
            if model.variants[name].shadow:
                raise RolloutError(f"{where}.variants.{name} is a shadow: a rollout moves weighted variants only")
        others = _others(model, plan)
        if others:
            names = [n for n, v in model.variants.items() if not v.shadow and (v.weight or 0)
                     and n not in (plan.champion, plan.challenger)]  # fmt: skip
            raise RolloutError(
                f"{where}: {', '.join(names)} keep{'s' if len(names) == 1 else ''} {others} % of the traffic, so the "
                f"last stage ({plan.challenger} at {plan.stages[-1]} %) leaves {plan.champion} at "
                f"{100 - others - plan.stages[-1]} %: set them to weight 0 or make them shadows first"
            )

    def _refuse_promoted_already(self, model: Model) -> None:
        champion, challenger = model.variants[self.plan.champion], model.variants[self.plan.challenger]
        same_version = challenger.version is not None and challenger.version == champion.version
        same_alias = challenger.alias is not None and challenger.alias == champion.alias
        same_runtime = challenger.runtime == champion.runtime  # a runtime change alone is a canary of its own
        if (same_version or same_alias) and same_runtime and not (challenger.weight or 0):
            what = f"version {challenger.version}" if same_version else f"alias @{challenger.alias}"
            raise RolloutError(
                f"{self.path.name}: models.{self.model_key}: {self.plan.challenger} and {self.plan.champion} both "
                f"serve {what}: it was promoted already. Point {self.plan.challenger} at a new version to start "
                "another rollout"
            )

    def _check_signatures(self) -> None:
        """Before the first stage: the challenger must accept what the champion's clients send."""
        from ml_serving.registry import RegistryError, RegistryResolver, resolve_model
        from ml_serving.signatures import SignatureError, check_model

        settings = self.settings()
        model = self.model(settings)
        resolver = RegistryResolver(settings.registry.tracking_uri) if settings.registry else None
        try:
            resolved = resolve_model(self.model_key, model, resolver)
        except RegistryError as exc:
            self.report(f"signatures not compared: {exc}")
            return
        compared = {name: resolved[name] for name in (self.plan.champion, self.plan.challenger)}
        try:
            check_model(f"{self.path.name}: models.{self.model_key}", model, compared, self.project_dir / "model-lock")
        except SignatureError as exc:
            raise RolloutError(str(exc)) from None

    def _check_last_step(self) -> None:
        """--step runs are separate processes: the log says what the previous one wrote, the file must agree."""
        if not self.log_path.exists():
            return
        from ml_serving.report import read_log

        mine = [r for r in read_log(self.log_path) if r.get("stack") == self.stack and r.get("model") == self.model_key]
        last = next((r for r in reversed(mine) if r["event"] in (Event.APPLY, Event.APPLY_FAILED, *ENDINGS)), None)
        if last is not None and last["event"] == Event.APPLY and last["weights"] != self.expected:
            self.expected = last["weights"]
            self.check_file()

    def fingerprint(self, weights: dict[str, int]) -> str:
        """The traffic fingerprint the program will export once `weights` are deployed."""
        model = self.model()
        variants = {n: v.model_copy(update={"weight": weights.get(n, v.weight)}) for n, v in model.variants.items()}
        return model.model_copy(update={"variants": variants}).traffic_fingerprint()

    # -- the guards around every write and every judgement ------------------------------------------------------

    def check_file(self) -> None:
        try:
            found = current_weights(self.model(), self.plan)
        except ConfigError as exc:
            raise self.unreadable(exc) from None
        if found != self.expected:
            raise Drift(
                f"{self.path.name} now says {_fmt_weights(found)} for {self.model_key}, not "
                f"{_fmt_weights(self.expected)} as this rollout left it: someone else changed the weights"
            )

    def unreadable(self, exc: ConfigError) -> Drift:
        """Someone left the file unparseable or invalid mid-rollout: stop, saying what the stack runs."""
        return Drift(
            f"{self.path.name} no longer parses as a stack file ({' '.join(str(exc).split())}); the stack runs "
            f"{_fmt_weights(self.expected)} as this rollout last wrote it: fix the file, then continue with --resume "
            "or roll back with --abort"
        )

    def check_state(self, deployed: Deployed | None) -> None:
        if deployed is None or self.model_key not in deployed.traffic:
            return
        if deployed.traffic[self.model_key] != self.fingerprint(self.expected):
            raise Drift(
                f"stack {self.stack}'s last update deployed other weights for {self.model_key} than this rollout "
                f"wrote ({_fmt_weights(self.expected)}): someone else ran `pulumi up`"
            )

    # -- side effects ------------------------------------------------------------------------------------------

    def log(self, event: Event, **record: Any) -> None:
        if self.mode == Mode.DRY_RUN:
            return
        record = {"time": self.clock(), "stack": self.stack, "model": self.model_key, "event": str(event), **record}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def apply(self, challenger_weight: int) -> dict[str, int]:
        """Write the stage's weights and `pulumi up`; if `up` fails, only these weights go back as they were."""
        self.check_file()
        weights = stage_weights(self.model(), self.plan, challenger_weight)
        before, text_before = dict(self.expected), self.path.read_text()
        text_after = write_weights(self.path, self.model_key, weights)
        self.expected = weights
        self.log(Event.APPLY, weights=weights, proposed=self.mode == Mode.STEP)
        if self.mode == Mode.STEP:
            return weights
        restore = Restore(lambda: write_weights(self.path, self.model_key, before), text_before, text_after)
        self._up(restore, weights, before)
        return weights

    def _up(self, restore: Restore | None, asked: dict[str, int], before: dict[str, int]) -> None:
        try:
            with deferred_interrupts():
                self.pulumi.up()
        except RolloutError as exc:
            self.expected = before
            if restore is None or self._put_back(restore):
                self.log(Event.APPLY_FAILED, weights=asked, restored=before)
                raise
            self.log(Event.APPLY_FAILED, weights=asked, restored=None)
            raise RolloutError(
                f"{exc}; and {self.path.name} was changed meanwhile on the very lines this rollout wrote, so they "
                f"were not put back: the stack runs {_fmt_weights(before)}, set the file to that by hand"
            ) from None
        self.deployed_at = self.clock()

    def _put_back(self, restore: Restore) -> bool:
        """The rollout's own fields as they were, through the YAML when the file parses, else line by line."""
        try:
            restore.fields()
        except ConfigError:
            return revert(self.path, restore.text_before, restore.text_after)
        return True

    def judge(self, stage: int, weights: dict[str, int], window_seconds: float) -> Judgement:
        self.plan = self.model().rollout or self.plan  # gates edited during a run apply from the next judgement
        window = f"{max(int(window_seconds), 1)}s"
        judgement = judge(self.prometheus, self.model_key, self.plan, stage, weights, window)
        self.log(Event.JUDGEMENT, stage=stage, weights=weights, verdict=str(judgement.verdict), window=window,
                 checks=[asdict(c) for c in judgement.checks])  # fmt: skip
        return judgement

    def rollback(self, why: str, judgements: list[Judgement]) -> Outcome:
        with deferred_interrupts(then_raise=False):
            weights = self.apply(0)
        self.log(Event.ROLLBACK, reason=why, weights=weights, proposed=self.mode == Mode.STEP)
        done = f"{self.plan.challenger} at 0 %"
        if self.mode == Mode.STEP:
            done += f" written to {self.path.name}: merge it now"
        return Outcome(Result.ROLLED_BACK, judgements, f"rolled back ({why}): {done}")

    def promote(self, judgements: list[Judgement]) -> Outcome:
        self.check_file()
        settings = self.settings()
        challenger = self.model(settings).variants[self.plan.challenger]
        names = (self.plan.champion, self.plan.challenger)
        saved = variant_fields(self.path, self.model_key, names)
        final = {self.plan.champion: 100, self.plan.challenger: 0}
        text_before = self.path.read_text()
        if self.plan.promote == "alias":
            version = self._move_alias(settings)
            text_after = write_weights(self.path, self.model_key, final)
        else:
            version = challenger.version or f"@{challenger.alias}"
            text_after = promote_in_config(self.path, self.model_key, self.plan)
        before, self.expected = dict(self.expected), final
        if self.mode != Mode.STEP:
            restore = Restore(lambda: restore_fields(self.path, self.model_key, saved), text_before, text_after)
            self._up(restore, final, before)
        self.log(Event.PROMOTE, version=version, how=self.plan.promote, proposed=self.mode == Mode.STEP)
        message = f"promoted {self.plan.challenger} (version {version}) to champion"
        if self.mode == Mode.STEP:
            message += f": the edit is in {self.path.name}, for a pull request"
        return Outcome(Result.PROMOTED, judgements, message)

    def _move_alias(self, settings: Settings) -> str:
        """Point the champion's registry alias at the challenger's version; the next `pulumi up` resolves it."""
        from mlflow.tracking import MlflowClient

        from ml_serving.registry import RegistryResolver

        model = settings.models[self.model_key]
        champion, challenger = model.variants[self.plan.champion], model.variants[self.plan.challenger]
        if settings.registry is None or champion.alias is None:
            raise RolloutError(
                f"models.{self.model_key}.rollout.promote: alias needs the champion to follow a registry alias "
                "(alias: champion) and ml-serving:registry; use promote: config otherwise"
            )
        uri = settings.registry.tracking_uri
        version = (
            challenger.version or RegistryResolver(uri).by_alias(model.registered_model, str(challenger.alias)).version
        )
        MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(
            model.registered_model, champion.alias, version
        )
        return str(version)

    # -- the run -----------------------------------------------------------------------------------------------

    def gates_in_force(self) -> str:
        p = self.plan
        return (
            f"gates: at least {p.min_requests} requests per {p.interval_seconds:g} s; error ratio <= "
            f"{p.max_error_ratio:g} and <= {p.max_error_ratio_vs_champion:g}x the champion; p95 <= "
            f"{p.max_p95_seconds:g} s and <= {p.max_p95_vs_champion:g}x the champion; rejected (4xx) share <= the "
            f"champion's + {p.max_rejected_increase:g}; roll back after {p.failure_threshold} failed check(s), "
            f"{p.on_inconclusive} after {p.inconclusive_threshold} inconclusive"
        )

    def run(self) -> Outcome:
        """Run in this run's mode. Errors before the first write are the caller's (exit 2); later ones end the run
        as FAILED, the file saying what is applied."""
        try:
            return self._run()
        except RolloutError as exc:
            if not self.started:
                raise
            return Outcome(Result.FAILED, [], f"stopped by an error: {exc}")
        except ConfigError as exc:
            if not self.started:
                raise
            return self.stop(self.unreadable(exc))
        except Drift as exc:
            return self.stop(exc)
        except Interrupted as exc:
            self.report(f"interrupted ({exc}): rolling back once")
            try:
                self.check_file()
            except Drift as drift:
                self.log(Event.STOPPED, reason=str(drift), weights=self.expected)
                return Outcome(Result.STOPPED, [], f"interrupted, and not rolled back: {drift}")
            return self.rollback(f"interrupted by {exc}", [])

    def stop(self, drift: Drift) -> Outcome:
        self.log(Event.STOPPED, reason=str(drift), weights=self.expected)
        return Outcome(Result.STOPPED, [], f"stopped, nothing touched: {drift}")

    def _run(self) -> Outcome:
        plan, stages = self.plan, list(self.plan.stages)
        if self.mode == Mode.STEP:
            self._check_last_step()
        current = self.expected[plan.challenger]
        if current and current not in stages:
            raise RolloutError(
                f"{self.path.name}: {plan.challenger} is at {current} %, not one of the stages {stages}: "
                "set it to 0 or to a stage"
            )
        if self.mode == Mode.ABORT:
            self.pulumi.ensure_cli()
            self.started = True
            return self.rollback("aborted by hand", [])
        if self.mode == Mode.DRY_RUN:
            index = stages.index(current) if current else -1
            judgement = self.judge(index, self.expected, plan.interval_seconds)
            self.report(_describe(judgement, index, len(stages)))
            return Outcome(Result.JUDGED, [judgement], f"dry run, nothing written: verdict {judgement.verdict}")
        if current == 0:
            self._refuse_promoted_already(self.model())
            self._check_signatures()
        elif self.mode not in (Mode.RESUME, Mode.STEP):
            raise RolloutError(
                f"{plan.challenger} is already at {current} %: continue with --resume, or roll back with --abort"
            )
        if self.mode != Mode.STEP:
            self.pulumi.ensure_cli()
        elif current:
            found = self._step_deployed(stages.index(current))
            if isinstance(found, Outcome):
                return found  # before the start record: a --step that finds nothing to judge writes nothing
            self.step_deployed = found
        self.report(self.gates_in_force())
        self.log(Event.START, mode=str(self.mode), gates=plan.model_dump(mode="json"))
        self.started = True
        next_step = "after it is deployed, run --step again to judge it and write the next one"
        if current == 0:
            index = 0
            self.report(f"stage 1/{len(stages)}: {self.apply(stages[0])}")
            if self.mode == Mode.STEP:
                return Outcome(Result.STEPPED, [], f"wrote stage 1 ({stages[0]} %) to {self.path.name}; {next_step}")
        else:
            index = stages.index(current)
            if self.mode == Mode.RESUME:
                self.report(f"resuming at {current} %: applying the stack file as it is")
                self._up(None, self.expected, self.expected)
        counters, judgements = Counters(), []
        while True:
            window = self._wait_for_window(index, judgements)
            if isinstance(window, Outcome):
                return window
            judgement = self.judge(index, self.expected, window)
            judgements.append(judgement)
            self.report(_describe(judgement, index, len(stages)))
            action, counters = decide(judgement.verdict, counters, index == len(stages) - 1, self.plan)
            if action == Action.ROLLBACK:
                why = "; ".join(judgement.reasons)
                if judgement.verdict != Verdict.FAILED:
                    why = f"{counters.inconclusive} inconclusive checks: {why}"
                return self.rollback(why, judgements)
            if action == Action.PAUSE:
                why = f"{counters.inconclusive} inconclusive checks: " + "; ".join(judgement.reasons)
                self.log(Event.PAUSE, reason=why)
                return Outcome(Result.PAUSED, judgements, f"paused at {stages[index]} % ({why})")
            if action == Action.PROMOTE:
                return self.promote(judgements)
            if action == Action.ADVANCE:
                index += 1
                self.report(f"stage {index + 1}/{len(stages)}: {self.apply(stages[index])}")
                if self.mode == Mode.STEP:
                    wrote = f"wrote stage {index + 1} ({stages[index]} %) to {self.path.name}; {next_step}"
                    return Outcome(Result.STEPPED, judgements, wrote)

    def _step_deployed(self, index: int) -> Deployed | Outcome:
        """--step judges only a stage the stack's last successful update deployed; else it says so."""
        self.check_file()
        deployed = self.pulumi.deployed()
        if deployed is None or deployed.traffic.get(self.model_key) != self.fingerprint(self.expected):
            stage = f"stage {index + 1} ({self.plan.challenger} at {self.expected[self.plan.challenger]} %)"
            return Outcome(Result.NOT_DEPLOYED, [], f"{stage} is not deployed yet: the stack's last successful update "
                           "carries other weights. Merge and deploy it, then run --step again")  # fmt: skip
        return deployed

    def _wait_for_window(self, index: int, judgements: list[Judgement]) -> float | Outcome:
        """Seconds of metrics to judge the stage on, all taken after its deployment ended.

        A run waits one interval after its own `up`. A --step run judges only a stage the stack's last successful
        update deployed (otherwise it says so and writes nothing), once an interval has passed since that update.
        """
        interval = self.plan.interval_seconds
        if self.mode != Mode.STEP or judgements:
            self.sleep(interval)
            self.check_file()
            if self.mode != Mode.STEP:
                self.check_state(self.pulumi.deployed())
            since = self.clock() - (self.deployed_at or self.clock() - interval)
            return min(interval, since) if since > 0 else interval
        self.check_file()
        deployed = self.step_deployed
        assert deployed is not None, "_run found the stage deployed"
        since = self.clock() - deployed.ended
        if since < interval:  # metrics from before the deploy ended say nothing about this stage
            self.report(f"stage {index + 1} was deployed {since:.0f} s ago: judging in {interval - since:.0f} s")
            self.sleep(interval - since)
            since = self.clock() - deployed.ended
        return min(interval, since)


def _fmt_weights(weights: dict[str, int]) -> str:
    return ", ".join(f"{k} {v} %" for k, v in weights.items())


def _describe(judgement: Judgement, index: int, total: int) -> str:
    where = f"stage {index + 1}/{total}" if index >= 0 else "before stage 1"
    parts = [f"{where} {judgement.weights}: {judgement.verdict}"]
    for check in judgement.checks:
        chall = "-" if check.challenger is None else f"{check.challenger:.4g}"
        champ = "-" if check.champion is None else f"{check.champion:.4g}"
        parts.append(
            f"  {check.name}: challenger {chall} champion {champ} limit {check.limit:g} {check.verdict} {check.note}"
        )
    return "\n".join(parts)
