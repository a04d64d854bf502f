"""The Seldon images a node's pods need, made here from binaries `./run tools` builds (nothing can be pulled).

Named as the operator's `seldon-config` and manager env name them, so the pods it generates find them with
`imagePullPolicy: IfNotPresent`: the executor sidecar (entrypoint `/executor`, user 8888, as upstream's
Dockerfile.executor) and the rclone storage initializer (entrypoint `rclone copy`, user 8888, the `gs` remote its
Dockerfile defines).
"""

from __future__ import annotations

from pathlib import Path

from ml_serving.ociimage import write_image

SELDON_VERSION = "1.18.2"
EXECUTOR_IMAGE = f"docker.io/seldonio/seldon-core-executor:{SELDON_VERSION}"
INITIALIZER_IMAGE = f"docker.io/seldonio/rclone-storage-initializer:{SELDON_VERSION}"
SELDON_USER = "8888"


def executor_image(bin_dir: Path, folder: Path) -> Path:
    binary = (bin_dir / "seldon-executor").read_bytes()
    return write_image(
        folder / "executor.tar", EXECUTOR_IMAGE, {"executor": (binary, 0o755)}, ["/executor"], SELDON_USER
    )


def initializer_image(bin_dir: Path, folder: Path) -> Path:
    binary = (bin_dir / "rclone").read_bytes()
    return write_image(
        folder / "rclone-storage-initializer.tar",
        INITIALIZER_IMAGE,
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
