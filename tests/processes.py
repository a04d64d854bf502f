"""Real processes on loopback for tests: MLflow, the serving server, Prometheus. Started, waited for, stopped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import requests
import yaml

from ml_serving.processes import free_port


def wait_for(url: str, process: subprocess.Popen, log: Path, seconds: float = 120) -> float:
    """Poll `url` until it answers 200; returns the seconds it took. Fails with the process log if it dies."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {seconds} s:\n{log.read_text()[-4000:]}")


@contextmanager
def running(
    command: list[str], log: Path, env: dict | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, 15)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)
                    process.wait()


@contextmanager
def mlflow_server(backend_uri: str, workdir: Path) -> Iterator[str]:
    """`mlflow server` on loopback: sqlite backend, artifacts served from a local folder."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_uri, "--artifacts-destination", str(workdir / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    log = workdir / "mlflow-server.log"
    with running(command, log, cwd=workdir) as process:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/health", process, log, seconds=180)
        yield url


@contextmanager
def serving_servers(
    models: dict[str, str], workdir: Path, env: dict | None = None
) -> Iterator[dict[str, dict[str, int]]]:
    """The serving image's server (one worker, V2 model name `churn`) per variant, started together.

    Yields each variant's `http`, `grpc` and `metrics` ports once every server is ready.
    """
    ports = {variant: {kind: free_port() for kind in ("http", "grpc", "metrics")} for variant in models}
    with ExitStack() as stack:
        started = {}
        for variant, model in models.items():
            variant_env = {
                "MLSERVER_HTTP_PORT": str(ports[variant]["http"]), "MLSERVER_GRPC_PORT": str(ports[variant]["grpc"]),
                "MLSERVER_METRICS_PORT": str(ports[variant]["metrics"]), "MLSERVER_PARALLEL_WORKERS": "1",
                "MLSERVER_METRICS_DIR": str(workdir / f"metrics-{variant}"), "MLSERVER_MODEL_NAME": "churn",
                **(env or {}),
            }  # fmt: skip
            command = [sys.executable, "-m", "ml_serving.server", model]
            started[variant] = stack.enter_context(running(command, workdir / f"{variant}.log", env=variant_env))
        for variant, process in started.items():
            ready = f"http://127.0.0.1:{ports[variant]['http']}/v2/health/ready"
            wait_for(ready, process, workdir / f"{variant}.log")
        yield ports


@contextmanager
def prometheus_server(config: dict, workdir: Path) -> Iterator[str]:
    """Debian's `prometheus` on loopback with `config` as its prometheus.yml; yields its URL once ready."""
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [str(shutil.which("prometheus")), f"--config.file={workdir / 'prometheus.yml'}",
               f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    log = workdir / "prometheus.log"
    with running(command, log) as process:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/-/ready", process, log)
        yield url
