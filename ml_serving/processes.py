"""The local processes the project starts for a cluster, a node, an engine or a store: free ports, readiness over
HTTP, and a stop by process group (each is started with `start_new_session=True`, so its children go with it)."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Ports for the servers we start are drawn from below the kernel's ephemeral range (32768-60999 on Linux), and below
# Kubernetes' NodePort range (30000-32767): a port the kernel hands out (bind to 0) can be taken by any outgoing
# connection between our check and the server's own bind, and then the server fails with EADDRINUSE.
PORT_RANGE = range(20000, 30000)
# How long a port handed out by free_port stays reserved for its caller: long enough for a server to load its model
# and bind, short enough that the file of leases stays small.
LEASE_SECONDS = 120.0


def free_port(
    host: str = "127.0.0.1", choose: Callable[[range], int] = random.choice, *, leases: Path | None = None,
    clock: Callable[[], float] = time.time,
) -> int:  # fmt: skip
    """A port free on `host` and on every address now, outside the ephemeral range, and not handed out by any process
    of this user in the last LEASE_SECONDS: its caller binds it seconds later (MLServer binds its metrics port once
    its model has loaded), and servers started together, or by parallel test workers, must not draw the same one."""
    with _port_leases(leases or _default_leases(), clock) as leased:
        for _ in range(200):
            port = choose(PORT_RANGE)
            if port not in leased and all(_bindable(address, port) for address in {host, "0.0.0.0"}):
                leased[port] = clock() + LEASE_SECONDS
                return port
    raise RuntimeError(f"no free port in {PORT_RANGE.start}-{PORT_RANGE.stop - 1} after 200 tries")


def _default_leases() -> Path:
    return Path(tempfile.gettempdir()) / f"ml-serving-port-leases-{os.getuid()}.json"


@contextmanager
def _port_leases(path: Path, clock: Callable[[], float]) -> Iterator[dict[int, float]]:
    """The unexpired leases ({port: expiry}) under an exclusive lock of their file, written back on exit."""
    with path.open("a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        try:
            stored = json.loads(file.read() or "{}")
        except ValueError:  # a writer killed mid-write: its leases are lost, not ours
            stored = {}
        now = clock()
        leased = {int(port): expiry for port, expiry in stored.items() if expiry > now}
        yield leased
        file.seek(0)
        file.truncate()
        file.write(json.dumps(leased))


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def http_ok(url: str) -> bool:
    """Whether `url` answers 200 within a second: a readiness probe for the processes we start."""
    import requests

    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def stop_group(process: subprocess.Popen | None, seconds: float = 20) -> None:
    """SIGTERM to the process group we started, SIGKILL after `seconds`; nothing if it has already exited."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on `host:port` now: readiness for servers without a health URL."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait_until(
    ready: Callable[[], bool], process: subprocess.Popen, log: Path, what: str, seconds: float,
    error: type[Exception] = RuntimeError,
) -> None:  # fmt: skip
    """Poll `ready()` until it holds; `error` (with the log's tail) if the process exits or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"{what} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if ready():
            return
        time.sleep(0.2)
    raise error(f"{what} not ready after {seconds:.0f} s:\n{log.read_text()[-3000:]}")


class LoggedProcess:
    """A server the project runs beside a cluster (operator, store, registry, relay): its own process group, its
    output in `log`, ready when a check passes, stopped by PID. Subclasses are dataclasses with `log` and `process`;
    `error` is the exception their callers catch."""

    log: Path
    process: subprocess.Popen | None
    error: type[Exception] = RuntimeError

    def spawn(self, command: list[str], what: str, ready: Callable[[], bool], seconds: float, **popen: Any) -> None:
        """Start `command` and wait for `ready()`; on any failure (or Ctrl-C) stop it before raising."""
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
            )
        try:
            wait_until(ready, self.process, self.log, what, seconds, self.error)
        except BaseException:
            self.stop()
            raise

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_group(process)
