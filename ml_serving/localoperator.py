"""The real Seldon Core v1 operator beside the local API server, set up as its Helm chart sets it up.

`./run tools` builds the operator from the vendored source; its settings come from `helm template` of the pinned
chart with the stack's own chart values (`specs.platform.seldon_operator`): the manager container's environment
and the `seldon-config` ConfigMap. The operator runs as a local process against the API server (no pod, no
webhook registration: its webhook server listens on a free port with a self-signed certificate only because
controller-runtime will not start without one) and is stopped by its PID.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ml_serving.localcluster import ClusterError
from ml_serving.processes import LoggedProcess, free_port, http_ok
from ml_serving.specs.platform import HelmChart

OPERATOR_BINARY = "seldon-operator"
# The pinned charts the team keeps beside the checkout (../shared/charts), or where ML_SERVING_CHARTS says.
CHARTS_ARCHIVE = Path(
    os.environ.get("ML_SERVING_CHARTS")
    or Path(__file__).resolve().parents[2] / "shared" / "charts" / "helm-charts.tar.gz"
)
CONFIG_MAP = "seldon-config"
MANAGER_DEPLOYMENT = "seldon-controller-manager"


def operator_ready(bin_dir: Path) -> str | None:
    """None when the operator and helm are built and the charts are there, else what is missing and the fix."""
    missing = [name for name in (OPERATOR_BINARY, "helm") if not (bin_dir / name).exists()]
    if missing:
        return f"{', '.join(missing)} not built in {bin_dir}: run `./run tools`"
    if not CHARTS_ARCHIVE.exists():
        return f"no pinned charts at {CHARTS_ARCHIVE}: set ML_SERVING_CHARTS to helm-charts.tar.gz"
    return None


def render_chart(bin_dir: Path, chart: HelmChart, work: Path) -> list[dict[str, Any]]:
    """`helm template` of the pinned chart with `chart.values`: what the stack's install would apply."""
    charts = work / "charts"
    if not (charts / f"{chart.chart}-{chart.version}").exists():
        charts.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-C", str(charts), "-xzf", str(CHARTS_ARCHIVE)], check=True, capture_output=True)
    values = work / f"{chart.release}-values.yaml"
    values.write_text(yaml.safe_dump(chart.values))
    done = subprocess.run(
        [str(bin_dir / "helm"), "template", chart.release, str(charts / f"{chart.chart}-{chart.version}"),
         "--namespace", chart.namespace, "--values", str(values)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise ClusterError(f"helm template {chart.chart} {chart.version} failed:\n{done.stderr[-3000:]}")
    return [o for o in yaml.safe_load_all(done.stdout) if o]


def manager_settings(objects: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, Any]]:
    """The manager container's literal environment and the `seldon-config` ConfigMap, from the chart's output."""
    (deployment,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == MANAGER_DEPLOYMENT]
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "manager"]
    env = {e["name"]: str(e.get("value", "")) for e in container.get("env", []) if "valueFrom" not in e}
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == CONFIG_MAP]
    return env, config


def _self_signed(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=seldon-webhook-service", "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.crt")],
        check=True, capture_output=True,
    )  # fmt: skip


@dataclass
class LocalOperator(LoggedProcess):
    """The operator process for one API server (`kubeconfig`), configured by `chart` (its values and namespace)."""

    bin_dir: Path
    kubeconfig: Path
    chart: HelmChart
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ml-serving-operator-")))
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    config_map: dict[str, Any] = field(default_factory=dict)  # the chart's `seldon-config`, as applied
    error = ClusterError

    @property
    def log(self) -> Path:
        return self.root / "seldon-operator.log"

    def start(self, api_client: Any, seconds: float = 120) -> LocalOperator:
        """Apply the chart's ConfigMap in its namespace, start the operator and wait until it serves metrics."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        problem = operator_ready(self.bin_dir)
        if problem:
            raise ClusterError(problem)
        env, config = manager_settings(render_chart(self.bin_dir, self.chart, self.root))
        self.config_map = config
        core = client.CoreV1Api(api_client)
        for body, create in (
            ({"metadata": {"name": self.chart.namespace}}, core.create_namespace),
            (config, lambda body: core.create_namespaced_config_map(self.chart.namespace, body)),
        ):
            try:
                create(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
        # controller-runtime reads its webhook certificate from $TMPDIR/k8s-webhook-server/serving-certs.
        _self_signed(self.root / "k8s-webhook-server" / "serving-certs")
        metrics = free_port()
        self.env = {**env, "POD_NAMESPACE": self.chart.namespace}
        process_env = {**os.environ, **self.env, "TMPDIR": str(self.root), "KUBECONFIG": str(self.kubeconfig)}
        self.spawn(
            [str(self.bin_dir / OPERATOR_BINARY), f"--webhook-port={free_port()}",
             f"--metrics-addr=127.0.0.1:{metrics}", f"--operator-namespace={self.chart.namespace}",
             "--create-resources=false", f"--log-level={env.get('MANAGER_LOG_LEVEL') or 'INFO'}"],
            "seldon-operator", lambda: http_ok(f"http://127.0.0.1:{metrics}/metrics"), seconds, env=process_env,
        )  # fmt: skip
        return self


def wait_for(found: Any, what: str, seconds: float = 60, log: Path | None = None) -> Any:
    """Poll `found()` until it returns something truthy; fail naming `what` (and the operator's log tail)."""
    deadline = time.monotonic() + seconds
    while True:
        value = found()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise ClusterError(f"{what}: not there after {seconds:.0f} s\n{tail}")
        time.sleep(0.2)
