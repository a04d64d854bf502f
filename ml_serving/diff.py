"""Object-level diff of a stack's plan against its plan at a git ref: what a config edit really changes.

The plan at the ref is made by the ref's own code and stack file (from `git archive`), run from the current
project folder so relative paths (the dev registry) mean the same in both plans.
"""

from __future__ import annotations

import difflib
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ml_serving.plan import read_rendered


class DiffError(RuntimeError):
    """The plan at the ref could not be made: the message says why."""


@dataclass(frozen=True)
class ObjectChange:
    key: str
    action: str  # "added", "removed" or "changed"
    lines: list[str]


def check_ref(project_dir: Path, ref: str) -> None:
    """Fail before planning anything when git knows no commit by that name."""
    run = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=project_dir, capture_output=True
    )
    if run.returncode != 0:
        raise DiffError(f"git cannot read ref {ref!r}: name a branch, tag or commit (see `git log --oneline`)")


def plan_at_ref(project_dir: Path, ref: str, stack: str, out_dir: Path) -> None:
    """Check `ref` out into a temporary folder and plan `stack` with that tree's code into `out_dir`."""
    with tempfile.TemporaryDirectory(prefix="ml-serving-ref-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        archive = Path(tmp) / "tree.tar"
        run = subprocess.run(
            ["git", "archive", "--format=tar", "-o", str(archive), ref],
            cwd=project_dir,
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            raise DiffError(f"git cannot read ref {ref!r}: {run.stderr.strip()}")
        with tarfile.open(archive) as tar:
            tar.extractall(tree, filter="data")
        if not (tree / f"Pulumi.{stack}.yaml").exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            return  # the stack is new since the ref: everything is added
        if not (tree / "ml_serving" / "plan.py").exists():
            raise DiffError(f"ref {ref!r} predates `ml-serving plan`: pick a later ref")
        bootstrap = (
            "import sys; sys.path.insert(0, sys.argv[1]); from ml_serving.cli import main; sys.exit(main(sys.argv[2:]))"
        )
        command = [
            sys.executable,
            "-c",
            bootstrap,
            str(tree),
            "plan",
            stack,
            "--project-dir",
            str(tree),
            "--out",
            str(out_dir),
            "--quiet",
            "--cwd",
            str(project_dir),
        ]
        run = subprocess.run(command, cwd=project_dir, capture_output=True, text=True)
        if run.returncode != 0:
            raise DiffError(f"the plan of {stack!r} at {ref!r} failed:\n{(run.stdout + run.stderr).strip()}")


def diff_rendered(before_dir: Path, after_dir: Path) -> list[ObjectChange]:
    before, after = read_rendered(before_dir), read_rendered(after_dir)
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        action = "added" if old is None else "removed" if new is None else "changed"
        lines = list(
            difflib.unified_diff(
                (old or "").splitlines(), (new or "").splitlines(), f"a/{key}.yaml", f"b/{key}.yaml", lineterm="", n=3
            )
        )
        changes.append(ObjectChange(key, action, lines))
    return changes
