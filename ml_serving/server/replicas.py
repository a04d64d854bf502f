"""`parallel_workers: N` as N complete MLServer processes sharing one port: the model runs where requests are read.

Stock MLServer puts one front process between every request and its parallel workers: the front parses and
batches every request and pickles each batch to a worker and back, and at 32 connections the requests waited on
that hand-off while the cores idled (issue #15, bench/README). Here the entrypoint binds the HTTP port once and
starts N replicas of the same server, each with the model in its own process (MLServer's in-process adaptive
batching, data plane and metrics, unchanged), each accepting on its own socket bound to that port with
SO_REUSEPORT, so that the kernel spreads the connections over them; gRPC shares its port the same way (gRPC's
default on Linux). Their metrics go to one multiprocess folder, served summed by replica 0's
metrics port. A replica that exits stops the others, so the container restarts as one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

REPLICA_ENV = "ML_SERVING_REPLICA"  # "INDEX/COUNT/FD", set by the entrypoint for each replica it starts
STOP_GRACE_SECONDS = 30


@dataclass(frozen=True)
class Replica:
    """Which of the replicas this process is, and the listening socket it inherited."""

    index: int
    count: int
    http_fd: int

    @classmethod
    def from_env(cls) -> Replica | None:
        value = os.environ.get(REPLICA_ENV)
        if not value:
            return None
        index, count, fd = (int(part) for part in value.split("/"))
        return cls(index, count, fd)

    def env(self) -> dict[str, str]:
        return {REPLICA_ENV: f"{self.index}/{self.count}/{self.http_fd}"}


def listen(host: str, port: int, count: int) -> list[socket.socket]:
    """The HTTP port, bound here once per replica (SO_REUSEPORT) and inherited, one socket by each replica.

    The kernel hands each new connection to one socket by a hash of the client's address, so connections are
    spread evenly. One socket shared by all was not: the replica that woke first accepted a whole burst (27 of
    wrk's 32 connections, or all 32), and with keep-alive the others stayed idle.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listeners = []
    for _ in range(count):
        listener = socket.create_server((host, port), family=family, backlog=2048, reuse_port=True)
        listener.set_inheritable(True)
        listeners.append(listener)
    return listeners


def supervise(listeners: list[socket.socket], argv: list[str], env: dict[str, str]) -> int:
    """Run one replica of `python -m ml_serving.server ARGV` per listening socket until a signal stops them or one
    exits.

    SIGTERM and SIGINT are passed on and the replicas drain as MLServer does; a replica exiting on its own stops
    the rest, and its exit code becomes this process's.
    """
    count = len(listeners)
    command = [sys.executable, "-m", "ml_serving.server", *argv]
    alive: dict[int, int] = {}
    stopping: list[int] = []

    def stop(signum: int, _frame: object = None) -> None:
        stopping.append(signum)
        for pid in alive:
            _signal(pid, signum)

    def kill(_signum: int, _frame: object = None) -> None:
        for pid in alive:
            _signal(pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGALRM, kill)
    for index, listener in enumerate(listeners):
        if stopping:  # a signal while starting: start no more (those started got it)
            break
        fd = listener.fileno()
        replica_env = {**env, **Replica(index, count, fd).env()}
        alive[subprocess.Popen(command, env=replica_env, pass_fds=[fd]).pid] = index
    for listener in listeners:
        listener.close()  # the replicas hold them now
    code = 0
    while alive:
        pid, status = os.waitpid(-1, 0)
        index = alive.pop(pid, None)
        if index is None:
            continue
        exited = os.waitstatus_to_exitcode(status)
        if not stopping:
            print(f"error: replica {index} exited with {exited}: stopping the others", file=sys.stderr, flush=True)
            code = exited or 1
            signal.alarm(STOP_GRACE_SECONDS)  # then `kill`: the others get this long to drain
            stop(signal.SIGTERM)
    return code


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
