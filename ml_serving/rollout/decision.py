"""The pure part of a rollout: a judgement from Prometheus' numbers, and what to do after it (`decide`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ml_serving import metrics
from ml_serving.metrics import Scope
from ml_serving.rollout.events import Action, Check, Gate, Judgement, Verdict
from ml_serving.rollout.prometheus import MeasurementError, Prometheus
from ml_serving.settings import Model, Rollout


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
    return {plan.challenger: challenger_weight, plan.champion: 100 - other_weights(model, plan) - challenger_weight}


def other_weights(model: Model, plan: Rollout) -> int:
    return sum(
        v.weight or 0 for n, v in model.variants.items() if not v.shadow and n not in (plan.champion, plan.challenger)
    )


def current_weights(model: Model, plan: Rollout) -> dict[str, int]:
    return {name: model.variants[name].weight or 0 for name in (plan.challenger, plan.champion)}
