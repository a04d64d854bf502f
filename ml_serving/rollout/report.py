"""The rollout report: a table per stage and a picture of challenger vs champion, read from the JSON-lines log."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from ml_serving.rollout.events import ENDINGS, Event, Gate

if TYPE_CHECKING:
    from rich.console import Console

    from ml_serving.rollout.events import Outcome


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check(record: dict[str, Any], check: str) -> dict[str, Any] | None:
    return next((c for c in record.get("checks", []) if c["name"] == check), None)


def _value(record: dict[str, Any], check: str, side: str) -> float | None:
    found = _check(record, check)
    return None if found is None else found.get(side)


def stage_table(records: list[dict[str, Any]]) -> Table:
    table = Table(title="rollout checks", title_justify="left")
    columns = {Gate.ERROR_RATIO: "error ratio", Gate.LATENCY_P95: "p95 s", Gate.REJECTED_VS_CHAMPION: "4xx share"}
    for column in ("stage", "weights", "requests", *(f"{c} (chall / champ)" for c in columns.values()), "verdict"):
        table.add_column(column)
    for record in (r for r in records if r["event"] == Event.JUDGEMENT):
        table.add_row(
            str(record["stage"] + 1),
            ", ".join(f"{k} {v}%" for k, v in record["weights"].items()),
            _fmt(_value(record, Gate.REQUESTS, "challenger")),
            *(f"{_fmt(_value(record, g, 'challenger'))} / {_fmt(_value(record, g, 'champion'))}" for g in columns),
            record["verdict"],
        )
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def limit_series(judged: list[dict[str, Any]], check: str, start: float) -> list[tuple[float, float]]:
    """Each judgement's limit for `check` (seconds since the start, limit): gates re-read per stage may move it."""
    return [(r["time"] - start, found["limit"]) for r in judged if (found := _check(r, check))]


def write_picture(records: list[dict[str, Any]], path: Path) -> Path:
    """Error ratio and p95 latency of both variants at each judgement, each gate's limit beside them, stage changes
    and the end marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = records[0]["time"] if records else 0
    judged = [r for r in records if r["event"] == Event.JUDGEMENT]
    figure, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for axis, check, label in (
        (axes[0], Gate.ERROR_RATIO, "error ratio"),
        (axes[1], Gate.LATENCY_P95, "p95 latency (s)"),
    ):
        for side, style in (("champion", "o-"), ("challenger", "s-")):
            points = [(r["time"] - start, _value(r, check, side)) for r in judged]
            points = [(t, v) for t, v in points if v is not None and math.isfinite(v)]
            if points:
                axis.plot(*zip(*points, strict=True), style, label=side)
        limits = limit_series(judged, check, start)
        if limits:
            axis.step(*zip(*limits, strict=True), "r--", where="post", linewidth=1, label="limit")
        for record in records:
            if record["event"] == Event.APPLY:
                axis.axvline(record["time"] - start, color="grey", linestyle=":", linewidth=1)
            if record["event"] in ENDINGS:
                axis.axvline(record["time"] - start, color="green" if record["event"] == Event.PROMOTE else "red")
        axis.set_ylabel(label)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="upper left")
    for record in records:
        if record["event"] == Event.APPLY:
            axes[0].annotate(f"{next(iter(record['weights'].values()), '?')}%", (record["time"] - start, 1.0),
                             xycoords=("data", "axes fraction"), fontsize=8, va="top")  # fmt: skip
    ending = next((r["event"] for r in reversed(records) if r["event"] in ENDINGS), "running")
    figure.suptitle(f"{records[0]['model'] if records else ''} on {records[0]['stack'] if records else ''}: {ending}")
    axes[1].set_xlabel("seconds since the rollout started (dotted: a new stage applied)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def print_ending(console: Console, outcome: Outcome, log_path: Path, started: float, dry_run: bool) -> None:
    """How the run ended, after the table and picture of what it logged (a run that logged nothing draws none:
    the last picture stands)."""
    records = [r for r in read_log(log_path) if r["time"] >= started] if log_path.exists() else []
    if dry_run or not records:
        console.print(f"{outcome.result}: {outcome.message}")
        return
    console.print(stage_table(records))
    picture = write_picture(records, log_path.with_suffix(".png"))
    console.print(f"{outcome.result}: {outcome.message} (log: {log_path}, picture: {picture})")


def countdown(console: Console) -> Callable[[float], None]:
    """A sleep that waits out an analysis interval showing the time to the next judgement."""

    def sleep(seconds: float) -> None:
        end = time.monotonic() + seconds
        with console.status("") as status:
            while (left := end - time.monotonic()) > 0:
                status.update(f"next judgement in {left:.0f} s")
                time.sleep(min(1.0, left))

    return sleep
