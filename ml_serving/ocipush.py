"""Push a local Docker image (or an OCI archive) to an OCI registry with its layers uncompressed.

`docker push` gzips every layer on one core before sending it: on a busy 2-core machine a 1.2 GB serving image
took minutes, and a loopback registry gains nothing from compression. An OCI manifest may name uncompressed layers
(`application/vnd.oci.image.layer.v1.tar`, which containerd and Docker both pull), and an uncompressed layer's
digest is its diff ID, so the registry is told exactly the layers `docker image inspect` lists, and the config
blob is the image's own config (its digest is the image ID). Layers the registry already holds (in any of its
repositories) are not sent again.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


class PushError(RuntimeError):
    """The registry refused a blob or the manifest; the message names which and what it answered."""


@dataclass(frozen=True)
class Pushed:
    ref: str  # registry/repository@sha256:…
    manifest: dict
    sent: int  # layers uploaded (the rest were already there)


def split_name(name: str) -> tuple[str, str, str]:
    """`127.0.0.1:5000/a/b:tag` -> (`127.0.0.1:5000`, `a/b`, `tag`)."""
    registry, _, rest = name.partition("/")
    repository, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
    if not registry or not repository:
        raise PushError(f"{name} names no registry: push needs HOST:PORT/REPOSITORY:TAG")
    return registry, repository, tag or "latest"


class _Registry:
    def __init__(self, address: str):
        import requests

        self.base = f"http://{address}/v2"
        self.http = requests.Session()

    def has_blob(self, repository: str, digest: str) -> bool:
        return self.http.head(f"{self.base}/{repository}/blobs/{digest}", timeout=30).status_code == 200

    def mount(self, repository: str, digest: str) -> bool:
        """Link a blob another repository of this registry holds (no bytes sent)."""
        catalog = self.http.get(f"{self.base}/_catalog", timeout=30)
        for other in catalog.json().get("repositories", []) if catalog.status_code == 200 else []:
            if other != repository and self.has_blob(other, digest):
                answer = self.http.post(
                    f"{self.base}/{repository}/blobs/uploads/", params={"mount": digest, "from": other}, timeout=60
                )
                if answer.status_code == 201:
                    return True
        return False

    def upload(self, repository: str, digest: str, stream, size: int) -> None:  # type: ignore[no-untyped-def]
        start = self.http.post(f"{self.base}/{repository}/blobs/uploads/", timeout=60)
        if start.status_code != 202:
            raise PushError(f"the registry refused an upload to {repository}: HTTP {start.status_code} {start.text}")
        location = start.headers["Location"]
        if location.startswith("/"):
            location = self.base.removesuffix("/v2") + location
        separator = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        put = self.http.put(f"{location}{separator}digest={digest}", data=stream, timeout=3600, headers=headers)
        if put.status_code != 201:
            raise PushError(f"the registry refused blob {digest} in {repository}: HTTP {put.status_code} {put.text}")

    def put_manifest(self, repository: str, tag: str, body: bytes) -> str:
        answer = self.http.put(f"{self.base}/{repository}/manifests/{tag}", data=body, timeout=120,
                               headers={"Content-Type": MANIFEST})  # fmt: skip
        if answer.status_code != 201:
            raise PushError(
                f"the registry refused the manifest of {repository}:{tag}: {answer.status_code} {answer.text}"
            )
        return answer.headers["Docker-Content-Digest"]


def push_uncompressed(name: str, work_dir: Path | None = None, source: str | None = None) -> Pushed:
    """Push the local image `source` (default: `name`) as `name` (HOST:PORT/REPOSITORY:TAG) and return what the
    registry answered. No tag is added to the engine's images."""
    address, repository, _ = split_name(name)
    registry = _Registry(address)
    source = source or name
    with tempfile.TemporaryDirectory(prefix="ml-serving-push-", dir=work_dir) as folder:
        archive = Path(folder) / "image.tar"
        saved = subprocess.run(["docker", "save", "--output", str(archive), source], capture_output=True, text=True)
        if saved.returncode != 0:
            raise PushError(f"`docker save {source}` failed: {saved.stderr.strip()[-2000:]}")
        with tarfile.open(archive) as tar:
            (entry,) = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
            config = tar.extractfile(entry["Config"]).read()  # type: ignore[union-attr]
            diff_ids = json.loads(config)["rootfs"]["diff_ids"]
            if len(diff_ids) != len(entry["Layers"]):
                raise PushError(
                    f"`docker save {source}` lists {len(entry['Layers'])} layers, its config {len(diff_ids)}"
                )
            layers, sent = [], 0
            for member, digest in zip(entry["Layers"], diff_ids, strict=True):
                size = tar.getmember(member).size
                layers.append({"mediaType": LAYER, "digest": digest, "size": size})
                if registry.has_blob(repository, digest) or registry.mount(repository, digest):
                    continue
                registry.upload(repository, digest, tar.extractfile(member), size)  # the registry checks the digest
                sent += 1
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        if not registry.has_blob(repository, config_digest):
            registry.upload(repository, config_digest, config, len(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
        "layers": layers,
    }
    return _put_manifest(registry, name, json.dumps(manifest, separators=(",", ":")).encode(), sent)


def push_archive(archive: Path, name: str) -> Pushed:
    """Push the one image of an OCI archive (`ociimage.write_image`'s) as `name` (HOST:PORT/REPOSITORY:TAG)."""
    address, repository, _ = split_name(name)
    registry = _Registry(address)
    with tarfile.open(archive) as tar:
        (entry,) = json.load(tar.extractfile("index.json"))["manifests"]  # type: ignore[arg-type]

        def blob(digest: str) -> tarfile.TarInfo:
            return tar.getmember(f"blobs/sha256/{digest.split(':', 1)[1]}")

        body = tar.extractfile(blob(entry["digest"])).read()  # type: ignore[union-attr]
        manifest = json.loads(body)
        sent = 0
        for descriptor in (manifest["config"], *manifest["layers"]):
            if registry.has_blob(repository, descriptor["digest"]):
                continue
            member = blob(descriptor["digest"])
            registry.upload(repository, descriptor["digest"], tar.extractfile(member), member.size)
            sent += 1
    return _put_manifest(registry, name, body, sent)


def _put_manifest(registry: _Registry, name: str, body: bytes, sent: int) -> Pushed:
    address, repository, tag = split_name(name)
    digest = registry.put_manifest(repository, tag, body)
    if digest != "sha256:" + hashlib.sha256(body).hexdigest():
        raise PushError(f"the registry stored the manifest of {name} as {digest}, not as the bytes sent")
    return Pushed(f"{address}/{repository}@{digest}", json.loads(body), sent)
