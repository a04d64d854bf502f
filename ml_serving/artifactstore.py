"""A real S3 artifact store on this machine: `rclone serve s3` over a folder (the dev registry's artifacts).

Each top-level folder of `root` is a bucket, so a model at `root/B/K` is `s3://B/K`. It listens on an address the
node's pods reach (the pod bridge's gateway, never an outside interface), so Seldon's storage initializer downloads
the model over S3 exactly as from a cloud bucket, with the stack's `artifactStore.rclone` variables. Stopped by PID.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ml_serving.localcluster import ClusterError
from ml_serving.processes import LoggedProcess, free_port, listening

RCLONE_BINARY = "rclone"
REMOTE = "s3"  # the URIs' scheme: the initializer copies s3://b/k from rclone's remote `s3:b/k`


def s3_uri(root: Path, path: Path | str) -> str:
    """The s3:// URI of `path` (a folder or file under `root`) as `rclone serve s3 root` serves it."""
    relative = Path(path).resolve().relative_to(Path(root).resolve())
    if len(relative.parts) < 2:
        raise ValueError(f"{path}: a model must sit inside a bucket folder of {root}, not at its top")
    return f"{REMOTE}://{relative.as_posix()}"


@dataclass
class S3Store(LoggedProcess):
    """`rclone serve s3 root` on `host` (e.g. the node's gateway IP) with one generated key pair."""

    bin_dir: Path
    root: Path
    host: str
    log: Path
    port: int = 0
    access_key: str = field(default_factory=lambda: secrets.token_hex(8))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    process: subprocess.Popen | None = None
    error = ClusterError

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def rclone_env(self) -> dict[str, str]:
        """The stack's `artifactStore.rclone`: rclone's variables for the `s3` remote that reaches this store."""
        prefix = f"RCLONE_CONFIG_{REMOTE.upper()}_"
        return {
            f"{prefix}TYPE": "s3",
            f"{prefix}PROVIDER": "Rclone",
            f"{prefix}ENDPOINT": self.endpoint,
            f"{prefix}ACCESS_KEY_ID": self.access_key,
            f"{prefix}SECRET_ACCESS_KEY": self.secret_key,
            f"{prefix}ENV_AUTH": "false",
        }

    def client_env(self) -> dict[str, str]:
        """What MLflow (boto3) on this machine needs to read the store: a plan reads the model's requirements."""
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, seconds: float = 60) -> S3Store:
        binary = self.bin_dir / RCLONE_BINARY
        if not binary.exists():
            raise ClusterError(f"{binary} is not built: run `tools/build.sh rclone` (or `./run tools`)")
        self.port = self.port or free_port(self.host)
        self.spawn(
            [str(binary), "serve", "s3", str(self.root), "--addr", f"{self.host}:{self.port}",
             "--auth-key", f"{self.access_key},{self.secret_key}", "--config", "/dev/null", "-v",
             # A model version registered after the start is there at once, as on S3 (rclone's VFS keeps a
             # folder's listing for 5 minutes by default).
             "--dir-cache-time", "1s"],
            "rclone serve s3", lambda: listening(self.host, self.port), seconds,
        )  # fmt: skip
        return self
