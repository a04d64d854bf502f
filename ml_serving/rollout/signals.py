"""One rollout per stack (a lock that goes with the process), and SIGTERM/Ctrl-C turned into one rollback."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ml_serving.rollout.events import Interrupted, RolloutError


def lock_path(project_dir: Path, stack: str) -> Path:
    return project_dir / f".rollout-{stack}.lock"


@contextlib.contextmanager
def locked(project_dir: Path, stack: str) -> Iterator[None]:
    """One rollout per stack at a time; the lock goes with the process, so a killed rollout leaves none behind."""
    path = lock_path(project_dir, stack)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RolloutError(f"another rollout of stack {stack} is running (lock {path.name}): wait for it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def running_rollout(project_dir: Path, stack: str) -> int | None:
    """The PID of the rollout holding the stack's lock, or None when no rollout runs."""
    path = lock_path(project_dir, stack)
    if not path.exists():
        return None
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def stop_running(project_dir: Path, stack: str, seconds: float = 600, poll: float = 0.2) -> int | None:
    """`--abort` while a rollout runs: ask it (SIGTERM) to roll back and wait until it has let go of the lock."""
    pid = running_rollout(project_dir, stack)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + seconds
    while running_rollout(project_dir, stack) == pid:
        if time.monotonic() > deadline:
            raise RolloutError(f"the rollout (PID {pid}) did not stop within {seconds:.0f} s")
        time.sleep(poll)
    return pid


@contextlib.contextmanager
def _signals(handler: Callable[[int, Any], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM (e.g. from `--abort`) and Ctrl-C raise `Interrupted` in the loop, so it can roll back once."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    with _signals(handler):
        yield


@contextlib.contextmanager
def deferred_interrupts(then_raise: bool = True) -> Iterator[None]:
    """Hold SIGTERM/Ctrl-C until the block is done (a `pulumi up` is never left running behind our back).

    `then_raise=False` drops them: a rollback under way is finished, not interrupted a second time.
    """
    if _deferring:  # an enclosing block holds the signals already and decides what becomes of them
        yield
        return
    pending: list[str] = []
    _deferring.append(pending)
    try:
        with _signals(lambda signum, frame: pending.append(signal.Signals(signum).name)):
            yield
    finally:
        _deferring.remove(pending)
    if pending and then_raise:
        raise Interrupted(pending[0])


_deferring: list[list[str]] = []  # the signals held by the outermost `deferred_interrupts` block now running
