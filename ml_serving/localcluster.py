"""A real Kubernetes API server on loopback, like controller-runtime's envtest: etcd + kube-apiserver, no kubelet.

Enough for `pulumi up` to create, diff, update and delete real objects (validated and pruned by the server
under the upstream CRDs' structural schemas); nothing schedules or runs a pod. kube-controller-manager runs only
its garbage collector and namespace controllers, which finish foreground deletions and namespace deletions (the
provider deletes in the foreground; without them `destroy` would wait forever). The binaries come from
`./run tools` (built from Go modules, cached outside the repository).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ml_serving.processes import free_port, http_ok, stop_group, wait_until
from ml_serving.tools import TOOLS_SCRIPT, tools_folder  # noqa: F401  (TOOLS_SCRIPT: its old home)

# The upstream CRDs the team keeps beside the checkout (../shared/crds), or where ML_SERVING_CRD_DIR says.
CRD_DIR = Path(os.environ.get("ML_SERVING_CRD_DIR") or Path(__file__).resolve().parents[2] / "shared" / "crds")
# Upstream CRDs the project keeps itself, for kinds the shared folder lacks (crds/SOURCES.md says whence).
PROJECT_CRD_DIR = Path(__file__).resolve().parents[1] / "crds"


def crd_files(crd_dir: Path = CRD_DIR) -> list[Path]:
    """Every CRD file: the shared folder's, then the project's own."""
    return [*sorted(crd_dir.glob("*.yaml")), *sorted(PROJECT_CRD_DIR.glob("*.yaml"))]


ADMIN = "ml-serving-admin"


class ClusterError(RuntimeError):
    """The local API server could not be started; the message says which process and shows its log."""


def tools_dir() -> Path | None:
    """The folder `./run tools` built into (its `bin/` holds pulumi, etcd, kube-apiserver), or None if not built."""
    folder = tools_folder()
    needed = ("pulumi", "pulumi-resource-kubernetes", "etcd", "kube-apiserver", "kube-controller-manager")
    if folder is None or not all((folder / "bin" / name).exists() for name in needed):
        return None
    return folder


def tools_env(folder: Path) -> dict[str, str]:
    """The environment that makes the built tools the ones used: CLI on PATH, its plugins, no downloads."""
    from ml_serving.image_provider import with_provider_on_path  # the image build's dynamic provider

    return {
        "PATH": with_provider_on_path(f"{folder / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"),
        "PULUMI_HOME": str(folder / "pulumi-home"),
        "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "true",
        "PULUMI_SKIP_UPDATE_CHECK": "true",
    }


def wait_ready(ready: Callable[[], bool], process: subprocess.Popen, log: Path, what: str, seconds: float) -> None:
    wait_until(ready, process, log, what, seconds, ClusterError)


@dataclass
class LocalCluster:
    """etcd and kube-apiserver in `root`, on free loopback ports; `kubeconfig` is admin (system:masters)."""

    bin_dir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ml-serving-cluster-")))
    processes: list[subprocess.Popen] = field(default_factory=list)
    kubeconfig: Path | None = None
    apiserver_flags: tuple[str, ...] = ()  # extra kube-apiserver flags (e.g. admission plugins to switch off)

    def start(
        self,
        crd_dir: Path | None = CRD_DIR,
        namespaces: tuple[str, ...] = ("istio-system", "monitoring"),
        seconds: float = 120,
    ) -> LocalCluster:
        """Start both, apply the CRDs, and create `namespaces` (what the cluster's own installs would have made:
        Istio's `istio-system` holds the gateway a stack declares)."""
        try:
            self._start_etcd(seconds)
            self._start_apiserver(seconds)
            self._start_controllers()
            if crd_dir is not None:
                apply_crds(self.api_client(), crd_dir)
            for namespace in namespaces:
                self.create_namespace(namespace)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, command: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        with log.open("w") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process, log

    def _start_etcd(self, seconds: float) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        process, log = self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"), "--data-dir", str(self.root / "etcd"), "--name", "local",
                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"local=http://127.0.0.1:{peer}", "--unsafe-no-fsync", "--log-level", "warn",
            ],
        )  # fmt: skip

        def healthy() -> bool:
            return http_ok(f"{self.etcd_url}/health")

        wait_ready(healthy, process, log, "etcd", seconds)

    def _start_apiserver(self, seconds: float) -> None:
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        certs = self.root / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        key = certs / "service-account.key"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        self.token = secrets.token_hex(16)
        tokens = certs / "tokens.csv"
        tokens.write_text(f'{self.token},{ADMIN},{ADMIN},"system:masters"\n')
        process, log = self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"), "--etcd-servers", self.etcd_url,
                "--bind-address", "127.0.0.1", "--secure-port", str(port), "--cert-dir", str(certs),
                "--token-auth-file", str(tokens), "--authorization-mode", "RBAC",
                "--service-cluster-ip-range", "10.0.0.0/24", "--allow-privileged=true",
                "--service-account-issuer", self.server, "--service-account-key-file", str(key),
                "--service-account-signing-key-file", str(key),
                "--disable-admission-plugins", "ServiceAccount", "--enable-priority-and-fairness=false",
                # a node (localnode.py) is reached by its IP: never a DNS lookup of its name
                "--kubelet-preferred-address-types", "InternalIP",
                *self.apiserver_flags,
            ],
        )  # fmt: skip
        self.kubeconfig = self.root / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(self.kubeconfig_document()))

        def ready() -> bool:
            import requests

            try:
                answer = requests.get(
                    f"{self.server}/readyz", headers={"Authorization": f"Bearer {self.token}"}, verify=False, timeout=2
                )
            except requests.RequestException:
                return False
            return answer.status_code == 200

        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        wait_ready(ready, process, log, "kube-apiserver", seconds)

    def _start_controllers(self) -> None:
        """Only what deletion needs; it serves nothing (--secure-port 0), so there is nothing to wait for."""
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"), "--kubeconfig", str(self.kubeconfig),
                "--controllers", "garbagecollector,namespace", "--leader-elect=false", "--secure-port", "0",
                "--use-service-account-credentials=false",
                "--service-account-private-key-file", str(self.root / "certs" / "service-account.key"),
            ],
        )  # fmt: skip

    def kubeconfig_document(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}],
            "users": [{"name": ADMIN, "user": {"token": self.token}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": ADMIN}}],
            "current-context": "local",
        }

    def api_client(self) -> Any:
        from kubernetes import client, config

        return config.new_client_from_config(
            config_file=str(self.kubeconfig), client_configuration=client.Configuration()
        )

    def create_namespace(self, name: str) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            client.CoreV1Api(self.api_client()).create_namespace({"metadata": {"name": name}})
        except ApiException as exc:
            if exc.status != 409:
                raise

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd, by their PIDs (each runs in its own process group)."""
        for process in reversed(self.processes):
            stop_group(process)
        self.processes.clear()


def structural(schema: Any) -> None:
    """Give a typeless schema node `type: object` and keep its fields, as Seldon's chart does for the graph.

    Seldon v1's CRD (operator/config/crd_v1/bases) leaves the recursive `graph.children.items` without a type,
    which an API server refuses as not structural; its Helm chart installs a patched copy.
    """
    if not isinstance(schema, dict):
        return
    for key in ("properties", "patternProperties"):
        for child in (schema.get(key) or {}).values():
            structural(child)
    for key in ("items", "additionalProperties"):
        child = schema.get(key)
        if isinstance(child, dict):
            if (
                not child.get("type")
                and not child.get("x-kubernetes-int-or-string")
                and not any(
                    k in child for k in ("anyOf", "allOf", "oneOf", "x-kubernetes-preserve-unknown-fields", "$ref")
                )
            ):
                child["type"] = "object"
                child["x-kubernetes-preserve-unknown-fields"] = True
            structural(child)


def apply_crds(api_client: Any, crd_dir: Path, seconds: float = 60) -> list[str]:
    """Create every CustomResourceDefinition in `crd_dir` and wait until the server serves each one."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    if not any(crd_dir.glob("*.yaml")):
        raise ClusterError(f"no CRDs in {crd_dir}: point ML_SERVING_CRD_DIR at the upstream CRDs (../shared/crds)")
    api = client.ApiextensionsV1Api(api_client)
    names = []
    for path in crd_files(crd_dir):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            for version in crd["spec"].get("versions", []):
                structural(version.get("schema", {}).get("openAPIV3Schema", {}))
            try:
                api.create_custom_resource_definition(crd)
            except ApiException as exc:
                if exc.status != 409:
                    raise ClusterError(f"{path.name}: the API server refused the CRD: {exc.body}") from None
            names.append(crd["metadata"]["name"])
    deadline = time.monotonic() + seconds
    for name in names:
        while True:
            conditions = api.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"CRD {name} not established after {seconds:.0f} s")
            time.sleep(0.2)
    return names
