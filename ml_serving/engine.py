"""The real Pulumi engine: `preview`, `up`, `destroy` of a stack through the Automation API.

The program runs as an *inline* program: the Automation API serves the language runtime from this Python
process and the CLI (`pulumi`, built by `./run tools`) drives the engine and the Kubernetes provider plugin.
That is the same `__main__.py` a `pulumi up` in this folder runs; it needs no `pulumi-language-python` binary,
which the Go module proxy does not serve.
"""

from __future__ import annotations

import os
import runpy
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_serving.localcluster import tools_dir, tools_env
from ml_serving.plan import _program_context

STATE_DIR = ".pulumi-state"


class EngineError(RuntimeError):
    """The engine cannot run here (no CLI, no passphrase) or a command failed; the message says what to do."""


def cli_folder() -> Path | None:
    """The built tools' folder when they provide the CLI; None when a `pulumi` on PATH is the one to use."""
    if shutil.which("pulumi") is not None:
        return None
    folder = tools_dir()
    if folder is None:
        raise EngineError("no Pulumi CLI: run `./run tools` (builds it from Go modules) or put `pulumi` on PATH")
    return folder


def environment(project_dir: Path) -> dict[str, str]:
    """What the CLI needs beyond the caller's environment: the CLI, no plugin downloads, a local backend.

    A `pulumi` on PATH wins over the one `./run tools` built. A caller's own `PULUMI_BACKEND_URL` wins too;
    without one, state goes to `.pulumi-state/` in the project.
    """
    env: dict[str, str] = {}
    folder = cli_folder()
    if folder is not None:
        env.update(tools_env(folder))
    env.setdefault("PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION", "true")
    if "PULUMI_BACKEND_URL" not in os.environ:
        (project_dir / STATE_DIR).mkdir(exist_ok=True)
        env["PULUMI_BACKEND_URL"] = f"file://{(project_dir / STATE_DIR).resolve()}"
    if not any(os.environ.get(k) for k in ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE")):
        raise EngineError(
            "PULUMI_CONFIG_PASSPHRASE is not set: the stack files' secrets are encrypted with a passphrase "
            "(README, 'Secrets'); export it, or PULUMI_CONFIG_PASSPHRASE_FILE"
        )
    return env


def inline_program(project_dir: Path) -> Callable[[], None]:
    """`__main__.py` of `project_dir`, run in its folder, as the Automation API's inline program."""

    def program() -> None:
        with _program_context(project_dir, project_dir):
            runpy.run_path(str(project_dir / "__main__.py"), run_name="__main__")

    return program


def select(project_dir: Path, stack: str, create: bool = True) -> Any:
    """The stack (created in the backend on first use, with the stack file's secrets provider and salt).

    The CLI and its plugins get a temp folder of their own (TMPDIR), removed with the returned stack: the Kubernetes
    provider writes the kubeconfig it is given, credentials and all, to a new temp file each time it is configured,
    and never removes it."""
    scratch = Path(tempfile.mkdtemp(prefix="ml-serving-pulumi-"))
    try:
        selected = _select(project_dir, stack, create, {**environment(project_dir), "TMPDIR": str(scratch)})
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    weakref.finalize(selected, shutil.rmtree, scratch, ignore_errors=True)
    return selected


def _select(project_dir: Path, stack: str, create: bool, env: dict[str, str]) -> Any:
    from pulumi import automation as auto

    folder = cli_folder()
    command = auto.PulumiCommand(root=str(folder), skip_version_check=True) if folder is not None else None
    workspace = auto.LocalWorkspace(
        work_dir=str(project_dir),
        program=inline_program(project_dir),
        env_vars=env,
        pulumi_home=env.get("PULUMI_HOME"),
        pulumi_command=command,
    )  # no project_settings: the workspace would rewrite the project's own Pulumi.yaml
    try:
        if create:
            return auto.Stack.create_or_select(stack, workspace)
        return auto.Stack.select(stack, workspace)
    except auto.errors.CommandError as exc:
        raise EngineError(f"pulumi could not select stack {stack}: {str(exc).strip()[-800:]}") from None


def run(project_dir: Path, stack: str, action: str, on_output: Callable[[str], None] | None = print, **kwargs: Any):  # type: ignore[no-untyped-def]
    """`preview`, `up`, `destroy` or `refresh` of `stack`; the CLI's own output goes to `on_output`."""
    from pulumi import automation as auto

    selected = select(project_dir, stack)
    try:
        return getattr(selected, action)(on_output=on_output, **kwargs)
    except (auto.errors.CommandError, RuntimeError) as exc:  # RuntimeError: the CLI sent no summary event
        raise EngineError(f"`pulumi {action}` of stack {stack} failed: {failure(exc)}") from None


def failure(exc: Exception) -> str:
    """The CLI's own error lines (each resource's, then the update's), not the whole captured output."""
    lines = [line.strip() for line in str(exc).splitlines()]
    errors = [line for line in lines if line.startswith("error:") or ": error:" in line]
    return " | ".join(dict.fromkeys(errors))[-2000:] if errors else str(exc).strip()[-1000:]
