"""The rollout's vocabulary, shared by the run and the report: verdicts, gates, log events, results, exit codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Protocol


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
    ExitCode.STOPPED: "stopped: someone else changed the weights, or left the stack file unparseable; nothing touched",
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


class Drift(Exception):
    """Someone else changed the model's weights (in the file or in the stack's state) during the rollout."""


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


@dataclass
class Outcome:
    result: Result
    judgements: list[Judgement]
    message: str

    @property
    def exit_code(self) -> int:
        return int(EXIT_CODES[self.result])


class ModeDriver(Protocol):
    """What a run asks of the driver of its mode (`drivers.py` has one per `Mode`): whether edits are applied and
    logged, and the drive itself. The run knows only this, so `run` does not import `drivers`."""

    applies: bool
    records: bool

    def drive(self, run: Any) -> Outcome: ...
