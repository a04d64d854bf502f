"""`ml-serving rollout`: move a challenger's traffic up stage by stage, judged on Prometheus, undone on failure.

A package of parts with one job each, each testable without the others:

- `events`: the vocabulary the run and the report share (verdicts, gates, log events, results, exit codes);
- `decision`: the pure part, a judgement from Prometheus' numbers and what to do after it (`decide`);
- `prometheus`: Prometheus' HTTP API, one number per variant;
- `edits`: the rollout's stack-file edits (weights, promotion, putting its own fields back);
- `stack`: the Pulumi adapter (`pulumi up`, what the last update deployed);
- `signals`: one rollout per stack (a lock), SIGTERM/Ctrl-C turned into one rollback;
- `run`: one run around the decision (the file, `up`, the log), and `drivers`: one driver per mode;
- `report`: the table and the picture, read from the log.

This module re-exports what the CLI and the tests use.
"""

from ml_serving.rollout.decision import Counters, current_weights, decide, judge, stage_weights
from ml_serving.rollout.drivers import rollout_run
from ml_serving.rollout.edits import promote_in_config, restore_fields, variant_fields, write_weights
from ml_serving.rollout.events import (
    ENDINGS,
    EXIT_CODES,
    EXIT_MEANINGS,
    SEVERITY,
    Action,
    Check,
    Drift,
    Event,
    ExitCode,
    Gate,
    Interrupted,
    Judgement,
    Mode,
    Outcome,
    Result,
    RolloutError,
    Verdict,
)
from ml_serving.rollout.prometheus import MeasurementError, Prometheus
from ml_serving.rollout.report import countdown, print_ending
from ml_serving.rollout.run import RolloutRun
from ml_serving.rollout.signals import deferred_interrupts, interruptible, locked, running_rollout, stop_running
from ml_serving.rollout.stack import Deployed, PulumiStack

__all__ = [
    "ENDINGS", "EXIT_CODES", "EXIT_MEANINGS", "SEVERITY", "Action", "Check", "Counters", "Deployed", "Drift", "Event",
    "ExitCode", "Gate", "Interrupted", "Judgement", "MeasurementError", "Mode", "Outcome", "Prometheus",
    "PulumiStack", "Result", "RolloutError", "RolloutRun", "Verdict", "countdown", "current_weights", "decide",
    "deferred_interrupts", "interruptible", "judge", "locked", "print_ending", "promote_in_config", "restore_fields",
    "rollout_run", "running_rollout", "stage_weights", "stop_running", "variant_fields", "write_weights",
]  # fmt: skip
