"""prometheus-operator beside the local API server, and the Prometheus it manages running as a pod on the node.

What a cluster's monitoring stack does, here: the operator (built by `./run tools` from Go modules) turns the stack's
PodMonitor and PrometheusRule into Prometheus's configuration (Secret `prometheus-<name>`, rule ConfigMaps) and
a StatefulSet; the node runs that StatefulSet's pod from images made here (Prometheus v3.5.0 and the config
reloader, both built from Go modules by `./run tools`: nothing beyond this machine can be pulled, and Debian's
Prometheus 2.42 is built without the Kubernetes service discovery every PodMonitor's scrape job uses). Prometheus
in its pod reaches the API server through a relay on the node's gateway address (the API server listens on
loopback only), with a service account token whose ClusterRole lets it read pods and endpoints, nothing more.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ml_serving.localcluster import ClusterError, apply_crds
from ml_serving.localnode import LocalNode, ready_pods
from ml_serving.localoperator import CHARTS_ARCHIVE, wait_for
from ml_serving.ociimage import write_image
from ml_serving.processes import LoggedProcess, free_port, http_ok, listening
from ml_serving.settings import Settings

OPERATOR_BINARY = "prometheus-operator"
RELOADER_BINARY = "prometheus-config-reloader"
PROMETHEUS_BINARY = "prometheus"  # built by `tools/build.sh prometheus`
MONITORING_API = "monitoring.coreos.com/v1"
PROMETHEUS_IMAGE = "localhost/ml-serving/prometheus:{version}"
RELOADER_IMAGE = "localhost/ml-serving/prometheus-config-reloader:v0.85.0"  # the operator's own version
PROMETHEUS_NAME = "ml-serving"  # the Prometheus object; the operator names its StatefulSet prometheus-<name>
SERVICE_ACCOUNT = "ml-serving-prometheus"
TOKEN_SECRET = f"{SERVICE_ACCOUNT}-token"
SECRETS_DIR = "/etc/prometheus/secrets"  # where the operator mounts the Secrets a Prometheus's `secrets` names
WEB_PORT = 9090  # Prometheus's port in the operator's pods
# The chart the stack installs in prod carries the operator's CRDs at the operator's version (0.85.0).
CRDS_IN_CHART = "kube-prometheus-stack-77.0.0/charts/crds/crds"
# What Prometheus needs to discover and scrape pods (kube-prometheus-stack's ClusterRole for Prometheus, minus nodes).
DISCOVERY_RULES = [
    {"apiGroups": [""], "resources": ["pods", "services", "endpoints"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
]


def monitoring_missing(bin_dir: Path) -> list[str]:
    """What this machine lacks to run the operator's Prometheus on a node, each with its fix."""
    missing = [
        f"{bin_dir / name}: run `tools/build.sh prometheus_operator` (or `./run tools`)"
        for name in (OPERATOR_BINARY, RELOADER_BINARY, PROMETHEUS_BINARY)
        if not (bin_dir / name).exists()
    ]
    if shutil.which("socat") is None:
        missing.append("`socat` (the relay from the pods to the API server): apt-get install socat")
    if not CHARTS_ARCHIVE.exists():
        missing.append(f"{CHARTS_ARCHIVE}: set ML_SERVING_CHARTS to helm-charts.tar.gz (the operator's CRDs)")
    return missing


def prometheus_version(binary: Path) -> str:
    """`v3.5.0` for `prometheus, version 3.5.0 (...)`: what the operator generates flags and config for."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    found = re.search(r"version (\d+\.\d+\.\d+)", out.stdout + out.stderr)
    if found is None:
        raise ClusterError(f"{binary} --version says no version: {(out.stdout + out.stderr)[:200]}")
    return f"v{found.group(1)}"


def linked_libraries(binary: Path) -> list[Path]:
    """The shared objects `binary` loads (its interpreter included), as `ldd` resolves them on this host."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False).stdout
    found = re.findall(r"(/\S+) \(0x", out)
    return [Path(p) for p in found]


def prometheus_image(folder: Path, name: str, binary: Path) -> Path:
    """Prometheus as an image: the binary at /bin/prometheus (the operator runs the image's entrypoint) and, were it
    linked dynamically, the C library files it loads, at the paths its interpreter looks in."""
    files = {"bin/prometheus": (binary.read_bytes(), 0o755)}
    for library in linked_libraries(binary):
        files[str(library).lstrip("/")] = (library.read_bytes(), 0o755)
    return write_image(folder / "prometheus.tar", name, files, ["/bin/prometheus"], "65534:65534")


def reloader_image(bin_dir: Path, folder: Path, name: str) -> Path:
    """The config reloader (a static Go binary) where upstream's image has it: the operator names its command."""
    binary = (bin_dir / RELOADER_BINARY).read_bytes()
    files = {f"bin/{RELOADER_BINARY}": (binary, 0o755)}
    return write_image(folder / "reloader.tar", name, files, [f"/bin/{RELOADER_BINARY}"], "65534:65534")


class _CrdLoader(yaml.SafeLoader):
    """PyYAML reads a bare `=` (an enum value in the CRDs' relabel `action`) as YAML 1.1's `value` type, which it
    cannot construct; it is the string "="."""


_CrdLoader.add_constructor("tag:yaml.org,2002:value", yaml.SafeLoader.construct_scalar)


def chart_crds(work: Path) -> Path:
    """The operator's CRDs as the pinned kube-prometheus-stack chart ships them, in a folder of their own under
    `work`, rewritten so that a plain YAML reader reads them (see _CrdLoader)."""
    target = work / "crds"
    if not target.exists():
        unpacked = work / "chart"
        unpacked.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["tar", "-C", str(unpacked), "-xzf", str(CHARTS_ARCHIVE), f"./{CRDS_IN_CHART}"],
            check=True,
            capture_output=True,
        )
        target.mkdir()
        for path in sorted((unpacked / CRDS_IN_CHART).glob("*.yaml")):
            documents = [d for d in yaml.load_all(path.read_text(), Loader=_CrdLoader) if d]
            (target / path.name).write_text(yaml.safe_dump_all(documents))
    return target


# --- the objects a cluster's monitoring stack would have made (pure) ---------------------------------------------


def discovery_access(namespace: str) -> list[dict[str, Any]]:
    """Prometheus's service account, a long-lived token for it (the API server fills it) and read access to pods."""
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": SERVICE_ACCOUNT}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, "namespace": namespace}},
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/service-account-token",
            "metadata": {
                "name": TOKEN_SECRET,
                "namespace": namespace,
                "annotations": {"kubernetes.io/service-account.name": SERVICE_ACCOUNT},
            },
        },
        {**role, "rules": DISCOVERY_RULES},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": SERVICE_ACCOUNT},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SERVICE_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
        },
    ]


def prometheus_object(
    settings: Settings, image: str, version: str, apiserver: str, evaluation_interval: str = "5s"
) -> dict[str, Any]:
    """The Prometheus an `existing` monitoring stack runs: it selects monitors and rules by the stack's
    `monitoring.selectorLabels` in every namespace, as kube-prometheus-stack's does, and reaches the API server at
    `apiserver` with its service account's token (a local node's API server has a self-signed certificate)."""
    assert settings.monitoring is not None, "a Prometheus is made only for stacks with ml-serving:monitoring"
    monitoring = settings.monitoring
    selector = {"matchLabels": dict(monitoring.selector_labels)}
    return {
        "apiVersion": MONITORING_API,
        "kind": "Prometheus",
        "metadata": {"name": PROMETHEUS_NAME, "namespace": monitoring.namespace},
        "spec": {
            "image": image,
            "version": version,
            "imagePullPolicy": "Never",
            "replicas": 1,
            "serviceAccountName": SERVICE_ACCOUNT,
            "secrets": [TOKEN_SECRET],  # mounted under SECRETS_DIR/<name>/
            "podMonitorSelector": selector,
            "podMonitorNamespaceSelector": {},
            "serviceMonitorSelector": selector,
            "serviceMonitorNamespaceSelector": {},
            "ruleSelector": selector,
            "ruleNamespaceSelector": {},
            "scrapeInterval": monitoring.scrape_interval,
            "evaluationInterval": evaluation_interval,
            "retention": "2h",
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
            "apiserverConfig": {
                "host": apiserver,
                # A file, not a Secret reference: operator 0.85 looks such a reference up in each monitor's
                # namespace (the stack's), where Prometheus's token is not.
                "authorization": {"type": "Bearer", "credentialsFile": f"{SECRETS_DIR}/{TOKEN_SECRET}/token"},
                "tlsConfig": {"insecureSkipVerify": True},
            },
        },
    }


# --- processes ---------------------------------------------------------------------------------------------------


@dataclass
class ApiRelay(LoggedProcess):
    """socat from `host:port` (the node's gateway, which pods reach) to the API server on loopback."""

    host: str
    target: str  # https://127.0.0.1:PORT
    log: Path
    port: int = 0
    process: subprocess.Popen | None = None
    error = ClusterError

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self) -> ApiRelay:
        self.port = free_port(self.host)
        target = self.target.split("://", 1)[-1]
        self.spawn(
            ["socat", f"TCP-LISTEN:{self.port},bind={self.host},fork,reuseaddr", f"TCP:{target}"],
            "socat relay to the API server", lambda: listening(self.host, self.port), 30,
        )  # fmt: skip
        return self


@dataclass
class LocalPrometheusOperator(LoggedProcess):
    """The operator process for one API server (`kubeconfig`), naming `reloader_image` for the pods it makes."""

    bin_dir: Path
    kubeconfig: Path
    reloader_image: str
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ml-serving-prometheus-operator-")))
    process: subprocess.Popen | None = None
    error = ClusterError

    @property
    def log(self) -> Path:
        return self.root / "prometheus-operator.log"

    def start(self, seconds: float = 120) -> LocalPrometheusOperator:
        web = free_port()
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        self.spawn(
            [str(self.bin_dir / OPERATOR_BINARY), f"--web.listen-address=127.0.0.1:{web}",
             f"--prometheus-config-reloader={self.reloader_image}", "--log-level=info"],
            OPERATOR_BINARY, lambda: http_ok(f"http://127.0.0.1:{web}/healthz"), seconds, env=env, cwd=self.root,
        )  # fmt: skip
        return self


@dataclass
class NodePrometheus:
    """The whole of it on one node: the operator's CRDs, the images, Prometheus's access, the relay, the operator
    and the Prometheus object for `settings`' monitoring stack; `start` returns once the pod is Ready."""

    node: LocalNode
    settings: Settings
    operator: LocalPrometheusOperator | None = None
    relay: ApiRelay | None = None
    pod: str = ""
    url: str = ""  # Prometheus's HTTP API on the pod's IP (reachable from this host)
    created: float = 0.0  # time.monotonic() when the Prometheus object was created

    @property
    def namespace(self) -> str:
        assert self.settings.monitoring is not None, "the stack has no ml-serving:monitoring"
        return self.settings.monitoring.namespace

    def start(self, seconds: float = 240) -> NodePrometheus:
        problems = monitoring_missing(self.node.bin_dir)
        if problems:
            raise ClusterError("the operator's Prometheus cannot run here:\n  " + "\n  ".join(problems))
        node, cluster = self.node, self.node.cluster
        try:
            apply_crds(cluster.api_client(), chart_crds(node.root / "prometheus-operator-crds"))
            binary = node.bin_dir / PROMETHEUS_BINARY
            version = prometheus_version(binary)
            image = PROMETHEUS_IMAGE.format(version=version)
            node.import_image(prometheus_image(node.root / "images", image, binary))
            node.import_image(reloader_image(node.bin_dir, node.root / "images", RELOADER_IMAGE))
            cluster.create_namespace(self.namespace)
            for obj in discovery_access(self.namespace):
                apply_object(cluster.api_client(), obj)
            wait_for(self._token, f"the token of service account {self.namespace}/{SERVICE_ACCOUNT}", 60)
            self.relay = ApiRelay(node.node_ip, cluster.server, node.root / "api-relay.log").start()
            root = node.root / "prometheus-operator"
            root.mkdir(parents=True, exist_ok=True)
            self.operator = LocalPrometheusOperator(node.bin_dir, cluster.kubeconfig, RELOADER_IMAGE, root).start()
            self.created = time.monotonic()
            apply_object(cluster.api_client(), prometheus_object(self.settings, image, version, self.relay.url))
            pod = wait_for(self._ready_pod, f"Prometheus's pod in {self.namespace} Ready", seconds, self.operator.log)
        except ClusterError as exc:
            state = self.describe()
            self.stop()
            raise ClusterError(f"{exc}\n{state}") from None
        except BaseException:
            self.stop()
            raise
        self.pod, self.url = pod.metadata.name, f"http://{pod.status.pod_ip}:{WEB_PORT}"
        return self

    def _token(self) -> bool:
        from kubernetes import client

        core = client.CoreV1Api(self.node.cluster.api_client())
        return bool((core.read_namespaced_secret(TOKEN_SECRET, self.namespace).data or {}).get("token"))

    def _ready_pod(self) -> Any:
        api = self.node.cluster.api_client()
        return next(iter(ready_pods(api, self.namespace, f"prometheus={PROMETHEUS_NAME}")), None)

    def describe(self) -> str:
        """What to look at when Prometheus does not come up: the StatefulSet's and its pods' states, and events."""
        from kubernetes import client

        try:
            api = self.node.cluster.api_client()
            sets = client.AppsV1Api(api).list_namespaced_stateful_set(self.namespace).items
            pods = client.CoreV1Api(api).list_namespaced_pod(self.namespace).items
            events = client.CoreV1Api(api).list_namespaced_event(self.namespace).items
        except Exception as exc:  # the API server is gone
            return f"(cannot read the namespace: {exc})"
        lines = [f"statefulset {s.metadata.name}: {s.status.ready_replicas}/{s.spec.replicas} ready" for s in sets]
        for pod in pods:
            statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
            lines.append(f"pod {pod.metadata.name} {pod.status.phase}: {[(c.name, c.state) for c in statuses]}")
        lines += [f"event {e.involved_object.name}: {e.reason}: {e.message}" for e in events[-15:]]
        return "\n".join(lines)

    def stop(self) -> None:
        """Delete the Prometheus object (its StatefulSet goes with it), then stop the operator and the relay."""
        try:
            from kubernetes.dynamic import DynamicClient

            api = DynamicClient(self.node.cluster.api_client()).resources.get(
                api_version=MONITORING_API, kind="Prometheus"
            )
            api.delete(name=PROMETHEUS_NAME, namespace=self.namespace)
        except Exception:  # never created, or the API server is gone: the node's tear-down removes the pod
            pass
        for process in (self.operator, self.relay):
            if process is not None:
                process.stop()


def apply_object(api_client: Any, obj: dict[str, Any]) -> None:
    """Create `obj`, or replace it if it exists."""
    from kubernetes.client.rest import ApiException
    from kubernetes.dynamic import DynamicClient

    api = DynamicClient(api_client).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    namespace = obj["metadata"].get("namespace")
    try:
        api.create(body=obj, namespace=namespace)
    except ApiException as exc:
        if exc.status != 409:
            raise
        live = api.get(name=obj["metadata"]["name"], namespace=namespace)
        body = {**obj, "metadata": {**obj["metadata"], "resourceVersion": live.metadata.resourceVersion}}
        api.replace(body=body, namespace=namespace)
