"""One driver per mode: where a run starts, how long it waits before each judgement, and when it stops.

The machinery a driver drives (`run.RolloutRun`: the file, `pulumi up`, Prometheus, the log) knows no modes; a
driver says whether its edits are applied (`applies`) and whether anything is logged (`records`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ml_serving.rollout.decision import Counters, decide
from ml_serving.rollout.events import Action, Judgement, Mode, Outcome, Result, RolloutError, Verdict
from ml_serving.rollout.run import RolloutRun

if TYPE_CHECKING:
    from ml_serving.rollout.stack import Deployed


class Driver:
    """`run`'s mode: apply, wait one interval, judge, until promoted, rolled back or paused."""

    applies: ClassVar[bool] = True  # each edit is followed by `pulumi up` (else it is written for a pull request)
    records: ClassVar[bool] = True  # every step is logged

    def drive(self, run: RolloutRun) -> Outcome:
        current = run.current()
        if current:
            raise RolloutError(
                f"{run.plan.challenger} is already at {current} %: continue with --resume, or roll back with --abort"
            )
        return self.first_stage(run)

    def first_stage(self, run: RolloutRun) -> Outcome:
        """From 0 %: refuse what must never start, then write (and apply) stage 1 and judge from there."""
        run.refuse_promoted_already(run.model())
        run.check_signatures()
        if self.applies:
            run.pulumi.ensure_cli()
        run.begin()
        stages = run.plan.stages
        run.report(f"stage 1/{len(stages)}: {run.apply(stages[0])}")
        return self.advanced(run, 0, []) or self.loop(run, 0)

    def window(self, run: RolloutRun, index: int, judgements: list[Judgement]) -> float:
        """Seconds of metrics to judge the stage on, all taken after its deployment ended: one interval after the
        run's own `up`, the file and the stack's state checked for someone else's edit first."""
        interval = run.plan.interval_seconds
        run.sleep(interval)
        run.check_file()
        if self.applies:
            run.check_state(run.pulumi.deployed())
        since = run.clock() - (run.deployed_at or run.clock() - interval)
        return min(interval, since) if since > 0 else interval

    def advanced(self, run: RolloutRun, index: int, judgements: list[Judgement]) -> Outcome | None:
        """After stage `index` is written: go on judging (None), or end the run here."""
        return None

    def loop(self, run: RolloutRun, index: int) -> Outcome:
        """Judge the stage at `index` until `decide` ends the run or a driver stops it after an advance."""
        stages = list(run.plan.stages)
        counters, judgements = Counters(), []
        while True:
            judgement = run.judge(index, run.expected, self.window(run, index, judgements))
            judgements.append(judgement)
            run.report(describe(judgement, index, len(stages)))
            action, counters = decide(judgement.verdict, counters, index == len(stages) - 1, run.plan)
            if action == Action.ROLLBACK:
                why = "; ".join(judgement.reasons)
                if judgement.verdict != Verdict.FAILED:
                    why = f"{counters.inconclusive} inconclusive checks: {why}"
                return run.rollback(why, judgements)
            if action == Action.PAUSE:
                return run.pause(f"{counters.inconclusive} inconclusive checks: " + "; ".join(judgement.reasons),
                                 stages[index], judgements)  # fmt: skip
            if action == Action.PROMOTE:
                return run.promote(judgements)
            if action == Action.ADVANCE:
                index += 1
                run.report(f"stage {index + 1}/{len(stages)}: {run.apply(stages[index])}")
                if (ending := self.advanced(run, index, judgements)) is not None:
                    return ending


class Resume(Driver):
    """`--resume`: continue an interrupted run from the stack file, re-applying it first."""

    def drive(self, run: RolloutRun) -> Outcome:
        current = run.current()
        if not current:
            return self.first_stage(run)
        run.pulumi.ensure_cli()
        run.begin()
        run.report(f"resuming at {current} %: applying the stack file as it is")
        run.up_as_is()
        return self.loop(run, run.plan.stages.index(current))


class Step(Driver):
    """`--step`: judge what is deployed, write the next edit for a pull request, never `pulumi up`."""

    applies = False
    NEXT = "after it is deployed, run --step again to judge it and write the next one"

    def __init__(self) -> None:
        self.deployed: Deployed | None = None  # the stack's update that deployed the stage this run judges

    def drive(self, run: RolloutRun) -> Outcome:
        run.check_last_step()
        current = run.current()
        if not current:
            return self.first_stage(run)
        index = run.plan.stages.index(current)
        run.check_file()
        self.deployed = run.pulumi.deployed()
        if self.deployed is None or self.deployed.traffic.get(run.model_key) != run.fingerprint(run.expected):
            stage = f"stage {index + 1} ({run.plan.challenger} at {current} %)"
            return Outcome(Result.NOT_DEPLOYED, [], f"{stage} is not deployed yet: the stack's last successful update "
                           "carries other weights. Merge and deploy it, then run --step again")  # fmt: skip
        run.begin()  # only now: a --step that finds nothing to judge writes nothing, not even a start record
        return self.loop(run, index)

    def window(self, run: RolloutRun, index: int, judgements: list[Judgement]) -> float:
        """The first judgement waits until an interval has passed since the update that deployed the stage."""
        if judgements or self.deployed is None:
            return super().window(run, index, judgements)
        interval = run.plan.interval_seconds
        run.check_file()
        since = run.clock() - self.deployed.ended
        if since < interval:  # metrics from before the deploy ended say nothing about this stage
            run.report(f"stage {index + 1} was deployed {since:.0f} s ago: judging in {interval - since:.0f} s")
            run.sleep(interval - since)
            since = run.clock() - self.deployed.ended
        return min(interval, since)

    def advanced(self, run: RolloutRun, index: int, judgements: list[Judgement]) -> Outcome:
        percent = run.plan.stages[index]
        return Outcome(Result.STEPPED, judgements,
                       f"wrote stage {index + 1} ({percent} %) to {run.path.name}; {self.NEXT}")  # fmt: skip


class DryRun(Driver):
    """`--dry-run`: judge the current stage and print; write nothing at all."""

    records = False

    def drive(self, run: RolloutRun) -> Outcome:
        current = run.current()
        stages = run.plan.stages
        index = stages.index(current) if current else -1
        judgement = run.judge(index, run.expected, run.plan.interval_seconds)
        run.report(describe(judgement, index, len(stages)))
        return Outcome(Result.JUDGED, [judgement], f"dry run, nothing written: verdict {judgement.verdict}")


class Abort(Driver):
    """`--abort`: roll back now."""

    def drive(self, run: RolloutRun) -> Outcome:
        run.current()
        run.pulumi.ensure_cli()
        run.started = True
        return run.rollback("aborted by hand", [])


DRIVERS: dict[Mode, type[Driver]] = {
    Mode.RUN: Driver,
    Mode.RESUME: Resume,
    Mode.STEP: Step,
    Mode.DRY_RUN: DryRun,
    Mode.ABORT: Abort,
}


def describe(judgement: Judgement, index: int, total: int) -> str:
    where = f"stage {index + 1}/{total}" if index >= 0 else "before stage 1"
    parts = [f"{where} {judgement.weights}: {judgement.verdict}"]
    for check in judgement.checks:
        chall = "-" if check.challenger is None else f"{check.challenger:.4g}"
        champ = "-" if check.champion is None else f"{check.champion:.4g}"
        parts.append(
            f"  {check.name}: challenger {chall} champion {champ} limit {check.limit:g} {check.verdict} {check.note}"
        )
    return "\n".join(parts)


def rollout_run(*args: Any, mode: Mode = Mode.RUN, **kwargs: Any) -> RolloutRun:
    """A `RolloutRun` driven by `mode`'s driver (the run itself knows no modes)."""
    return RolloutRun(*args, driver=DRIVERS[mode](), mode=mode, **kwargs)
