"""The README's command for a newcomer, run as written (marker `pods`): `ml-serving cluster --node --up` brings up
the one-machine cluster, serves dev's registry over S3, `up`s dev from pods, prints each predictor's URL, and the
URL answers the model's prediction; SIGTERM then stops everything it started."""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests

from ml_serving.clustercli import REGISTRY_FOLDER
from ml_serving.devserve import copy_project
from ml_serving.stackfile import edit, stack_file
from tests.conftest import LocalRegistry
from tests.node_fixtures import node_bin_dir
from tests.test_engine import PASSPHRASE
from tests.test_serving import ROWS

pytestmark = pytest.mark.pods

CLUSTER_LINE = re.compile(r"export KUBECONFIG=(?P<root>/\S+ml-serving-cluster-[^/\s]+)/kubeconfig")
NODE_LINE = re.compile(r"logs in (?P<root>/\S+ml-serving-node-[^\s)]+)")
REGISTRY_LINE = re.compile(r"OCI registry on (?P<address>127\.0\.0\.1:\d+)")
URL_LINE = re.compile(r"^(?P<sdep>[\w-]+)/(?P<predictor>[\w-]+) answers on (?P<url>http://[\d.]+:\d+):")


def lines_of(process: subprocess.Popen, into: queue.Queue) -> None:
    for line in process.stdout:
        into.put(line)
    into.put(None)


def test_cluster_up_serves_the_dev_model_from_pods_and_stops_cleanly(
    tools: Path, registry: LocalRegistry, tmp_path: Path
) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.tracking import MlflowClient

    node_bin_dir()  # fails (under ML_SERVING_REQUIRE_ENGINE) or skips, naming what a node lacks
    project = copy_project(Path(__file__).resolve().parents[1], tmp_path / "project")
    edit(
        stack_file(project, "dev"),
        lambda d: d["config"]["ml-serving:registry"].update(trackingUri=registry.tracking_uri),
    )
    env = {**os.environ, "PULUMI_CONFIG_PASSPHRASE": PASSPHRASE, "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "ml_serving.cli", "--project-dir", str(project), "cluster", "--node", "--up"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lines_of, args=(process, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline, url = time.monotonic() + 1200, None
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=5)
            except queue.Empty:
                continue
            assert line is not None, "the command ended early:\n" + "".join(seen[-60:])
            seen.append(line)
            found = URL_LINE.match(line.strip())
            url = found["url"] if found and found["predictor"] == "champion" else None
        assert url, "no predictor URL printed:\n" + "".join(seen[-60:])
        assert not any("no Ready model pod" in line for line in seen), "".join(seen[-60:])

        answer = requests.post(f"{url}/invocations", json={"dataframe_records": ROWS}, timeout=30)
        assert answer.status_code == 200, answer.text
        client = MlflowClient(registry.tracking_uri, registry_uri=registry.tracking_uri)
        version = client.get_model_version_by_alias("churn-classifier", "champion").version
        model = mlflow.pyfunc.load_model(client.get_model_version_download_uri("churn-classifier", version))
        assert answer.json()["predictions"] == [int(x) for x in model.predict(pd.DataFrame(ROWS))]

        (address,) = {m["address"] for m in map(REGISTRY_LINE.search, seen) if m}
        blob = b"pushed while the cluster ran"  # what a build with `push: true` leaves in the registry
        digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
        upload = requests.post(f"http://{address}/v2/probe/blobs/uploads/", timeout=30)
        assert upload.status_code == 202, upload.text
        location = urljoin(f"http://{address}/", upload.headers["Location"])
        pushed = requests.put(location, params={"digest": digest}, data=blob, timeout=30,
                              headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert pushed.status_code == 201, pushed.text
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the command's own clean-up, as Ctrl-C in a shell
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        reader.join(timeout=30)
        while not lines.empty():
            line = lines.get_nowait()
            seen.extend([line] if line is not None else [])
    assert process.returncode == 0, "".join(seen[-40:])
    (node_root,) = {m["root"] for m in map(NODE_LINE.search, seen) if m}
    assert not processes_under(node_root), "every process the command started is stopped"
    assert not (Path(node_root) / "containerd").exists(), "the node's images are removed (over 1 GB each)"
    (cluster_root,) = {m["root"] for m in map(CLUSTER_LINE.search, seen) if m}
    registry = Path(cluster_root) / REGISTRY_FOLDER
    assert (registry / "registry.log").exists(), "the OCI registry lives in the cluster's folder, not in its own"
    assert (registry / "config.yml").read_text().count(str(registry / "data")) == 1, "it stores its images there"
    assert not (registry / "data").exists(), "the images pushed to it are removed with the cluster"
    for folder in (node_root, cluster_root):
        shutil.rmtree(folder)  # the logs a newcomer reads; a CI machine would keep every run's


def processes_under(folder: str) -> list[str]:
    """Command lines that name `folder` (the node's processes all run from or with paths under it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if folder in line:
                found.append(line)
    return found
