"""Serving images: size per runtime, build time cold (no layer cache) and cached, and container start -> ready
(median of 5, run as a pod runs it) against the same server started as a local process. Run:

    .venv/bin/python bench/images.py [--skip-cold] [RUNTIMES...]     # mlserver bentoml (default: both)

`--skip-cold` leaves out the build without layer cache (about 10-15 minutes per image on a busy 2-core machine).

Needs a Docker engine (started if none answers) and builds each image twice; the base image is made first (a
Debian stand-in if it cannot be pulled) and not counted.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from ml_serving import containers, image  # noqa: E402
from tests import processes  # noqa: E402
from tests.container_fixtures import container  # noqa: E402

ROUNDS = 5


def seeded_model(work: Path) -> Path:
    from mlflow.tracking import MlflowClient

    from ml_serving.seed import register_churn_model

    uri = f"sqlite:///{work / 'registry.db'}"
    register_churn_model(uri, aliases=("champion",))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return Path(client.get_model_version_download_uri("churn-classifier", "1").removeprefix("file://"))


def build_times(context: Path, name: str, cold: bool) -> tuple[float | None, float]:
    """Seconds for a build with no layer cache (if `cold`), then for the same build again (every layer cached)."""
    seconds = containers.build_image(context, name, cache=False).seconds if cold else None
    if not cold:
        containers.build_image(context, name)  # make sure it exists; the next one is the cached figure
    return seconds, containers.build_image(context, name).seconds


def size_mb(name: str) -> float:
    out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", name], capture_output=True, text=True)
    return int(out.stdout.strip()) / 1e6


def container_ready(name: str, runtime: str, model: Path) -> float:
    if runtime == "bentoml":
        port = processes.free_port()
        env = {"MLSERVER_MODEL_NAME": "churn", "MLSERVER_MODEL_URI": "/mnt/models"}
        with container(name, env, {"http": port}, model=model, args=["--port", str(port)]) as running:
            return running.wait_ready("/readyz", seconds=600)
    ports = {"http": processes.free_port(), "grpc": processes.free_port(), "metrics": processes.free_port()}
    env = {f"MLSERVER_{k.upper()}_PORT": str(v) for k, v in ports.items()}
    env |= {"MLSERVER_MODEL_NAME": "churn", "MLSERVER_MODEL_URI": "/mnt/models", "MLSERVER_METRICS_DIR": "/tmp/m"}
    with container(name, env, ports, model=model) as running:
        return running.wait_ready("/v2/health/ready", seconds=600)


def local_ready(runtime: str, model: Path, work: Path) -> float | None:
    """The same entrypoint as a local process (`ml-serving serve`), model from the same folder."""
    cli = str(Path(sys.executable).parent / "ml-serving")
    port = processes.free_port()
    command = [cli, "serve", str(model), "--name", "churn", "--http-port", str(port)]
    if runtime == "bentoml":
        from ml_serving.cli import UsageError, bentoml_python

        try:
            bentoml_python()
        except UsageError:
            return None
        command += ["--runtime", "bentoml"]
        path = "/readyz"
    else:
        command += ["--grpc-port", str(processes.free_port()), "--metrics-port", str(processes.free_port())]
        path = "/v2/health/ready"
    log = work / f"local-{runtime}.log"
    with processes.running(command, log, env={"TMPDIR": str(work)}) as process:
        return processes.wait_for(f"http://127.0.0.1:{port}{path}", process, log, seconds=600)


def main(runtimes: list[str], cold: bool) -> None:
    engine = containers.start_engine()
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    try:
        model = seeded_model(work)
        environment = image.read_environment(model)
        results = []
        for runtime in runtimes:
            context = image.build_context(environment, runtime=runtime)
            path = image.write_context(context, work / f"ctx-{runtime}", with_model=False)
            name = f"ml-serving-bench/{runtime}:{context.tag}"
            containers.ensure_base_image(containers.base_images((path / "Dockerfile").read_text())[0])
            cold_s, cached = build_times(path, name, cold)
            in_container = [container_ready(name, runtime, model) for _ in range(ROUNDS)]
            local = [local_ready(runtime, model, work) for _ in range(ROUNDS)]
            row = {
                "runtime": runtime,
                "size_mb": round(size_mb(name)),
                "build_cold_s": round(cold_s, 1) if cold_s is not None else None,
                "build_cached_s": round(cached, 1),
                "container_ready_median_s": round(statistics.median(in_container), 1),
                "container_ready_s": [round(s, 1) for s in in_container],
                "local_ready_median_s": round(statistics.median(local), 1) if None not in local else None,
                "local_ready_s": [round(s, 1) for s in local if s is not None],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
        print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
        print("| runtime | image MB | build cold s | build cached s | container -> ready s | process -> ready s |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in results:
            print(
                f"| {r['runtime']} | {r['size_mb']} | {r['build_cold_s']} | {r['build_cached_s']} "
                f"| {r['container_ready_median_s']} | {r['local_ready_median_s']} |"
            )
    finally:
        engine.stop()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--skip-cold"]
    main(args or ["mlserver", "bentoml"], cold="--skip-cold" not in sys.argv)
