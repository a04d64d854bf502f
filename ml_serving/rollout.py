"""`ml-serving rollout`: move a challenger's traffic up stage by stage, judged on Prometheus, undone on failure.

The stack file is the only state: every step is a round-trip edit of `Pulumi.<stack>.yaml` (comments kept, the
file replaced atomically) followed by `pulumi up`, so a rollback is a commit-able edit and a crash leaves a file
that says what was last asked for. Every judgement is written to a JSON-lines log with each query as sent, its
values for champion and challenger, the limit and the verdict.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from ml_serving import metrics
from ml_serving.metrics import Scope
from ml_serving.settings import Model, Rollout, Settings
from ml_serving.stackfile import edit, load_settings, stack_file, write_atomically

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"


class RolloutError(RuntimeError):
    """The rollout cannot start or go on; the message says why and what to do."""


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
    def verdict(self) -> str:
        verdicts = {c.verdict for c in self.checks}
        if INCONCLUSIVE in verdicts:
            return INCONCLUSIVE
        return FAIL if FAIL in verdicts else PASS

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.note}" for c in self.checks if c.verdict != PASS]


class Prometheus:
    """Prometheus' HTTP API: one number per variant, or None when the answer is empty, NaN or unreachable."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def per_variant(self, promql: str) -> dict[str, float]:
        try:
            answer = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout).json()
        except (requests.RequestException, ValueError) as exc:
            raise ConnectionError(f"Prometheus at {self.url} is unreachable ({type(exc).__name__})") from None
        if answer.get("status") != "success":
            raise ConnectionError(f"Prometheus rejected the query: {answer.get('error', answer)}")
        values = {}
        for item in answer["data"]["result"]:
            value = float(item["value"][1])
            if math.isfinite(value):
                values[item["metric"].get(metrics.VARIANT, "")] = value
        return values


def judge(
    prometheus: Prometheus, model_key: str, plan: Rollout, stage: int, weights: dict[str, int], window: str
) -> Judgement:
    """Absolute gates on the challenger and gates relative to the champion; missing data is inconclusive."""
    judgement = Judgement(stage, weights)
    champion, challenger = plan.champion, plan.challenger
    scope = Scope(model=model_key)

    def values(name: str, promql: str) -> tuple[float | None, float | None] | None:
        try:
            found = prometheus.per_variant(promql)
        except ConnectionError as exc:
            judgement.checks.append(Check(name, promql, None, None, 0, INCONCLUSIVE, str(exc)))
            return None
        return found.get(champion), found.get(challenger)

    requests_query = metrics.requests_in_window(scope, window)
    counted = values("requests", requests_query)
    if counted is None:
        return judgement
    champ_requests, chall_requests = counted
    if chall_requests is None or chall_requests < plan.min_requests:
        note = "the query returned nothing" if chall_requests is None else f"only {chall_requests:.0f} requests"
        judgement.checks.append(
            Check("requests", requests_query, champ_requests, chall_requests, plan.min_requests, INCONCLUSIVE,
                  f"{note}; need {plan.min_requests} to judge")
        )  # fmt: skip
        return judgement
    judgement.checks.append(Check("requests", requests_query, champ_requests, chall_requests, plan.min_requests, PASS))
    gates: list[tuple[str, Callable[[Scope, str], str], float, float]] = [
        ("error_ratio", metrics.error_ratio, plan.max_error_ratio, plan.max_error_ratio_vs_champion),
        ("latency_p95", metrics.latency_p95, plan.max_p95_seconds, plan.max_p95_vs_champion),
    ]
    for name, query_of, absolute, relative in gates:
        promql = query_of(scope, window)
        found = values(name, promql)
        if found is None:
            continue
        champ, chall = found
        if chall is None:
            judgement.checks.append(
                Check(name, promql, champ, chall, absolute, INCONCLUSIVE, "no value for the challenger")
            )
            continue
        ok = chall <= absolute
        note = "" if ok else f"challenger {chall:.4g} > limit {absolute:g}"
        judgement.checks.append(Check(name, promql, champ, chall, absolute, PASS if ok else FAIL, note))
        if champ is not None and champ > 0:
            ratio = chall / champ
            ok = ratio <= relative
            note = "" if ok else f"challenger is {ratio:.2f}x the champion (limit {relative:g}x)"
            judgement.checks.append(
                Check(f"{name}_vs_champion", promql, champ, chall, relative, PASS if ok else FAIL, note)
            )
    return judgement


def stage_weights(model: Model, plan: Rollout, challenger_weight: int) -> dict[str, int]:
    """The challenger at `challenger_weight`, the champion gets the rest; other variants keep theirs."""
    others = sum(
        v.weight or 0 for n, v in model.variants.items() if not v.shadow and n not in (plan.champion, plan.challenger)
    )
    return {plan.challenger: challenger_weight, plan.champion: 100 - others - challenger_weight}


def write_weights(path: Path, model_key: str, weights: dict[str, int]) -> None:
    def change(document: Any) -> None:
        variants = document["config"]["ml-serving:models"][model_key]["variants"]
        for name, weight in weights.items():
            variants[name]["weight"] = weight

    edit(path, change)


def promote_in_config(path: Path, model_key: str, plan: Rollout) -> None:
    """The challenger's version becomes the champion's; the champion serves 100 % again."""

    def change(document: Any) -> None:
        variants = document["config"]["ml-serving:models"][model_key]["variants"]
        champion, challenger = variants[plan.champion], variants[plan.challenger]
        for key in ("alias", "version", "modelUri", "runId", "pinnedFrom"):
            champion.pop(key, None)
        for key in ("alias", "version", "modelUri", "runId", "pinnedFrom"):
            if key in challenger:
                champion[key] = challenger[key]
        champion["weight"], challenger["weight"] = 100, 0

    edit(path, change)


class PulumiStack:
    """`pulumi up` for one stack through the Automation API (the Pulumi CLI as a subprocess)."""

    def __init__(self, project_dir: Path, stack: str, on_output: Callable[[str], None] | None = None) -> None:
        self.project_dir, self.stack, self.on_output = project_dir, stack, on_output

    def ensure_cli(self) -> None:
        """Fail before the stack file is touched when there is no Pulumi CLI to apply it with."""
        if shutil.which("pulumi") is None:
            raise RolloutError(
                "the Pulumi CLI is not on PATH, so no stage could be applied: install it "
                "(https://www.pulumi.com/docs/iac/download-install/), or use --dry-run to judge, or --step to "
                "write the next edit for a pull request"
            )

    def up(self) -> None:
        from pulumi import automation as auto

        try:
            selected = auto.select_stack(stack_name=self.stack, work_dir=str(self.project_dir))
            selected.up(on_output=self.on_output)
        except auto.errors.CommandError as exc:
            raise RolloutError(f"`pulumi up` for stack {self.stack} failed: {str(exc).strip()[-500:]}") from None


@contextlib.contextmanager
def locked(project_dir: Path, stack: str) -> Iterator[None]:
    """One rollout per stack at a time; the lock goes with the process, so a killed rollout leaves none behind."""
    path = project_dir / f".rollout-{stack}.lock"
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RolloutError(f"another rollout of stack {stack} is running (lock {path.name}): wait for it") from None
        handle.write(str(os.getpid()))
        handle.flush()
        yield


@dataclass
class Outcome:
    result: str  # promoted, rolled-back, paused, stepped, judged
    judgements: list[Judgement]
    message: str


class RolloutRun:
    """One rollout run: where it starts, each stage's apply/wait/judge, and how it ends."""

    def __init__(
        self,
        project_dir: Path,
        stack: str,
        model_key: str,
        prometheus: Prometheus,
        pulumi: PulumiStack,
        log_path: Path,
        report: Callable[[str], None] = print,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.project_dir, self.stack, self.model_key = project_dir, stack, model_key
        self.path = stack_file(project_dir, stack)
        self.prometheus, self.pulumi, self.log_path, self.report, self.sleep = (
            prometheus,
            pulumi,
            log_path,
            report,
            sleep,
        )
        settings = self.settings()
        model = settings.models.get(model_key)
        if model is None:
            raise RolloutError(f"{self.path.name}: no model {model_key!r} (models: {', '.join(settings.models)})")
        if model.rollout is None:
            raise RolloutError(f"{self.path.name}: models.{model_key}.rollout is not set: add the stages and gates")
        self.plan = model.rollout
        self.window = f"{max(int(self.plan.interval_seconds), 1)}s"
        self.propose_only = False  # --step: write each edit for a pull request; the merge's deploy applies it

    def settings(self) -> Settings:
        return load_settings(self.project_dir, self.stack)

    def current_weight(self) -> int:
        return self.settings().models[self.model_key].variants[self.plan.challenger].weight or 0

    def apply(self, challenger_weight: int) -> dict[str, int]:
        """Write the stage's weights and `pulumi up`; if `up` fails, the file goes back to what was applied."""
        weights = stage_weights(self.settings().models[self.model_key], self.plan, challenger_weight)
        applied = self.path.read_text()
        write_weights(self.path, self.model_key, weights)
        self.log({"event": "apply", "weights": weights, "proposed": self.propose_only})
        if self.propose_only:
            return weights
        try:
            self.pulumi.up()
        except RolloutError:
            write_atomically(self.path, applied)
            self.log({"event": "apply-failed", "weights": weights})
            raise
        return weights

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), "stack": self.stack, "model": self.model_key, **record}
        with self.log_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def judge(self, stage: int, weights: dict[str, int]) -> Judgement:
        judgement = judge(self.prometheus, self.model_key, self.plan, stage, weights, self.window)
        self.log(
            {
                "event": "judgement",
                "stage": stage,
                "weights": weights,
                "verdict": judgement.verdict,
                "checks": [asdict(c) for c in judgement.checks],
            }
        )
        return judgement

    def rollback(self, why: str, judgements: list[Judgement]) -> Outcome:
        weights = self.apply(0)
        self.log({"event": "rollback", "reason": why, "weights": weights, "proposed": self.propose_only})
        done = f"{self.plan.challenger} at 0 %"
        if self.propose_only:
            done += f" written to {self.path.name}: merge it now"
        return Outcome("rolled-back", judgements, f"rolled back ({why}): {done}")

    def promote(self, judgements: list[Judgement]) -> Outcome:
        settings = self.settings()
        model = settings.models[self.model_key]
        challenger = model.variants[self.plan.challenger]
        if self.plan.promote == "alias":
            version = self._move_alias(settings)
            write_weights(self.path, self.model_key, {self.plan.champion: 100, self.plan.challenger: 0})
        else:
            version = challenger.version or f"@{challenger.alias}"
            promote_in_config(self.path, self.model_key, self.plan)
        if not self.propose_only:
            self.pulumi.up()
        self.log({"event": "promote", "version": version, "how": self.plan.promote, "proposed": self.propose_only})
        message = f"promoted {self.plan.challenger} (version {version}) to champion"
        if self.propose_only:
            message += f": the edit is in {self.path.name}, for a pull request"
        return Outcome("promoted", judgements, message)

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

    def run(self, dry_run: bool = False, step: bool = False, resume: bool = False) -> Outcome:
        plan, stages, judgements = self.plan, list(self.plan.stages), []
        current = self.current_weight()
        if current and current not in stages:
            raise RolloutError(
                f"{self.path.name}: {plan.challenger} is at {current} %, not one of the stages {stages}: "
                "set it to 0 or to a stage"
            )
        if dry_run:
            weights = stage_weights(self.settings().models[self.model_key], plan, current)
            index = stages.index(current) if current else -1
            judgement = self.judge(index, weights)
            self.report(_describe(judgement, index, len(stages)))
            return Outcome("judged", [judgement], f"dry run, nothing changed: verdict {judgement.verdict}")
        self.propose_only = step
        if not step:
            self.pulumi.ensure_cli()
        next_step = "after it is deployed, run --step again to judge it and write the next one"
        if current == 0:
            index = 0
            self.report(f"stage 1/{len(stages)}: {self.apply(stages[0])}")
            if step:
                return Outcome("stepped", [], f"wrote stage 1 ({stages[0]} %) to {self.path.name}; {next_step}")
        elif resume or step:
            index = stages.index(current)
            if resume:
                self.report(f"resuming at {current} %: applying the stack file as it is")
                self.pulumi.up()
        else:
            raise RolloutError(
                f"{plan.challenger} is already at {current} %: continue with --resume, or roll back with --abort"
            )
        failures = inconclusive = 0
        while True:
            weights = stage_weights(self.settings().models[self.model_key], plan, stages[index])
            if judgements or not step:  # a --step run first judges a stage its pull request deployed a while ago
                self.sleep(plan.interval_seconds)
            judgement = self.judge(index, weights)
            judgements.append(judgement)
            self.report(_describe(judgement, index, len(stages)))
            if judgement.verdict == FAIL:
                failures += 1
                if failures >= plan.failure_threshold:
                    return self.rollback("; ".join(judgement.reasons), judgements)
            elif judgement.verdict == INCONCLUSIVE:
                inconclusive += 1
                if inconclusive >= plan.inconclusive_threshold:
                    why = f"{inconclusive} inconclusive checks: " + "; ".join(judgement.reasons)
                    if plan.on_inconclusive == "pause":
                        self.log({"event": "pause", "reason": why})
                        return Outcome("paused", judgements, f"paused at {stages[index]} % ({why})")
                    return self.rollback(why, judgements)
            elif index == len(stages) - 1:
                return self.promote(judgements)
            else:
                failures = inconclusive = 0
                index += 1
                self.report(f"stage {index + 1}/{len(stages)}: {self.apply(stages[index])}")
                if step:
                    return Outcome(
                        "stepped",
                        judgements,
                        f"wrote stage {index + 1} ({stages[index]} %) to {self.path.name}; {next_step}",
                    )


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


def abort(project_dir: Path, stack: str, model_key: str, pulumi: PulumiStack, log_path: Path) -> Outcome:
    """Roll back now: the challenger to 0 %, applied."""
    runner = RolloutRun(project_dir, stack, model_key, Prometheus("http://unused"), pulumi, log_path)
    pulumi.ensure_cli()
    return runner.rollback("aborted by hand", [])
