"""`parallel_workers: N` runs N complete servers on one port (ml_serving/server/replicas.py): each answers, their
metrics are served summed, and the container lives and dies as one."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict

from ml_serving import metrics
from tests import processes

pytestmark = pytest.mark.serving

FRAME = pd.DataFrame({"tenure": [1.0, 20.0, 3.0, 40.0], "calls": [5.0, 0.0, 4.0, 1.0]})
INFER_SUCCESS = metrics.INFER_SUCCESS  # model_infer_request_success_total, named once in ml_serving.metrics


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    folder = tmp_path_factory.mktemp("replicas") / "model"
    model = LogisticRegression().fit(FRAME, [1, 0, 1, 0])
    signature = infer_signature(FRAME, model.predict(FRAME))
    mlflow.sklearn.save_model(model, folder, signature=signature, pip_requirements=["mlflow", "scikit-learn"])
    return folder


@contextmanager
def replicated(model_dir: Path, workdir: Path, count: int = 2):
    ports = {kind: processes.free_port() for kind in ("http", "grpc", "metrics")}
    env = {
        "MLSERVER_HTTP_PORT": str(ports["http"]), "MLSERVER_GRPC_PORT": str(ports["grpc"]),
        "MLSERVER_METRICS_PORT": str(ports["metrics"]), "MLSERVER_PARALLEL_WORKERS": str(count),
        "MLSERVER_METRICS_DIR": str(workdir / "metrics"), "MLSERVER_MODEL_NAME": "m",
    }  # fmt: skip
    log = workdir / "server.log"
    with processes.running([sys.executable, "-m", "ml_serving.server", str(model_dir)], log, env=env) as process:
        processes.wait_for(f"http://127.0.0.1:{ports['http']}/v2/health/ready", process, log)
        yield process, ports, log


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def successes_by_process(metrics_dir: Path) -> dict[int, float]:
    """Each replica's own count, read from its file in the shared multiprocess folder."""
    counts: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            if f'"{INFER_SUCCESS}"' in key:
                counts[pid] = counts.get(pid, 0) + value
    return counts


def predict(url: str) -> int:
    """One request on a connection of its own, so that any replica may take it."""
    body = {"dataframe_split": {"columns": list(FRAME.columns), "data": FRAME.to_numpy().tolist()}}
    return requests.post(url + "/invocations", json=body, timeout=30, headers={"Connection": "close"}).status_code


def test_replicas_share_one_port_and_replica_0_serves_their_metrics_summed(model_dir, tmp_path):
    with replicated(model_dir, tmp_path) as (process, ports, _log):
        replicas = children(process.pid)
        assert len(replicas) == 2
        url = f"http://127.0.0.1:{ports['http']}"
        sent, deadline = 0, time.monotonic() + 120
        with ThreadPoolExecutor(8) as pool:
            while set(successes_by_process(tmp_path / "metrics")) != replicas:
                assert time.monotonic() < deadline, (
                    f"not every replica answered: {successes_by_process(tmp_path / 'metrics')}"
                )
                assert set(pool.map(predict, [url] * 16)) == {200}
                sent += 16
        scraped = requests.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).text
        line = next(x for x in scraped.splitlines() if x.startswith(f'{INFER_SUCCESS}{{model="m"'))
        assert float(line.rpartition(" ")[2]) == sent


def test_a_replica_that_dies_stops_the_others_and_the_server_fails(model_dir, tmp_path):
    with replicated(model_dir, tmp_path) as (process, _ports, log):
        first, second = sorted(children(process.pid))
        os.kill(first, signal.SIGKILL)
        assert process.wait(timeout=60) != 0
        assert "stopping the others" in log.read_text()
        assert gone(second)


def test_sigterm_drains_every_replica_and_exits_0(model_dir, tmp_path):
    with replicated(model_dir, tmp_path) as (process, _ports, _log):
        replicas = children(process.pid)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert all(gone(pid) for pid in replicas)


def gone(pid: int, seconds: float = 30) -> bool:
    """Whether `pid` is gone (exited and reaped by its parent) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False
