"""A/B probe of the serving front: this checkout's server against other versions of it (and stock MLServer), on V2
1-row requests at 32 connections, the servers alternating so that a busy machine's drift hits each alike.

Every server is started once and kept running; each round runs `wrk -t1 -c32 -d<duration>s` on each in turn.
Compare figures only within one run. Run (needs Debian's `wrk`):

    .venv/bin/python bench/ab_front.py [--rounds 4] [--duration 5] [--workers 2] [--before REF ...] [--stock]
        [--tree NAME=FOLDER ...]

`--before REF` runs the server as of git commit REF (a git worktree of it); `--tree NAME=FOLDER` a server
from any folder holding `ml_serving/` (e.g. a variant being tried).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from bench.serving import checkout, start_ours, start_stock, tree_cpu_seconds, v2_body, wrk  # noqa: E402
from tests import processes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--before", action="append", default=[], metavar="REF")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--stock", action="store_true", help="also stock MLServer 1.7.1")
    parser.add_argument("--model", type=Path, help="an MLflow model folder (default: the churn model, trained)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ml-serving-ab-"))
    model = args.model
    if model is None:
        from mlflow.tracking import MlflowClient

        from ml_serving.seed import register_churn_model

        uri = f"sqlite:///{workdir / 'registry.db'}"
        version = register_churn_model(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        model = Path(client.get_model_version_download_uri("churn-classifier", version).removeprefix("file://"))
    projects = {"ours": PROJECT_DIR}
    projects.update({ref: checkout(ref, workdir) for ref in args.before})
    projects.update(dict(tree.split("=", 1) for tree in args.tree))
    body = v2_body(1)
    ports: dict[str, str] = {}
    sessions: dict[str, int] = {}
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        for name, project in projects.items():
            context, port = start_ours(model, args.workers, workdir, project=Path(project))
            process = stack.enter_context(context)
            processes.wait_for(f"http://127.0.0.1:{port}/v2/health/ready", process, workdir / "start.log", 300)
            ports[name] = f"http://127.0.0.1:{port}/v2/models/churn/infer"
            sessions[name] = process.pid
        if args.stock:
            context, port = start_stock(model, args.workers, workdir)
            process = stack.enter_context(context)
            processes.wait_for(f"http://127.0.0.1:{port}/v2/health/ready", process, workdir / "start.log", 300)
            ports["stock"] = f"http://127.0.0.1:{port}/v2/models/churn/infer"
            sessions["stock"] = process.pid
        for url in ports.values():
            wrk(url, body, args.connections, 2, workdir)  # warm up
        results: dict[str, list[float]] = {name: [] for name in ports}
        cpu: dict[str, list[float]] = {name: [] for name in ports}
        for round_ in range(args.rounds):
            order = list(ports) if round_ % 2 == 0 else list(reversed(ports))
            for name in order:
                before = tree_cpu_seconds(sessions[name])
                result = wrk(ports[name], body, args.connections, args.duration, workdir)
                used = tree_cpu_seconds(sessions[name]) - before
                cpu[name].append(1000 * used / (result["rps"] * args.duration))
                if result["errors"]:
                    raise SystemExit(f"{name}: {result['errors']} non-2xx answers")
                results[name].append(result["rps"])
            line = ", ".join(f"{n} {results[n][-1]:.0f} ({cpu[n][-1]:.2f} ms)" for n in ports)
            print(f"round {round_ + 1}: req/s (CPU ms per request) {line}", flush=True)
    first = next(iter(ports))
    print(f"V2 1 row, {args.connections} connections, {args.workers} workers, medians of {args.rounds} rounds:")
    for name, samples in results.items():
        median = statistics.median(samples)
        ratio = median / statistics.median(results[first])
        ms = statistics.median(cpu[name])
        print(f"  {name:12s} {median:7.0f} req/s {ratio:5.2f}x {first}   CPU {ms:.3f} ms/request   {samples}")


if __name__ == "__main__":
    main()
