"""The node's pure parts (no root, no binaries): its pod network, its image archives, its rule filter."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from ml_serving import localnode, nodehost
from ml_serving.ociimage import IMAGE_NAME_ANNOTATION, binary_image


def test_the_pod_network_has_no_masquerade_and_its_own_address_store(tmp_path: Path) -> None:
    subnet = ipaddress.ip_network("10.244.7.0/24")
    conflist = localnode.cni_conflist("mlsbrabc", subnet, tmp_path)
    bridge = conflist["plugins"][0]
    assert bridge["ipMasq"] is False  # pods answer this host; nothing is routed out
    assert bridge["ipam"]["dataDir"] == str(tmp_path)
    assert bridge["ipam"]["ranges"][0][0] == {
        "subnet": "10.244.7.0/24",
        "gateway": "10.244.7.1",
        "rangeStart": "10.244.7.2",
    }


def test_the_subnet_avoids_every_address_and_route_on_the_host(monkeypatch) -> None:
    used = "2: eth0    inet 10.244.5.1/24 brd 10.244.5.255 scope global eth0\n10.244.6.0/24 dev x\n"

    def fake_run(command, **_):
        return subprocess.CompletedProcess(command, 0, stdout=used, stderr="")

    monkeypatch.setattr(localnode.subprocess, "run", fake_run)
    assert str(localnode.pick_subnet(seed=4)) == "10.244.7.0/24"


def test_only_the_nodes_rules_are_the_nodes() -> None:
    tables = {"nat": [":DOCKER", "-A PREROUTING -j DOCKER", ":KUBE-SERVICES", "-A OUTPUT -j KUBE-SERVICES"]}
    assert nodehost.node_rules(tables) == {("nat", ":KUBE-SERVICES"), ("nat", "-A OUTPUT -j KUBE-SERVICES")}


def test_a_binary_image_is_an_oci_layout_containerd_can_name(tmp_path: Path) -> None:
    binary = tmp_path / "node-pause"
    binary.write_bytes(b"\x7fELF fake")
    archive = binary_image(tmp_path / "pause.tar", "localhost/ml-serving/pause:1", binary)
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        manifest_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{manifest_digest}"))
        config = json.load(tar.extractfile(f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"))
        layer = tar.extractfile(f"blobs/sha256/{manifest['layers'][0]['digest'].split(':')[1]}").read()
    assert index["manifests"][0]["annotations"][IMAGE_NAME_ANNOTATION] == "localhost/ml-serving/pause:1"
    assert config["config"]["Entrypoint"] == ["/node-pause"]
    assert config["rootfs"]["diff_ids"] == [manifest["layers"][0]["digest"]]
    with tarfile.open(fileobj=__import__("io").BytesIO(layer)) as inner:
        member = inner.getmember("node-pause")
        assert member.mode == 0o755 and inner.extractfile(member).read() == b"\x7fELF fake"


def test_the_node_pulls_the_chart_and_project_images_from_its_own_registry(tmp_path: Path) -> None:
    """The kubelet pulls the names the chart and the plan give (docker.io/seldonio/…, localhost/…) from the local
    OCI registry: containerd's hosts files map each registry to it, and the image is pushed where they look."""
    import tomllib

    from ml_serving.nodeimages import on_mirror

    hosts = localnode.mirror_hosts("127.0.0.1:5001")
    assert set(hosts) == {"docker.io", "localhost"}
    for text in hosts.values():
        assert tomllib.loads(text) == {"host": {"http://127.0.0.1:5001": {"capabilities": ["pull", "resolve"]}}}
    config = tomllib.loads(localnode.containerd_config(tmp_path, tmp_path / "s.sock", tmp_path / "cni", tmp_path / "d"))
    assert config["plugins"]["io.containerd.grpc.v1.cri"]["registry"] == {"config_path": str(tmp_path / "d")}
    assert (
        "registry"
        not in tomllib.loads(localnode.containerd_config(tmp_path, tmp_path / "s.sock", tmp_path / "cni"))["plugins"][
            "io.containerd.grpc.v1.cri"
        ]
    )

    assert on_mirror("seldonio/rclone-storage-initializer:1.18.2", "127.0.0.1:5001") == (
        "127.0.0.1:5001/seldonio/rclone-storage-initializer:1.18.2"
    )
    assert on_mirror("docker.io/seldonio/seldon-core-executor:1.18.2", "127.0.0.1:5001") == (
        "127.0.0.1:5001/seldonio/seldon-core-executor:1.18.2"
    )
    assert (
        on_mirror("localhost/ml-serving-dev/churn:abc", "127.0.0.1:5001") == "127.0.0.1:5001/ml-serving-dev/churn:abc"
    )
    assert on_mirror("python:3.11", "127.0.0.1:5001") == "127.0.0.1:5001/library/python:3.11"
    with pytest.raises(ValueError, match=r"quay\.io/x/y:1: a node pulls only docker\.io, localhost images"):
        on_mirror("quay.io/x/y:1", "127.0.0.1:5001")  # containerd would never ask the mirror for it
