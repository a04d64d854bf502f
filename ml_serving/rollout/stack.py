"""The Pulumi adapter: `pulumi up` for one stack through the Automation API, and what its last update deployed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ml_serving.rollout.events import RolloutError


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
