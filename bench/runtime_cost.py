"""One request at a time, the two runtimes side by side: what each costs a request, in CPU seconds and latency.

The runtime canary judges BentoML's p95 against MLServer's on a busy machine, where a request's latency is mostly
its CPU work times the machine's contention: the CPU a request costs each server is the figure that decides the
ratio, and it is measurable on a busy machine (a process group's CPU time, from /proc), unlike wall-clock latency.
The two servers get requests in alternation (the same contention for both), the model is the canary's own.

    .venv/bin/python bench/runtime_cost.py [--requests 400]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serving import tree_cpu_seconds
from tests import processes
from tests.test_rollout_e2e import ROW, flaky_model

CLI = shutil.which("ml-serving") or str(Path(sys.executable).parent / "ml-serving")


def histogram(text: str, name: str, path_label: str, path: str) -> dict[float, float]:
    """Cumulative bucket counts of `name` for `path`, summed over the other labels."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{") and f'{path_label}="{path}"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets[float(le)] = buckets.get(float(le), 0) + float(line.rsplit(" ", 1)[1])
    return buckets


def quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over the increase between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0) for b in bounds]
    rank, lower, below = q * counts[-1], 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return float("nan")


@contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """`count` processes spinning on the CPU meanwhile: the contention of a busy machine, on demand."""
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--nice", type=int, default=0, help="run both servers at this niceness: busy-machine waits")
    parser.add_argument(
        "--burners",
        type=int,
        default=0,
        help="busy loops beside the servers while measuring (run inside a CPU-limited cgroup)",
    )
    parser.add_argument("--bentoml-env", action="append", default=[], help="K=V for the BentoML server only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="runtime-cost-"))
    model = str(flaky_model(work / "flaky"))
    http, grpc_port, metrics_port, bento = (processes.free_port() for _ in range(4))
    env = {"TMPDIR": str(work), "MLSERVER_PARALLEL_WORKERS": "1"}
    commands = {
        "mlserver": [CLI, "serve", model, "--name", "churn", "--http-port", str(http), "--grpc-port", str(grpc_port),
                     "--metrics-port", str(metrics_port)],
        "bentoml": [CLI, "serve", model, "--name", "churn", "--runtime", "bentoml", "--http-port", str(bento)],
    }  # fmt: skip
    if args.nice:
        commands = {runtime: ["nice", "-n", str(args.nice), *command] for runtime, command in commands.items()}
    urls = {"mlserver": f"http://127.0.0.1:{http}", "bentoml": f"http://127.0.0.1:{bento}"}
    scrape = {"mlserver": f"http://127.0.0.1:{metrics_port}/metrics", "bentoml": urls["bentoml"] + "/metrics"}
    series = {"mlserver": ("rest_server_request_duration_seconds", "path"),
              "bentoml": ("bentoml_service_request_duration_seconds", "endpoint")}  # fmt: skip
    with (
        processes.running(commands["mlserver"], work / "mlserver.log", env=env) as mlserver,
        processes.running(
            commands["bentoml"], work / "bentoml.log", env={**env, **dict(kv.split("=", 1) for kv in args.bentoml_env)}
        ) as bentoml,
    ):
        started = {"mlserver": mlserver, "bentoml": bentoml}
        processes.wait_for(urls["mlserver"] + "/v2/health/ready", mlserver, work / "mlserver.log", 180)
        processes.wait_for(urls["bentoml"] + "/readyz", bentoml, work / "bentoml.log", 180)
        sessions = {runtime: requests.Session() for runtime in urls}
        for _ in range(50):
            for runtime, session in sessions.items():
                session.post(urls[runtime] + "/invocations", json={"dataframe_records": [ROW]}, timeout=30)
        time.sleep(2)  # BentoML's idle workers settle
        with busy_loops(args.burners):
            cpu = {runtime: tree_cpu_seconds(process.pid) for runtime, process in started.items()}
            before = {r: histogram(requests.get(scrape[r], timeout=10).text, *series[r], "/invocations") for r in urls}
            latency: dict[str, list[float]] = {runtime: [] for runtime in urls}
            for _ in range(args.requests):
                for runtime, session in sessions.items():
                    began = time.perf_counter()
                    answer = session.post(urls[runtime] + "/invocations", json={"dataframe_records": [ROW]}, timeout=30)
                    latency[runtime].append(time.perf_counter() - began)
                    assert answer.status_code == 200, answer.text
            cpu = {runtime: tree_cpu_seconds(process.pid) - cpu[runtime] for runtime, process in started.items()}
            after = {r: histogram(requests.get(scrape[r], timeout=10).text, *series[r], "/invocations") for r in urls}
    print(f"{args.requests} requests each, alternating, load average {os.getloadavg()[0]:.1f}")
    for runtime in urls:
        values = sorted(latency[runtime])
        print(f"{runtime:9} CPU {1000 * cpu[runtime] / args.requests:6.2f} ms/request; client p50 "
              f"{1000 * statistics.median(values):6.2f} ms p95 {1000 * values[int(0.95 * len(values))]:6.2f} ms; "
              f"server p50 {1000 * quantile(0.5, before[runtime], after[runtime]):6.2f} ms p95 "
              f"{1000 * quantile(0.95, before[runtime], after[runtime]):6.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
