"""What a local node changes on the host, recorded before it starts and put back after it stops.

A kubelet, containerd and kube-proxy leave state behind when killed: pause and container processes (their shims
outlive containerd), shm/rootfs/token mounts, network namespaces, veths, iptables chains, cgroups and a few
sysctls. `HostSnapshot` records what was there before; `restore` removes only what appeared since and belongs to
the node (its root folder, its bridge, its cgroup root, KUBE-/CNI- rules), so nothing of dockerd's is touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CGROUP_FS = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")
CNI_CACHE = Path("/var/lib/cni/results")

# Sysctls the kubelet (protectKernelDefaults: false) and kube-proxy may set: put back as they were.
SYSCTLS = (
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/conf/all/route_localnet",
    "net/ipv4/ip_forward",
    "net/bridge/bridge-nf-call-iptables",
)
# What a node's rules look like in iptables-save: kube-proxy's and the kubelet's KUBE-* chains, CNI's CNI-*.
RULE_MARKERS = ("KUBE-", "CNI-")


def mount_points() -> list[str]:
    """Every mount point, as /proc/self/mountinfo lists them (octal escapes decoded)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        points.append(point.encode().decode("unicode_escape"))
    return points


def iptables_rules(tool: str) -> dict[str, list[str]]:
    """{table: ["-A CHAIN …" and ":CHAIN" lines]} from `TOOL-save`, or {} if the tool is missing."""
    try:
        text = subprocess.run([f"{tool}-save"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    tables: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            tables[table] = []
        elif line.startswith((":", "-A ")) and table:
            tables[table].append(line.split(" [")[0] if line.startswith(":") else line)
    return tables


def node_rules(tables: dict[str, list[str]]) -> set[tuple[str, str]]:
    """The (table, line) pairs that a node's components make."""
    return {(t, line) for t, lines in tables.items() for line in lines if any(m in line for m in RULE_MARKERS)}


def cgroup_hierarchies() -> list[Path]:
    """The folders a cgroup root must exist in: the unified one on cgroup v2, every v1 controller's otherwise."""
    if (CGROUP_FS / "cgroup.controllers").exists():
        return [CGROUP_FS]
    return sorted(
        p for p in CGROUP_FS.iterdir() if p.is_dir() and (p / "cgroup.procs").exists() and p.name != "unified"
    )


def read_sysctls() -> dict[str, str]:
    values = {}
    for name in SYSCTLS:
        path = Path("/proc/sys") / name
        if path.exists():
            values[name] = path.read_text().strip()
    return values


@dataclass
class HostSnapshot:
    """The host before the node: mounts, netns, iptables rules, sysctls."""

    mounts: set[str] = field(default_factory=set)
    netns: set[str] = field(default_factory=set)
    rules: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    links: set[str] = field(default_factory=set)

    @classmethod
    def take(cls) -> HostSnapshot:
        return cls(
            mounts=set(mount_points()),
            netns=set(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else set(),
            rules={tool: node_rules(iptables_rules(tool)) for tool in ("iptables", "ip6tables")},
            sysctls=read_sysctls(),
            links=set(link_names()),
        )


def cgroup_pids(cgroup: str) -> set[int]:
    """Every process in `cgroup` (a path under each hierarchy) or below it."""
    pids: set[int] = set()
    for hierarchy in cgroup_hierarchies():
        top = hierarchy / cgroup.strip("/")
        if not top.exists():
            continue
        for procs in top.rglob("cgroup.procs"):
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                continue
    return pids


def pids_with_argument(argument: str) -> set[int]:
    """Processes whose command line has `argument` as one of its words (the node's own socket or folder)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in words:
            found.add(int(entry.name))
    return found


def kill_all(pids: set[int], seconds: float = 10) -> None:
    """SIGKILL each PID and wait until it is gone (a zombie of ours is reaped by its parent, not us)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def unmount_under(root: Path) -> None:
    """Unmount every mount point at or below `root`, deepest first (lazily, so a busy one cannot block)."""
    prefix = str(root).rstrip("/") + "/"
    for point in sorted((p for p in set(mount_points()) if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def remove_netns(before: set[str]) -> None:
    """Unmount and remove the CNI network namespaces that appeared while the node ran."""
    if not NETNS_DIR.exists():
        return
    for name in set(os.listdir(NETNS_DIR)) - before:
        if not name.startswith("cni-"):
            continue
        path = NETNS_DIR / name
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
        path.unlink(missing_ok=True)


def remove_bridge(bridge: str) -> None:
    """Delete the veths still attached to the node's bridge, then the bridge."""
    answer = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True)
    for line in answer.stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)
    subprocess.run(["ip", "link", "delete", bridge], capture_output=True, check=False)


def link_names() -> list[str]:
    answer = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in answer.stdout.splitlines() if ":" in line]


def remove_rules(before: dict[str, set[tuple[str, str]]]) -> None:
    """Delete the KUBE-/CNI- rules and chains that appeared since `before` (rules first, then chains)."""
    for tool in ("iptables", "ip6tables"):
        now = node_rules(iptables_rules(tool)) - before.get(tool, set())
        for table, line in sorted(now):
            if line.startswith("-A "):
                subprocess.run([tool, "-w", "-t", table, "-D", *shlex.split(line)[1:]], capture_output=True)
        chains = [(t, line[1:].split()[0]) for t, line in now if line.startswith(":")]
        for table, chain in chains:
            subprocess.run([tool, "-w", "-t", table, "-F", chain], capture_output=True)
        for table, chain in chains:
            subprocess.run([tool, "-w", "-t", table, "-X", chain], capture_output=True)


def restore_sysctls(before: dict[str, str]) -> None:
    for name, value in before.items():
        path = Path("/proc/sys") / name
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
        except OSError:
            pass


def make_cgroup(cgroup: str) -> None:
    """Create the node's cgroup root in every hierarchy (the kubelet refuses a root that does not exist)."""
    for hierarchy in cgroup_hierarchies():
        path = hierarchy / cgroup.strip("/")
        path.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":  # a new v1 cpuset is empty: give it its parent's CPUs and memory nodes
            for name in ("cpuset.cpus", "cpuset.mems"):
                (path / name).write_text((hierarchy / name).read_text())


def remove_cgroup(cgroup: str) -> None:
    """Remove the node's cgroup root and everything below it, deepest first (each must be empty of processes)."""
    for hierarchy in cgroup_hierarchies():
        top = hierarchy / cgroup.strip("/")
        if not top.exists():
            continue
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _rmdir(path)
        _rmdir(top)


def _rmdir(path: Path, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the kernel finishes tearing down its last process
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)


def remove_cni_cache(network: str) -> None:
    """libcni's cached results for the node's network (files named `<network>-<container>-<interface>`)."""
    if CNI_CACHE.exists():
        for path in CNI_CACHE.glob(f"{network}-*"):
            path.unlink(missing_ok=True)


@dataclass
class Leftovers:
    """What a stopped node left on the host; empty when the tear-down was complete."""

    processes: set[int]
    mounts: list[str]
    netns: list[str]
    links: list[str]
    rules: list[str]
    cgroups: list[str]

    def __bool__(self) -> bool:
        return any((self.processes, self.mounts, self.netns, self.links, self.rules, self.cgroups))


def leftovers(before: HostSnapshot, root: Path, socket: Path, cgroup: str) -> Leftovers:
    """Look for anything of the node's still on the host (the tear-down test asserts there is none)."""
    prefix = str(root).rstrip("/") + "/"
    netns_now = set(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else set()
    rules = []
    for tool in ("iptables", "ip6tables"):
        rules += [f"{tool} {t} {line}" for t, line in node_rules(iptables_rules(tool)) - before.rules.get(tool, set())]
    return Leftovers(
        processes={p for p in cgroup_pids(cgroup) | pids_with_argument(str(socket)) if _alive(p)},
        mounts=sorted(p for p in set(mount_points()) - before.mounts if p.startswith(prefix) or "/netns/" in p),
        netns=sorted(n for n in netns_now - before.netns if n.startswith("cni-")),
        links=sorted(set(link_names()) - before.links),
        rules=sorted(rules),
        cgroups=[str(h / cgroup.strip("/")) for h in cgroup_hierarchies() if (h / cgroup.strip("/")).exists()],
    )


# A node's tear-down removes what appeared on the host since its start (netns, veths, KUBE-/CNI- rules): with two
# nodes at once, one would remove the other's. So one node per host at a time, the next waiting its turn.
HOST_LOCK = Path(os.environ.get("ML_SERVING_NODE_LOCK") or "/run/ml-serving-node.lock")


def hold_host(seconds: float) -> Any:
    """The host's node lock (an open file holding `flock`), waited for up to `seconds`; None if not had in time."""
    handle = HOST_LOCK.open("a+")
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            if time.monotonic() >= deadline:
                handle.close()
                return None
            time.sleep(1)


def release_host(handle: Any) -> None:
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
