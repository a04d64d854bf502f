"""The Seldon images a node's pods need, made here from binaries `./run tools` builds (nothing beyond this machine
can be pulled), and where the node's registry holds each image its pods run.

Named as the operator's chart names them (the manager's `EXECUTOR_CONTAINER_IMAGE_AND_VERSION`, `seldon-config`'s
`storageInitializer.image`: `seldon_images` reads both from the rendered chart), so the pods it generates find them
in the node's registry with `imagePullPolicy: IfNotPresent`: the executor sidecar (entrypoint `/executor`, user
8888, as upstream's Dockerfile.executor) and the rclone storage initializer (entrypoint `rclone copy`, user 8888,
the `gs` remote its Dockerfile defines).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_serving.ociimage import write_image

SELDON_USER = "8888"
EXECUTOR_BINARY = "seldon-executor"  # as `./run tools` names it
# The registries whose names a node's pods run, which its containerd pulls from the local OCI registry instead
# (`LocalNode.mirror`): the Seldon chart's images (docker.io/seldonio/…) and the project's own (localhost/…).
# Both land in one namespace of that registry: `docker.io/x/y` and `localhost/x/y` would be the same repository.
MIRRORED_REGISTRIES = ("docker.io", "localhost")
EXECUTOR_ENV = "EXECUTOR_CONTAINER_IMAGE_AND_VERSION"
INITIALIZER_KEY = "storageInitializer"


@dataclass(frozen=True)
class SeldonImages:
    executor: str
    initializer: str


def full_reference(image: str) -> str:
    """The reference containerd's CRI resolves `image` to (`seldonio/x:1` is `docker.io/seldonio/x:1`)."""
    first, _, rest = image.partition("/")
    if not rest:
        return f"docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def repository_path(image: str) -> str:
    """`image` without its registry: the repository and tag a mirror holds it under (`seldonio/x:1`); an image
    of a registry the node does not mirror is a ValueError (its pull would never reach the mirror)."""
    registry, _, path = full_reference(image).partition("/")
    if registry not in MIRRORED_REGISTRIES:
        raise ValueError(f"{image}: a node pulls only {', '.join(MIRRORED_REGISTRIES)} images from its registry")
    return path


def on_mirror(image: str, mirror: str) -> str:
    """Where `image` sits in the registry `mirror` (HOST:PORT) that the node's containerd pulls its names from:
    the same repository and tag (`docker.io/seldonio/x:1` -> `127.0.0.1:5001/seldonio/x:1`)."""
    return f"{mirror}/{repository_path(image)}"


def seldon_images(manager_env: dict[str, str], config_map: dict[str, Any]) -> SeldonImages:
    """The images the operator puts in pods, from its chart's output (`localoperator.manager_settings`)."""
    initializer = json.loads(config_map["data"][INITIALIZER_KEY])["image"]
    return SeldonImages(full_reference(manager_env[EXECUTOR_ENV]), full_reference(initializer))


def executor_image(bin_dir: Path, folder: Path, name: str) -> Path:
    binary = (bin_dir / EXECUTOR_BINARY).read_bytes()
    return write_image(folder / "executor.tar", name, {"executor": (binary, 0o755)}, ["/executor"], SELDON_USER)


def initializer_image(bin_dir: Path, folder: Path, name: str) -> Path:
    """rclone as upstream's initializer image runs it: `rclone copy SRC DEST`, remotes from the environment."""
    binary = (bin_dir / "rclone").read_bytes()
    return write_image(
        folder / "rclone-storage-initializer.tar",
        name,
        {"usr/local/bin/rclone": (binary, 0o755)},
        ["/usr/local/bin/rclone", "copy"],
        SELDON_USER,
        env=(
            "PATH=/usr/local/bin",
            "HOME=/tmp",
            "RCLONE_CONFIG_GS_TYPE=google cloud storage",
            "RCLONE_CONFIG_GS_ANONYMOUS=true",
            "RCLONE_VERBOSE=1",
        ),
    )
