"""Fixtures for the `image` tests: a Docker engine and a local OCI registry, started here when none is running,
and containers run the way a pod runs them (host network, read-only root, UID 10001)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from ml_serving import containers


def missing(reason: str) -> None:
    """Under ML_SERVING_REQUIRE_ENGINE (set by .ci/run) a missing engine or tool fails the test; else it skips."""
    if os.environ.get("ML_SERVING_REQUIRE_ENGINE"):
        pytest.fail(f"ML_SERVING_REQUIRE_ENGINE is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory) -> Iterator[containers.Engine]:
    """The running engine, or `dockerd` started for this session and stopped after it (by its PID)."""
    try:
        engine = containers.start_engine(tmp_path_factory.mktemp("dockerd"))
    except containers.ContainerError as error:
        missing(str(error))
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def oci_registry(tmp_path_factory) -> Iterator[containers.LocalRegistry]:
    binary = containers.registry_binary()
    if binary is None:
        missing("the OCI registry is not built: run `tools/build.sh registry` (or `./run tools`)")
    registry = containers.LocalRegistry(binary, root=tmp_path_factory.mktemp("oci")).start()
    yield registry
    registry.stop()


@dataclass
class Container:
    """One running container: its name, ports on the host network, and its log."""

    name: str
    ports: dict[str, int]

    def url(self, port: str = "http") -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def running(self) -> bool:
        state = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.Running}}", self.name], capture_output=True, text=True
        )
        return state.stdout.strip() == "true"

    def exit_code(self) -> int:
        state = subprocess.run(
            ["docker", "inspect", "--format", "{{.State.ExitCode}}", self.name], capture_output=True, text=True
        )
        return int(state.stdout.strip())

    def logs(self) -> str:
        return subprocess.run(["docker", "logs", self.name], capture_output=True, text=True).stdout[-4000:]

    def wait_ready(self, path: str, port: str = "http", seconds: float = 240) -> float:
        """Poll `path` until 200; the seconds it took. Fails with the container's log if it exits."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            try:
                if requests.get(self.url(port) + path, timeout=1).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            if not self.running():
                raise AssertionError(f"container {self.name} exited:\n{self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"{path} not ready after {seconds} s:\n{self.logs()}")

    def stop(self, signal: str = "TERM") -> None:
        subprocess.run(["docker", "kill", "--signal", signal, self.name], capture_output=True)


def run_args(image: str, env: dict[str, str], model: Path | None, name: str, command: list[str]) -> list[str]:
    """`docker run` as the pod spec runs the serving container: host network (loopback only), read-only root,
    UID/GID 10001, /tmp a tmpfs, the model read-only at /mnt/models."""
    args = ["docker", "run", "--detach", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp"]
    args += ["--user", "10001:10001", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    if model is not None:
        args += ["--volume", f"{model}:/mnt/models:ro"]
    return [*args, image, *command]


@contextmanager
def container(
    image: str, env: dict[str, str], ports: dict[str, int], model: Path | None = None, args: list[str] = ()
) -> Iterator[Container]:
    name = f"ml-serving-test-{os.getpid()}-{time.monotonic_ns()}"
    started = subprocess.run(run_args(image, env, model, name, list(args)), capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    try:
        yield Container(name, ports)
    finally:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True)
