"""The rollout report: a table per stage and a picture of challenger vs champion, read from the JSON-lines log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _value(record: dict[str, Any], check: str, side: str) -> float | None:
    found = next((c for c in record.get("checks", []) if c["name"] == check), None)
    return None if found is None else found.get(side)


def stage_table(records: list[dict[str, Any]]) -> Table:
    table = Table(title="rollout checks", title_justify="left")
    for column in ("stage", "weights", "requests", "error ratio (chall / champ)", "p95 s (chall / champ)", "verdict"):
        table.add_column(column)
    for record in (r for r in records if r["event"] == "judgement"):
        table.add_row(
            str(record["stage"] + 1),
            ", ".join(f"{k} {v}%" for k, v in record["weights"].items()),
            _fmt(_value(record, "requests", "challenger")),
            f"{_fmt(_value(record, 'error_ratio', 'challenger'))} / {_fmt(_value(record, 'error_ratio', 'champion'))}",
            f"{_fmt(_value(record, 'latency_p95', 'challenger'))} / {_fmt(_value(record, 'latency_p95', 'champion'))}",
            record["verdict"],
        )
    return table


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def write_picture(records: list[dict[str, Any]], path: Path) -> Path:
    """Error ratio and p95 latency of both variants at each judgement, stage changes and the end marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = records[0]["time"] if records else 0
    judged = [r for r in records if r["event"] == "judgement"]
    figure, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for axis, check, label in ((axes[0], "error_ratio", "error ratio"), (axes[1], "latency_p95", "p95 latency (s)")):
        for side, style in (("champion", "o-"), ("challenger", "s-")):
            points = [(r["time"] - start, _value(r, check, side)) for r in judged]
            points = [(t, v) for t, v in points if v is not None]
            if points:
                axis.plot(*zip(*points, strict=True), style, label=side)
        for record in records:
            if record["event"] == "apply":
                axis.axvline(record["time"] - start, color="grey", linestyle=":", linewidth=1)
            if record["event"] in ("rollback", "promote", "pause"):
                axis.axvline(record["time"] - start, color="red" if record["event"] == "rollback" else "green")
        axis.set_ylabel(label)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="upper left")
    for record in records:
        if record["event"] == "apply":
            axes[0].annotate(f"{record['weights'].get('challenger', '?')}%", (record["time"] - start, 1.0),
                             xycoords=("data", "axes fraction"), fontsize=8, va="top")  # fmt: skip
    ending = next((r["event"] for r in reversed(records) if r["event"] in ("rollback", "promote", "pause")), "running")
    figure.suptitle(f"{records[0]['model'] if records else ''} on {records[0]['stack'] if records else ''}: {ending}")
    axes[1].set_xlabel("seconds since the rollout started (dotted: a new stage applied)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
