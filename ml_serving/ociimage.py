"""A one-layer OCI image archive from a few files, for the images a local node needs and nothing can pull.

The pause image and the node's test image are a single static binary each; an OCI image layout (a tar of
`oci-layout`, `index.json` and `blobs/sha256/…`) is all `ctr images import` needs, so no image builder is involved.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

# containerd's importer names the image from this index annotation.
IMAGE_NAME_ANNOTATION = "io.containerd.image.name"


def _add(archive: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    archive.addfile(info, io.BytesIO(data))


def layer_tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An uncompressed layer: {path in the image: (content, mode)}, parent folders added."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as layer:
        folders = sorted({str(parent) for p in files for parent in Path(p).parents} - {"."})  # every ancestor
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            layer.addfile(info)
        for path, (content, mode) in sorted(files.items()):
            _add(layer, path, content, mode)
    return buffer.getvalue()


def write_image(
    destination: Path,
    name: str,
    files: dict[str, tuple[bytes, int]],
    entrypoint: list[str],
    user: str = "65535:65535",
    env: tuple[str, ...] = (),
) -> Path:
    """Write an OCI archive of one image called `name` (a full reference, e.g. `localhost/ml-serving/pause:1`)."""
    layer = layer_tar(files)
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "User": user, "Env": list(env)},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        },
        sort_keys=True,
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": len(layer)}
            ],
        },
        sort_keys=True,
    ).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {IMAGE_NAME_ANNOTATION: name, "org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(destination, "w") as archive:
        _add(archive, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add(archive, "index.json", json.dumps(index).encode())
        for digest, blob in ((layer_digest, layer), (config_digest, config), (manifest_digest, manifest)):
            _add(archive, f"blobs/sha256/{digest.split(':')[1]}", blob)
    return destination


def binary_image(destination: Path, name: str, binary: Path, args: tuple[str, ...] = ()) -> Path:
    """An image whose only file is `binary` at `/<its name>`, run as its entrypoint (non-root)."""
    path = binary.name
    return write_image(destination, name, {path: (binary.read_bytes(), 0o755)}, [f"/{path}", *args])
