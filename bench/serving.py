"""The serving image's server against stock MLServer and `mlflow models serve`, side by side, on the same model.

For each round (servers alternate, so drift hits both alike) and each path (V2 infer, /invocations), `wrk`
sends 1-row and 64-row requests at 8 and 32 connections for a fixed duration. Also printed: the in-process
pyfunc `predict` rate (1 and 32 rows) as the ceiling, and cold start (process start → ready) with the model
baked into the context vs downloaded from the registry. Run (needs Debian's `wrk`):

    .venv/bin/python bench/serving.py [--duration 10] [--rounds 3] [--workers 2] [--before 3027f86]

`--before REF` also runs this project's server as it was at git commit REF (a worktree of it, same model and
settings), e.g. 3027f86, the server issue #15 measured as "today's figure".

`--bentoml` runs instead the runtimes side by side (issue 27): the MLServer runtime, the BentoML runtime
(`ml-serving serve --runtime bentoml`) and stock BentoML (`bentoml serve` of bench/stock_bento.py: the same model,
workers and batch size, BentoML's default latency budget), 1-row requests at 8 and 32 connections, non-2xx counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from tests import processes  # noqa: E402

ROW = {"tenure_months": 3, "monthly_charges": 99.5, "support_calls": 4, "plan": "basic", "region": "north"}
TYPES = {
    "tenure_months": "INT64",
    "monthly_charges": "FP64",
    "support_calls": "INT64",
    "plan": "BYTES",
    "region": "BYTES",
}


def rows(count: int) -> list[dict]:
    return [{**ROW, "tenure_months": 1 + i % 70, "plan": ["basic", "standard", "premium"][i % 3]} for i in range(count)]


def invocations_body(count: int) -> str:
    return json.dumps({"dataframe_records": rows(count)})


def v2_body(count: int) -> str:
    data = rows(count)
    inputs = [{"name": c, "datatype": t, "shape": [count, 1], "data": [r[c] for r in data]} for c, t in TYPES.items()]
    return json.dumps({"inputs": inputs})


def wrk(url: str, body: str, connections: int, duration: int, workdir: Path) -> dict:
    script = workdir / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [[{body}]]\n')
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": _ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),
        "p99_ms": _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),
        "errors": int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0,
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def start_ours(model: Path, workers: int, workdir: Path, env_extra: dict | None = None, project: Path = PROJECT_DIR):
    http, grpc_port, metrics = processes.free_port(), processes.free_port(), processes.free_port()
    env = {
        "MLSERVER_HTTP_PORT": str(http), "MLSERVER_GRPC_PORT": str(grpc_port), "MLSERVER_METRICS_PORT": str(metrics),
        "MLSERVER_PARALLEL_WORKERS": str(workers), "MLSERVER_METRICS_DIR": str(workdir / f"metrics-{http}"),
        "MLSERVER_MODEL_NAME": "churn", **(env_extra or {}),
    }  # fmt: skip
    command = [sys.executable, "-m", "ml_serving.server", str(model)]
    return processes.running(command, workdir / f"ours-{http}.log", env=env, cwd=project), http


def tree_cpu_seconds(root: int) -> float:
    """User plus system CPU of `root` and every live descendant (BentoML's workers are its grandchildren)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # the fields after the name: state, ppid, ..., utime (11), stime (12)
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, (ppid, _) in stats.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(stats[pid][1] for pid in tree if pid in stats)


def checkout(ref: str, workdir: Path) -> Path:
    """This repository at commit `ref`, in a worktree of its own (removed with the bench's folder)."""
    folder = workdir / f"before-{ref}"
    subprocess.run(["git", "-C", str(PROJECT_DIR), "worktree", "add", "--detach", "-f", str(folder), ref],
                   check=True, capture_output=True)  # fmt: skip
    return folder


def start_mlflow(model: Path, workers: int, workdir: Path):
    port = processes.free_port()
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
        "-h", "127.0.0.1", "-p", str(port), "-w", str(workers),
    ]  # fmt: skip
    return processes.running(command, workdir / f"mlflow-{port}.log", env=env), port


def start_stock(model: Path, workers: int, workdir: Path):
    """Stock MLServer 1.7.1 with its MLflow runtime, the same workers and adaptive batching as ours (the settings
    files of serving_image/), no validation layer: the baseline issue #15 measures against."""
    settings_dir = PROJECT_DIR / "serving_image"
    folder = workdir / f"stock-{processes.free_port()}"
    folder.mkdir()
    model_settings = json.loads((settings_dir / "model-settings.json").read_text())
    model_settings.update(name="churn", implementation="mlserver_mlflow.MLflowRuntime")
    model_settings.setdefault("parameters", {})["uri"] = str(model)
    (folder / "model-settings.json").write_text(json.dumps(model_settings))
    http, grpc_port, metrics = processes.free_port(), processes.free_port(), processes.free_port()
    server = json.loads((settings_dir / "settings.json").read_text())
    server.update(http_port=http, grpc_port=grpc_port, metrics_port=metrics, parallel_workers=workers,
                  metrics_dir=str(folder / "metrics"))  # fmt: skip
    (folder / "settings.json").write_text(json.dumps(server))
    command = [str(Path(sys.executable).parent / "mlserver"), "start", str(folder)]
    return processes.running(command, workdir / f"stock-{http}.log"), http


def start_bentoml_runtime(model: Path, workers: int, workdir: Path):
    """This project's BentoML runtime, as `ml-serving serve --runtime bentoml` starts it."""
    port = processes.free_port()
    cli = str(Path(sys.executable).parent / "ml-serving")
    command = [cli, "serve", str(model), "--name", "churn", "--runtime", "bentoml", "--http-port", str(port)]
    env = {"MLSERVER_PARALLEL_WORKERS": str(workers), "TMPDIR": str(workdir)}
    return processes.running(command, workdir / f"bentoml-{port}.log", env=env), port


def start_stock_bentoml(model: Path, workers: int, workdir: Path):
    """Stock BentoML (bench/stock_bento.py) with the same workers and batch size as the runtimes."""
    from ml_serving.cli import bentoml_python

    port = processes.free_port()
    batch = json.loads((PROJECT_DIR / "serving_image" / "model-settings.json").read_text())["max_batch_size"]
    env = {"BENCH_MODEL": str(model), "BENCH_WORKERS": str(workers), "BENCH_MAX_BATCH_SIZE": str(batch),
           "BENTOML_HOME": str(workdir / "bentoml-home")}  # fmt: skip
    command = [bentoml_python(), "-m", "bentoml", "serve", "stock_bento:Stock", "--host", "127.0.0.1", "--port",
               str(port), "--working-dir", str(Path(__file__).parent)]  # fmt: skip
    return processes.running(command, workdir / f"stock-bentoml-{port}.log", env=env), port


def compare_runtimes(model_dir: Path, workers: int, duration: int, workdir: Path) -> None:
    """The MLServer runtime, the BentoML runtime and stock BentoML on 1-row requests at 8 and 32 connections."""
    ours = [("v2", v2_body(1)), ("invocations", invocations_body(1))]
    targets = {
        "mlserver runtime": (start_ours, "/v2/health/ready", ours),
        "bentoml runtime": (start_bentoml_runtime, "/readyz", ours),
        "stock bentoml": (start_stock_bentoml, "/readyz", [("predict", json.dumps({"rows": rows(1)}))]),
    }
    routes = {"v2": "/v2/models/churn/infer", "invocations": "/invocations", "predict": "/predict"}
    print(f"\n{'server':<17} {'path':<12} {'conns':>5} | {'req/s':>7} {'p50':>8} {'p99':>9} | non-2xx")
    for server, (start, ready, bodies) in targets.items():
        context, port = start(model_dir, workers, workdir)
        with context as process:
            processes.wait_for(f"http://127.0.0.1:{port}{ready}", process, workdir / "start.log", 300)
            for path, body in bodies:
                url = f"http://127.0.0.1:{port}{routes[path]}"
                for conns in (8, 32):
                    wrk(url, body, conns, 2, workdir)  # warm up
                    r = wrk(url, body, conns, duration, workdir)
                    print(f"{server:<17} {path:<12} {conns:>5} | {r['rps']:>7.0f} {r['p50_ms']:>6.1f}ms "
                          f"{r['p99_ms']:>7.1f}ms | {r['errors']}")  # fmt: skip


def in_process_rate(model: Path) -> dict[int, float]:
    import pandas as pd
    from mlflow.pyfunc import load_model

    loaded = load_model(str(model))
    rates = {}
    for count in (1, 32):
        frame = pd.DataFrame(rows(count))
        loaded.predict(frame)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < 2:
            loaded.predict(frame)
            calls += 1
        rates[count] = calls / (time.perf_counter() - started)
    return rates


def cold_start(model_uri: str, model_dir: Path, workdir: Path) -> dict[str, float]:
    """Process start → ready: the model already in the folder (baked) vs fetched from the registry first."""
    results = {}
    for label, model in (("baked", str(model_dir)), ("downloaded", model_uri)):
        started = time.monotonic()
        env = {"TMPDIR": str(workdir / f"tmp-{label}")}
        Path(env["TMPDIR"]).mkdir(exist_ok=True)
        context, http = start_ours(model, 2, workdir, env)  # type: ignore[arg-type]
        with context as process:
            processes.wait_for(f"http://127.0.0.1:{http}/v2/health/ready", process, workdir / "cold.log", 300)
            results[label] = time.monotonic() - started
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--before", metavar="REF", help="also run this project's server as of git commit REF")
    parser.add_argument("--bentoml", action="store_true", help="only the runtimes side by side, with stock BentoML")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("error: wrk not found: apt-get install -y wrk")

    from mlflow.tracking import MlflowClient

    from ml_serving.seed import register_churn_model

    workdir = Path(tempfile.mkdtemp(prefix="ml-serving-bench-"))
    uri = f"sqlite:///{workdir / 'registry.db'}"
    version = register_churn_model(uri, aliases=("champion",))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    model_dir = Path(client.get_model_version_download_uri("churn-classifier", version).removeprefix("file://"))
    os.environ["MLFLOW_TRACKING_URI"] = uri

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"model: churn-classifier v{version} (sklearn pipeline, numeric + string columns); {args.workers} workers")
    rates = in_process_rate(model_dir)
    print(f"in-process predict: 1 row {rates[1]:.0f} calls/s, 32 rows {rates[32]:.0f} calls/s", end=" ")
    print(f"({32 * rates[32]:.0f} rows/s)")
    if args.bentoml:
        compare_runtimes(model_dir, args.workers, args.duration, workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        return

    cases = [(path, rows_, conns) for path in ("v2", "invocations") for rows_ in (1, 64) for conns in (8, 32)]
    results: dict[tuple, list] = {}
    servers = {"ours": start_ours, "stock": start_stock, "mlflow": start_mlflow}
    ready = {"ours": "/v2/health/ready", "stock": "/v2/health/ready", "mlflow": "/ping", "before": "/v2/health/ready"}
    if args.before:
        before = checkout(args.before, workdir)
        servers["before"] = lambda model, workers, folder: start_ours(model, workers, folder, project=before)
    for round_ in range(args.rounds):
        order = list(servers) if round_ % 2 == 0 else list(reversed(servers))  # drift hits every server alike
        for server in order:
            context, port = servers[server](model_dir, args.workers, workdir)
            with context as process:
                processes.wait_for(f"http://127.0.0.1:{port}{ready[server]}", process, workdir / "start.log", 300)
                for path, count, conns in cases:
                    if server == "mlflow" and path == "v2":
                        continue
                    url = f"http://127.0.0.1:{port}" + ("/v2/models/churn/infer" if path == "v2" else "/invocations")
                    body = v2_body(count) if path == "v2" else invocations_body(count)
                    wrk(url, body, conns, 2, workdir)  # warm up
                    results.setdefault((server, path, count, conns), []).append(
                        wrk(url, body, conns, args.duration, workdir)
                    )

    def cell(result: dict) -> str:
        return f"{result['rps']:>7.0f} {result['p99_ms']:>7.1f}ms"

    header = [
        f"{'path':<12} {'rows':>4} {'conns':>5}",
        f"{'ours req/s':>10} {'p99':>9}",
        f"{'stock MLServer':>14} {'p99':>9}",
        f"{'mlflow serve':>12} {'p99':>9}",
        f"{'vs stock':>8} {'vs mlflow':>9}",
    ]
    print("\n" + " | ".join(header))
    for path, count, conns in cases:
        ours = _median(results[("ours", path, count, conns)])
        stock = _median(results[("stock", path, count, conns)])
        base = _median(results[("mlflow", "invocations", count, conns)])
        errors = f"  ({ours['errors']} non-2xx)" if ours["errors"] else ""
        print(f"{path:<12} {count:>4} {conns:>5} | {cell(ours):>20} | {cell(stock):>24} | {cell(base):>22} | "
              f"{ours['rps'] / stock['rps']:>7.2f}x {ours['rps'] / base['rps']:>8.2f}x{errors}")  # fmt: skip
    if args.before:
        print(f"\nthis server as of {args.before}, same runs: path rows conns | req/s p99 | now vs then")
        for path, count, conns in cases:
            then = _median(results[("before", path, count, conns)])
            ours = _median(results[("ours", path, count, conns)])
            print(f"{path:<12} {count:>4} {conns:>5} | {cell(then):>20} | {ours['rps'] / then['rps']:>7.2f}x")
    print("(mlflow models serve has no V2 route: V2 rows compare with its /invocations at the same load; stock "
          "MLServer serves /invocations outside its batching, as it ships)")  # fmt: skip
    cold = cold_start(f"models:/churn-classifier/{version}", model_dir, workdir)
    print(
        f"\ncold start to ready: baked {cold['baked']:.1f} s, downloaded from the registry {cold['downloaded']:.1f} s"
    )
    if args.before:
        subprocess.run(["git", "-C", str(PROJECT_DIR), "worktree", "remove", "--force", str(before)], check=False)
    shutil.rmtree(workdir, ignore_errors=True)


def _median(samples: list[dict]) -> dict:
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


if __name__ == "__main__":
    main()
