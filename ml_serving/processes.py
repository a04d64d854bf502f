"""The local processes the project starts for a cluster, a node, an engine or a store: free ports, readiness over
HTTP, and a stop by process group (each is started with `start_new_session=True`, so its children go with it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the caller binds it next)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
