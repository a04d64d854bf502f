"""`LoggedProcess` (ml_serving/processes.py), the start-wait-stop every server beside the one-machine cluster uses
(the Seldon operator, prometheus-operator, the S3 store, the OCI registry, the API relay): real processes on
127.0.0.1, stopped by PID."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml_serving.processes import LEASE_SECONDS, LoggedProcess, free_port, listening


class Refused(RuntimeError):
    pass


@dataclass
class Server(LoggedProcess):
    log: Path
    port: int = 0
    process: subprocess.Popen | None = None
    error = Refused

    def start(self, command: list[str] | None = None, seconds: float = 60) -> Server:
        self.port = free_port()
        default = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port)]
        self.spawn(command or default, "http.server", lambda: listening("127.0.0.1", self.port), seconds)
        return self


def test_a_started_server_answers_and_is_gone_after_stop(tmp_path: Path) -> None:
    server = Server(tmp_path / "server.log").start()
    process = server.process
    assert server.running() and listening("127.0.0.1", server.port)
    server.stop()
    assert process is not None and process.poll() is not None
    assert server.process is None and not server.running()
    server.stop()  # a second stop is harmless


def test_a_server_that_exits_raises_the_callers_error_with_its_log(tmp_path: Path) -> None:
    server = Server(tmp_path / "server.log")
    failing = [sys.executable, "-c", "import sys; print('port taken'); sys.exit(3)"]
    with pytest.raises(Refused, match=r"(?s)http.server exited with 3:.*port taken"):
        server.start(failing)
    assert server.process is None


def test_a_server_that_never_gets_ready_is_stopped_before_the_error(tmp_path: Path) -> None:
    server = Server(tmp_path / "server.log")
    silent = [sys.executable, "-c", "import time; time.sleep(600)"]  # never listens
    with pytest.raises(Refused, match=r"http\.server not ready after 1 s"):
        server.start(silent, seconds=1)
    assert server.process is None


def test_free_ports_come_from_outside_the_kernels_ephemeral_range() -> None:
    """An ephemeral port can be taken by any outgoing connection before our server binds it (EADDRINUSE)."""
    low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {free_port() for _ in range(50)}
    assert not {port for port in ports if low <= port <= high}
    assert all(port < 30000 for port in ports)  # nor in Kubernetes' NodePort range


def test_a_taken_port_is_never_handed_out(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        picks = iter([taken.getsockname()[1], 24680])
        assert free_port("127.0.0.1", choose=lambda _: next(picks), leases=tmp_path / "leases.json") == 24680


def test_a_port_handed_out_is_not_handed_out_again_until_its_lease_ends(tmp_path: Path) -> None:
    """Servers started together (or by parallel test workers) bind seconds after their ports were drawn: one CI run
    gave a challenger's metrics port to another server before the first had bound it (EADDRINUSE)."""
    leases = tmp_path / "leases.json"
    port = free_port(leases=leases)
    other = port + 1 if port + 1 < 30000 else port - 1
    picks = iter([port, other])
    assert free_port(choose=lambda _: next(picks), leases=leases) == other, "handed out twice"

    now = [1000.0]
    leases = tmp_path / "clocked.json"
    first = free_port(choose=lambda _: 24680, leases=leases, clock=lambda: now[0])
    now[0] += LEASE_SECONDS + 1
    assert free_port(choose=lambda _: 24680, leases=leases, clock=lambda: now[0]) == first, "an ended lease frees it"
