"""One rollout run: the stack file, `pulumi up`, Prometheus and the log around the pure decision.

The stack file is the only state: every step is a round-trip edit of `Pulumi.<stack>.yaml` followed by `pulumi up`,
so a rollback is a commit-able edit and a crash leaves a file that says what was last asked for. `RolloutRun` knows
no modes: its `driver` (drivers.py, one per mode) says where the run starts, how it waits and when it stops.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ml_serving.rollout.decision import current_weights, judge, other_weights, stage_weights
from ml_serving.rollout.edits import Restore, promote_in_config, restore_fields, variant_fields, write_weights
from ml_serving.rollout.events import (
    ENDINGS,
    Drift,
    Event,
    Interrupted,
    Judgement,
    Mode,
    ModeDriver,
    Outcome,
    Result,
    RolloutError,
)
from ml_serving.rollout.prometheus import Prometheus
from ml_serving.rollout.signals import deferred_interrupts
from ml_serving.rollout.stack import Deployed, PulumiStack
from ml_serving.settings import ConfigError, Model, Settings
from ml_serving.stackfile import load_settings, revert, stack_file


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
        driver: ModeDriver,
        mode: Mode = Mode.RUN,
        report: Callable[[str], None] = print,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.project_dir, self.stack, self.model_key, self.mode = project_dir, stack, model_key, mode
        self.driver = driver
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
        others = other_weights(model, plan)
        if others:
            names = [n for n, v in model.variants.items() if not v.shadow and (v.weight or 0)
                     and n not in (plan.champion, plan.challenger)]  # fmt: skip
            raise RolloutError(
                f"{where}: {', '.join(names)} keep{'s' if len(names) == 1 else ''} {others} % of the traffic, so the "
                f"last stage ({plan.challenger} at {plan.stages[-1]} %) leaves {plan.champion} at "
                f"{100 - others - plan.stages[-1]} %: set them to weight 0 or make them shadows first"
            )

    def refuse_promoted_already(self, model: Model) -> None:
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

    def check_signatures(self) -> None:
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

    def check_last_step(self) -> None:
        """--step runs are separate processes: the log says what the previous one wrote, the file must agree."""
        if not self.log_path.exists():
            return
        from ml_serving.rollout.report import read_log

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
                f"{self.path.name} now says {fmt_weights(found)} for {self.model_key}, not "
                f"{fmt_weights(self.expected)} as this rollout left it: someone else changed the weights"
            )

    def unreadable(self, exc: ConfigError) -> Drift:
        """Someone left the file unparseable or invalid mid-rollout: stop, saying what the stack runs."""
        return Drift(
            f"{self.path.name} no longer parses as a stack file ({' '.join(str(exc).split())}); the stack runs "
            f"{fmt_weights(self.expected)} as this rollout last wrote it: fix the file, then continue with --resume "
            "or roll back with --abort"
        )

    def check_state(self, deployed: Deployed | None) -> None:
        if deployed is None or self.model_key not in deployed.traffic:
            return
        if deployed.traffic[self.model_key] != self.fingerprint(self.expected):
            raise Drift(
                f"stack {self.stack}'s last update deployed other weights for {self.model_key} than this rollout "
                f"wrote ({fmt_weights(self.expected)}): someone else ran `pulumi up`"
            )

    # -- side effects ------------------------------------------------------------------------------------------

    def log(self, event: Event, **record: Any) -> None:
        if not self.driver.records:
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
        self.log(Event.APPLY, weights=weights, proposed=not self.driver.applies)
        if not self.driver.applies:
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
                f"were not put back: the stack runs {fmt_weights(before)}, set the file to that by hand"
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
        self.log(Event.ROLLBACK, reason=why, weights=weights, proposed=not self.driver.applies)
        done = f"{self.plan.challenger} at 0 %"
        if not self.driver.applies:
            done += f" written to {self.path.name}: merge it now"
        return Outcome(Result.ROLLED_BACK, judgements, f"rolled back ({why}): {done}")

    def pause(self, why: str, percent: int, judgements: list[Judgement]) -> Outcome:
        self.log(Event.PAUSE, reason=why)
        return Outcome(Result.PAUSED, judgements, f"paused at {percent} % ({why})")

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
        if self.driver.applies:
            restore = Restore(lambda: restore_fields(self.path, self.model_key, saved), text_before, text_after)
            self._up(restore, final, before)
        self.log(Event.PROMOTE, version=version, how=self.plan.promote, proposed=not self.driver.applies)
        message = f"promoted {self.plan.challenger} (version {version}) to champion"
        if not self.driver.applies:
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
            return self.driver.drive(self)
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
            try:
                return self.rollback(f"interrupted by {exc}", [])
            except RolloutError as failed:  # logged as apply-failed; the file says what the stack runs
                return Outcome(Result.FAILED, [], f"interrupted, and the rollback failed: {failed}")

    def current(self) -> int:
        """The challenger's weight in the file now: 0 or one of the stages."""
        current, stages = self.expected[self.plan.challenger], list(self.plan.stages)
        if current and current not in stages:
            raise RolloutError(
                f"{self.path.name}: {self.plan.challenger} is at {current} %, not one of the stages {stages}: "
                "set it to 0 or to a stage"
            )
        return current

    def begin(self) -> None:
        """From here on the run may write: say the gates, log the start."""
        self.report(self.gates_in_force())
        self.log(Event.START, mode=str(self.mode), gates=self.plan.model_dump(mode="json"))
        self.started = True

    def up_as_is(self) -> None:
        """`pulumi up` of the stack file as it is (a resumed run's first step)."""
        self._up(None, self.expected, self.expected)

    def stop(self, drift: Drift) -> Outcome:
        self.log(Event.STOPPED, reason=str(drift), weights=self.expected)
        return Outcome(Result.STOPPED, [], f"stopped, nothing touched: {drift}")


def fmt_weights(weights: dict[str, int]) -> str:
    return ", ".join(f"{k} {v} %" for k, v in weights.items())
