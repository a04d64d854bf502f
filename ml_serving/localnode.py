"""A real node beside the local API server: containerd, kubelet, kube-scheduler, kube-proxy and the controllers
a Deployment needs, so the pods the operator generates actually run on this machine.

Everything is the node's own: a containerd with its own root/state/socket (dockerd's is left alone) that pulls
from the cluster's OCI registry, a pause image built here (registry.k8s.io cannot be reached), a bridge made by the
run (pods talk to this host only: no masquerade, no route out), and a cgroup root of its own. `stop()` deletes the
pods, stops every process by PID, then `nodehost` removes whatever is left (shims, mounts, netns, veths,
KUBE-/CNI- rules, cgroups, sysctls). Needs root, Debian's containerd/runc and containernetworking-plugins, and the
binaries `./run tools` builds.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ml_serving import nodehost
from ml_serving.localcluster import ClusterError, LocalCluster, wait_ready
from ml_serving.nodeimages import MIRRORED_REGISTRIES
from ml_serving.ociimage import binary_image
from ml_serving.processes import free_port, stop_group

NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-proxy", "kube-controller-manager", "node-pause", "node-hello")
HOST_COMMANDS = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "ip", "iptables", "iptables-save", "umount")
CNI_DIR = Path(os.environ.get("ML_SERVING_CNI_DIR", "/usr/lib/cni"))
CNI_PLUGINS = ("bridge", "host-local", "loopback")
PAUSE_IMAGE = "localhost/ml-serving/pause:1"
HELLO_IMAGE = "localhost/ml-serving/hello:1"
# containerd's namespace for everything the CRI plugin (the kubelet's runtime) sees.
CRI_NAMESPACE = "k8s.io"
# The controllers a node's workloads need, beside the cluster's own garbage collector and namespace controllers.
NODE_CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",  # Prometheus, as prometheus-operator generates it
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "pod-garbage-collector-controller",
    "disruption-controller",
    # removes the not-ready taint the kubelet registers the node with
    "node-lifecycle-controller",
)
POD_NETWORK = "ml-serving-pods"


class NodeError(ClusterError):
    """The node could not start; the message names what is missing or which process failed, with its log."""


def missing_prerequisites(bin_dir: Path) -> list[str]:
    """What this machine lacks for a node, each with its fix; empty when a node can start."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (containerd, the kubelet and CNI need it): run as root")
    for name in NODE_BINARIES:
        if not (bin_dir / name).exists():
            missing.append(f"{bin_dir / name}: run `./run tools` (or `tools/build.sh` for it)")
    for command in HOST_COMMANDS:
        if shutil.which(command) is None:
            missing.append(f"`{command}`: apt-get install containerd runc iptables iproute2")
    for plugin in CNI_PLUGINS:
        if not (CNI_DIR / plugin).exists():
            missing.append(f"{CNI_DIR / plugin}: apt-get install containernetworking-plugins")
    return missing


def pick_subnet(seed: int | None = None) -> ipaddress.IPv4Network:
    """A /24 in 10.244.0.0/16 that no address or route on this host overlaps."""
    used = []
    for command in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show"]):
        out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
        for word in out.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    start = seed if seed is not None else secrets.randbelow(250)
    for step in range(250):
        candidate = ipaddress.ip_network(f"10.244.{(start + step) % 250 + 1}.0/24")
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise NodeError("no free /24 in 10.244.0.0/16 for the pod network: remove some bridges or routes")


def containerd_config(root: Path, socket: Path, cni_conf_dir: Path, hosts_dir: Path | None = None) -> str:
    """containerd 1.6's config (version 2): the node's own folders and socket, the CRI plugin as the kubelet needs;
    with `hosts_dir`, registries are configured there (`mirror_hosts`)."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    registry = f'[{cri}.registry]\n  config_path = "{hosts_dir}"\n' if hosts_dir else ""
    return f"""version = 2
root = "{root / "root"}"
state = "{root / "state"}"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[metrics]
  address = ""
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM refuses to lower oom_score_adj even for root: without this every sandbox fails in runc.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.cni]
    bin_dir = "{CNI_DIR}"
    conf_dir = "{cni_conf_dir}"
    max_conf_num = 1
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{root / "runc"}"
{registry}"""


def mirror_hosts(mirror: str) -> dict[str, str]:
    """containerd's `hosts.toml` per mirrored registry: the OCI registry `mirror` (plain HTTP on loopback) is asked
    first. An image nobody pushed then fails on the upstream server, which cannot be reached: containerd 1.6.20
    ignored `server = "http://…"` for docker.io and still asked registry-1.docker.io (tried 2026-12-06)."""
    return {
        registry: f'[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
        for registry in MIRRORED_REGISTRIES
    }


def cni_conflist(bridge: str, subnet: ipaddress.IPv4Network, ipam_dir: Path) -> dict[str, Any]:
    """A bridge + host-local network: the bridge is the pods' gateway; no masquerade, so nothing is routed out."""
    hosts = list(subnet.hosts())
    return {
        "cniVersion": "0.4.0",
        "name": POD_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(ipam_dir),
                    "ranges": [[{"subnet": str(subnet), "gateway": str(hosts[0]), "rangeStart": str(hosts[1])}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "loopback"},
        ],
    }


def kubelet_config(node: LocalNode) -> dict[str, Any]:
    """A test node's KubeletConfiguration: anonymous + AlwaysAllow on the node IP, cgroupfs, no image GC."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": node.node_ip,
        "port": node.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": node.kubelet_healthz_port,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": node.cgroup,
        "failCgroupV1": False,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "imageServiceEndpoint": f"unix://{node.socket}",
        "podLogsDir": str(node.root / "pod-logs"),
        "resolvConf": "",
        "clusterDomain": "cluster.local",
        # Imported images have no registry to come back from: GC would delete one no pod uses yet.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
        "maxPods": 50,
        "nodeStatusUpdateFrequency": "2s",
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "staticPodPath": "",
        "makeIPTablesUtilChains": False,
    }


def kube_proxy_config(node: LocalNode) -> dict[str, Any]:
    """iptables mode; leaves conntrack sysctls and localhost NodePorts alone."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(node.cluster.kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": str(node.subnet),
        "hostnameOverride": node.name,
        "bindAddress": node.node_ip,
        "healthzBindAddress": f"127.0.0.1:{free_port()}",
        "metricsBindAddress": f"127.0.0.1:{free_port()}",
        "nodePortAddresses": [f"{node.node_ip}/32"],
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
        "detectLocalMode": "ClusterCIDR",
    }


@dataclass
class LocalNode:
    """One node, `name`, registered with `cluster`; its folders under `root`, its pods on `bridge`."""

    cluster: LocalCluster
    bin_dir: Path
    name: str = "ml-serving-node"
    # The local OCI registry (HOST:PORT) the node pulls MIRRORED_REGISTRIES' images from, as a cluster pulls.
    mirror: str | None = None
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ml-serving-node-")))
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        token = secrets.token_hex(3)
        self.bridge = f"mlsbr{token}"
        self.cgroup = f"/ml-serving-node-{token}"
        self.socket = self.root / "containerd" / "containerd.sock"
        self.subnet = pick_subnet()
        self.node_ip = str(next(self.subnet.hosts()))
        self.kubelet_port = free_port()
        self.kubelet_healthz_port = free_port()
        self.before: nodehost.HostSnapshot | None = None
        self.host_lock: Any = None

    def start(self, seconds: float = 180, wait_for_host: float = 1800) -> LocalNode:
        """Bring up the runtime, the network and the kubelet, wait for a Ready node, then the scheduler and the rest."""
        missing = missing_prerequisites(self.bin_dir)
        if missing:
            raise NodeError("this machine cannot run a node:\n  " + "\n  ".join(missing))
        self.host_lock = nodehost.hold_host(wait_for_host)
        if self.host_lock is None:
            raise NodeError(f"another node has held {nodehost.HOST_LOCK} for {wait_for_host:.0f} s: stop it first")
        self.before = nodehost.HostSnapshot.take()
        try:
            self._make_network()
            nodehost.make_cgroup(self.cgroup)
            self._start_containerd(seconds)
            self.import_image(
                binary_image(self.root / "images" / "pause.tar", PAUSE_IMAGE, self.bin_dir / "node-pause")
            )
            self._start_kubelet(seconds)
            self._start_control_plane()
            self._start_kube_proxy()
        except BaseException:
            self.stop()
            raise
        return self

    # --- the pieces -------------------------------------------------------------------------------------------

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"{name}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=self.root
            )
        self.processes[name] = process
        return process, log

    def _make_network(self) -> None:
        prefix = self.subnet.prefixlen
        for command in (
            ["ip", "link", "add", self.bridge, "type", "bridge"],
            ["ip", "addr", "add", f"{self.node_ip}/{prefix}", "dev", self.bridge],
            ["ip", "link", "set", self.bridge, "up"],
            # Pod to pod on the bridge crosses FORWARD, whose policy Docker sets to DROP: without this, a pod (e.g.
            # Prometheus) reaches this host but no other pod. The comment's KUBE- prefix makes tear-down remove it.
            ["iptables", "-w", "-I", "FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment",
             "--comment", f"{nodehost.RULE_MARKERS[0]}ML-SERVING pod to pod on {self.bridge}", "-j", "ACCEPT"],
        ):  # fmt: skip
            answer = subprocess.run(command, capture_output=True, text=True)
            if answer.returncode != 0:
                raise NodeError(f"`{' '.join(command)}` failed: {answer.stderr.strip()}")
        conf_dir = self.root / "cni" / "net.d"
        conf_dir.mkdir(parents=True)
        conflist = cni_conflist(self.bridge, self.subnet, self.root / "cni" / "ipam")
        (conf_dir / "10-ml-serving.conflist").write_text(json.dumps(conflist, indent=1))

    def _start_containerd(self, seconds: float) -> None:
        folder = self.root / "containerd"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "config.toml"
        hosts_dir = None
        if self.mirror:
            hosts_dir = folder / "certs.d"
            for registry, hosts in mirror_hosts(self.mirror).items():
                (hosts_dir / registry).mkdir(parents=True)
                (hosts_dir / registry / "hosts.toml").write_text(hosts)
        config.write_text(containerd_config(folder, self.socket, self.root / "cni" / "net.d", hosts_dir))
        process, log = self._spawn("containerd", ["containerd", "--config", str(config), "--log-level", "info"])
        wait_ready(lambda: self.ctr("version", check=False).returncode == 0, process, log, "containerd", seconds)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`ctr` against the node's containerd, in the CRI namespace."""
        command = ["ctr", "--address", str(self.socket), "--namespace", CRI_NAMESPACE, *args]
        answer = subprocess.run(command, capture_output=True, text=True, check=False)
        if check and answer.returncode != 0:
            raise NodeError(f"`{' '.join(command)}` failed: {answer.stderr.strip()}")
        return answer

    def import_image(self, archive: Path) -> None:
        """Load an image archive (OCI layout or `docker save`) so pods with `imagePullPolicy: Never` find it."""
        self.ctr("images", "import", "--no-unpack=false", str(archive))

    def _start_kubelet(self, seconds: float) -> None:
        config = self.root / "kubelet.yaml"
        config.write_text(yaml.safe_dump(kubelet_config(self)))
        process, log = self._spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"), "--config", str(config), "--kubeconfig", str(self.cluster.kubeconfig),
                "--root-dir", str(self.root / "kubelet"), "--cert-dir", str(self.root / "kubelet-pki"),
                "--hostname-override", self.name, "--node-ip", self.node_ip, "--v", "1",
            ],
        )  # fmt: skip
        wait_ready(self.ready, process, log, "kubelet (node Ready)", seconds)

    def ready(self) -> bool:
        """Whether the API server shows this node Ready."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            node = client.CoreV1Api(self.cluster.api_client()).read_node(self.name)
        except ApiException:
            return False
        return has_ready_condition(node)

    def pod_memory(self, namespace: str, pod: str, container: str | None = None) -> int:
        """A pod's (or one of its containers') working-set memory in bytes as the kubelet reports it (the stats
        summary, through the API server). A container the kubelet has not sampled yet is a NodeError, not 0: the
        pod's own figure can hold only its sandbox for a while after the container starts."""
        from kubernetes import client

        api = client.CoreV1Api(self.cluster.api_client())
        text = api.connect_get_node_proxy_with_path(self.name, "stats/summary", _preload_content=False).data
        for entry in json.loads(text)["pods"]:
            if entry["podRef"]["namespace"] != namespace or entry["podRef"]["name"] != pod:
                continue
            if container is None:
                return int(entry.get("memory", {}).get("workingSetBytes", 0))
            for stats in entry.get("containers", []):
                if stats["name"] == container and stats.get("memory", {}).get("workingSetBytes"):
                    return int(stats["memory"]["workingSetBytes"])
        what = f"{namespace}/{pod}" + (f" {container}" if container else "")
        raise NodeError(f"the kubelet reports no memory for {what} yet")

    def _start_control_plane(self) -> None:
        """The scheduler and the workload controllers (the cluster's own manager runs GC and namespaces)."""
        kubeconfig = str(self.cluster.kubeconfig)
        self._spawn(
            "kube-scheduler",
            [str(self.bin_dir / "kube-scheduler"), "--kubeconfig", kubeconfig, "--leader-elect=false",
             "--secure-port", "0"],
        )  # fmt: skip
        certs = self.cluster.root / "certs"
        self._spawn(
            "kube-controller-manager-node",
            [
                str(self.bin_dir / "kube-controller-manager"), "--kubeconfig", kubeconfig,
                "--controllers", ",".join(NODE_CONTROLLERS), "--leader-elect=false", "--secure-port", "0",
                "--use-service-account-credentials=false",
                "--service-account-private-key-file", str(certs / "service-account.key"),
                "--root-ca-file", str(certs / "apiserver.crt"),
                "--concurrent-deployment-syncs", "2", "--concurrent-replicaset-syncs", "2",
            ],
        )  # fmt: skip

    def _start_kube_proxy(self) -> None:
        config = self.root / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump(kube_proxy_config(self)))
        self._spawn("kube-proxy", [str(self.bin_dir / "kube-proxy"), "--config", str(config)])

    # --- tear-down --------------------------------------------------------------------------------------------

    def _stop_process(self, name: str, seconds: float = 20) -> None:
        stop_group(self.processes.pop(name, None), seconds)

    def _delete_pods(self, seconds: float = 60) -> None:
        """Delete every pod bound to this node and wait until the runtime runs no task (the CNI DEL has run)."""
        from kubernetes import client

        try:
            api = client.CoreV1Api(self.cluster.api_client())
            pods = api.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.name}").items
            for pod in pods:
                api.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
        except Exception:  # the API server is gone: fall through to the host clean-up
            return
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            running = [
                line for line in self.ctr("tasks", "ls", check=False).stdout.splitlines()[1:] if "RUNNING" in line
            ]
            if not running:
                return
            time.sleep(0.5)

    def stop(self, check: bool = False) -> nodehost.Leftovers | None:
        """Stop every process of the node, then remove what they leave behind on the host; with `check`, say what is
        still there (read before the host lock goes to the next node, whose own state must not count)."""
        for name in ("kube-scheduler", "kube-controller-manager-node"):
            self._stop_process(name)
        if "kubelet" in self.processes and "containerd" in self.processes:
            self._delete_pods()
        for name in ("kubelet", "kube-proxy"):
            self._stop_process(name)
        if (self.bin_dir / "kube-proxy").exists() and self.before is not None:
            subprocess.run(
                [str(self.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True, cwd=self.root, check=False
            )
        self._stop_process("containerd")
        for name in list(self.processes):
            self._stop_process(name)
        if self.before is None:
            nodehost.release_host(self.host_lock)
            self.host_lock = None
            return None
        nodehost.kill_all(nodehost.pids_with_argument(str(self.socket)) | nodehost.cgroup_pids(self.cgroup))
        nodehost.unmount_under(self.root)
        nodehost.remove_netns(self.before.netns)
        nodehost.remove_bridge(self.bridge)
        nodehost.remove_rules(self.before.rules)
        nodehost.remove_cgroup(self.cgroup)
        nodehost.restore_sysctls(self.before.sysctls)
        nodehost.remove_cni_cache(POD_NETWORK)
        left = nodehost.leftovers(self.before, self.root, self.socket, self.cgroup) if check else None
        self.before = None  # a second stop() must not remove what a later node made
        nodehost.release_host(self.host_lock)
        self.host_lock = None
        return left

    def remove_images(self) -> None:
        """Delete containerd's content and the image archives (a serving image is over 1 GB); the logs stay."""
        for folder in ("containerd", "images", "serving-context"):
            shutil.rmtree(self.root / folder, ignore_errors=True)

    def remove_root(self) -> None:
        """Delete the node's folder (logs included): only once its mounts are gone."""
        shutil.rmtree(self.root, ignore_errors=True)


def has_ready_condition(obj: Any) -> bool:
    """Whether a node's or a pod's `Ready` condition is True."""
    return any(c.type == "Ready" and c.status == "True" for c in obj.status.conditions or [])


def ready_pods(api_client: Any, namespace: str, selector: str) -> list[Any]:
    """The pods matching `selector` that are Ready and not being deleted (a deleted pod stays Ready for its grace
    period, and must not count as the one that serves)."""
    from kubernetes import client

    pods = client.CoreV1Api(api_client).list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in pods if p.metadata.deletion_timestamp is None and has_ready_condition(p)]
