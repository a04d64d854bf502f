"""CPU time per V2 request through the front, in one process and without sockets: the front (front.Front), MLServer's
data plane, adaptive batching and the model, driven by `--clients` concurrent callers of the ASGI app.

Process CPU time per request changes far less with a busy machine than requests per second do, so two versions of
the front compare within a few per cent even while other work runs. Run (this checkout, or another's files):

    .venv/bin/python bench/front_cpu.py MODEL_DIR [--requests 6000] [--clients 32] [--project FOLDER]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from bench.serving import v2_body  # noqa: E402

BODY = v2_body(1).encode()
SCOPE = {
    "type": "http",
    "method": "POST",
    "path": "/v2/models/churn/infer",
    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
}


async def drive(front, requests: int, clients: int) -> tuple[float, float]:
    """CPU and wall seconds for `requests` V2 requests sent by `clients` callers, each waiting for its answer."""
    statuses: list[int] = []

    async def receive():
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def client(count: int) -> None:
        for _ in range(count):

            async def send(message, statuses=statuses):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await front(dict(SCOPE), receive, send)

    await asyncio.gather(*(client(20) for _ in range(clients)))  # warm up
    statuses.clear()
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(requests // clients) for _ in range(clients)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if set(statuses) != {200}:
        raise SystemExit(f"answers other than 200: {sorted(set(statuses))}")
    return cpu / len(statuses), wall / len(statuses)


async def main(model_dir: Path, requests: int, clients: int) -> None:
    from mlflow.models import Model
    from mlserver.batching import load_batching
    from mlserver.handlers import DataPlane
    from mlserver.registry import MultiModelRegistry

    from ml_serving.server import mlserver_compat as compat
    from ml_serving.server.__main__ import load_limits, model_settings, server_settings, settings_dir
    from ml_serving.server.batching import BatchGate
    from ml_serving.server.front import Front
    from ml_serving.server.validation import model_inputs

    folder = settings_dir()
    settings = server_settings(folder)
    settings.parallel_workers = 0
    model = model_settings(folder, model_dir, "churn", None)
    gate = BatchGate(lambda: clients)  # every caller is an open connection

    async def gated(loaded):
        compat.close_batches_early(loaded, gate)
        return loaded

    registry = MultiModelRegistry(on_model_load=[load_batching, gated])
    data_plane = DataPlane(settings=settings, model_registry=registry)
    await registry.load(model)
    inputs = model_inputs(Model.load(str(model_dir)).signature)
    front = Front("churn", None, inputs, load_limits(folder), data_plane, None, gate)
    cpu, wall = await drive(front, requests, clients)
    print(f"front: {sys.modules[Front.__module__].__file__}")
    print(f"{requests} requests, {clients} clients: CPU {1e6 * cpu:.0f} us/request, wall {1e6 * wall:.0f} us/request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--project", type=Path, help="import ml_serving from this folder (default: this checkout)")
    args = parser.parse_args()
    sys.path.insert(0, str(args.project or PROJECT_DIR))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.model, args.requests, args.clients))
