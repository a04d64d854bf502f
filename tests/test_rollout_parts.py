"""The rollout's parts, each without the others: the drivers table, the line-level undo of an edit, the signals."""

from __future__ import annotations

import os
import signal

import pytest

from ml_serving.rollout import Interrupted, Mode, deferred_interrupts, interruptible
from ml_serving.rollout.drivers import DRIVERS, Driver
from ml_serving.stackfile import revert, variants_of

BEFORE = (
    "config:\n  ml-serving:models:\n    churn:\n      variants:\n        a: {weight: 75}\n        b: {weight: 25}\n"
)
AFTER = BEFORE.replace("75", "50").replace("25}", "50}")


def test_every_mode_has_its_driver_and_only_step_and_dry_run_hold_back():
    assert set(DRIVERS) == set(Mode)
    assert all(issubclass(driver, Driver) for driver in DRIVERS.values())
    assert {m for m, d in DRIVERS.items() if not d.applies} == {Mode.STEP}, "only --step leaves `up` to a merge"
    assert {m for m, d in DRIVERS.items() if not d.records} == {Mode.DRY_RUN}, "only --dry-run writes no log"


def test_revert_puts_back_only_its_own_lines_in_a_file_that_no_longer_parses(tmp_path):
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text("# someone's comment\n" + AFTER + "  broken: [\n")
    assert revert(path, BEFORE, AFTER)
    assert path.read_text() == "# someone's comment\n" + BEFORE + "  broken: [\n"


def test_revert_refuses_lines_someone_changed_since_and_writes_nothing(tmp_path):
    path = tmp_path / "Pulumi.x.yaml"
    edited = AFTER.replace("a: {weight: 50}", "a: {weight: 60}")
    path.write_text(edited)
    assert not revert(path, BEFORE, AFTER)
    assert path.read_text() == edited


def test_variants_of_is_the_one_path_to_a_models_variants():
    import yaml

    assert variants_of(yaml.safe_load(BEFORE), "churn") == {"a": {"weight": 75}, "b": {"weight": 25}}


def test_a_signal_inside_nested_deferred_blocks_is_left_to_the_outermost():
    with interruptible():
        with deferred_interrupts(then_raise=False), deferred_interrupts():  # a rollback, and its `pulumi up`
            os.kill(os.getpid(), signal.SIGTERM)
        # dropped: a rollback under way is finished, not interrupted a second time
        with pytest.raises(Interrupted, match="SIGTERM"), deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
