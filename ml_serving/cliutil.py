"""What every `ml-serving` command shares: its consoles, the user-mistake error and where the project is."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from ml_serving import PROJECT

console = Console(highlight=False)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # piped or in CI: rich's default of 80 columns would fold the model URIs into ribbons
errors = Console(stderr=True, highlight=False, soft_wrap=True)


class UsageError(RuntimeError):
    """A mistake the user can fix; printed without a traceback."""


def find_project_dir(start: Path | None = None) -> Path:
    """The nearest folder upwards with this project's Pulumi.yaml, else the checkout this package runs from."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "Pulumi.yaml"
        if candidate.exists() and f"name: {PROJECT}" in candidate.read_text():
            return folder
    fallback = Path(__file__).resolve().parent.parent
    if (fallback / "Pulumi.yaml").exists():
        return fallback
    raise UsageError("no ml-serving Pulumi.yaml here or above: run from the project, or pass --project-dir")
