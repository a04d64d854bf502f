"""The build context of a serving image, generated per model version, and its content-addressed tag.

The context holds the model's own `requirements.txt` unchanged, the server's additions, the files in
`serving_image/` and the server code. The tag is a hash of exactly that (plus the model reference when the
model is baked in), so the same requirements and the same `serving_image/` give the same tag: no diff, no
rebuild. A model is read from a lock folder written by `ml-serving pin` when there is one (so a pinned stack
plans offline), else from the registry.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ml_serving.modelenv import (  # noqa: F401 (re-exported: what a model's image is built from, read apart)
    DEFAULT_PYTHON,
    LOCK_DIR,
    ImageError,
    ModelEnvironment,
    download_environment,
    download_optional,
    lock_path,
    model_environment,
    read_environment,
)
from ml_serving.runtimes import Runtime

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PACKAGE_DIR.parent
SERVING_IMAGE_DIR = PROJECT_DIR / "serving_image"
BENTOML_IMAGE_DIR = SERVING_IMAGE_DIR / "bentoml"
BENTOML_PORT = 3000  # where the BentoML image listens (its Dockerfile's ENTRYPOINT)
SETTINGS_FILES = ("settings.json", "model-settings.json", "limits.json")
BAKED_MODEL_PATH = "/app/model"
# The image's ports, owned by its MLServer settings file (`ml-serving serve` defaults to them too).
IMAGE_SETTINGS = json.loads((SERVING_IMAGE_DIR / "settings.json").read_text())
HTTP_PORT: int = IMAGE_SETTINGS["http_port"]
GRPC_PORT: int = IMAGE_SETTINGS["grpc_port"]
METRICS_PORT: int = IMAGE_SETTINGS["metrics_port"]
# The image's user, owned by its Dockerfile; high, so it maps to no user of the node.
SERVING_UID: int = int(re.search(r"^USER (\d+):", (SERVING_IMAGE_DIR / "Dockerfile").read_text(), re.M).group(1))


@dataclass(frozen=True)
class BuildContext:
    """Files of the build context by relative path; the model folder itself is added at build time if baked."""

    files: dict[str, bytes]
    python_version: str
    bake_from: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + self.files[path] + b"\0")
        digest.update(f"python={self.python_version}\0bake={self.bake_from or ''}".encode())
        return digest.hexdigest()[:16]


def server_files(gpu: bool = False, runtime: str = Runtime.MLSERVER) -> dict[str, bytes]:
    """The server code and the settings, as the image lays them out under /app; GPU builds use Dockerfile.gpu,
    the BentoML runtime its own Dockerfile and requirements (serving_image/bentoml/)."""
    if runtime == Runtime.BENTOML:
        files = {"Dockerfile": (BENTOML_IMAGE_DIR / "Dockerfile").read_bytes()}
        files["requirements-server.txt"] = (BENTOML_IMAGE_DIR / "requirements.txt").read_bytes()
    else:
        files = {"Dockerfile": (SERVING_IMAGE_DIR / ("Dockerfile.gpu" if gpu else "Dockerfile")).read_bytes()}
        files["requirements-server.txt"] = (SERVING_IMAGE_DIR / "requirements.txt").read_bytes()
    for name in SETTINGS_FILES:
        files[f"serving/{name}"] = (SERVING_IMAGE_DIR / name).read_bytes()
    files["app/ml_serving/__init__.py"] = (PACKAGE_DIR / "__init__.py").read_bytes()
    for source in sorted((PACKAGE_DIR / "server").glob("*.py")):
        files[f"app/ml_serving/server/{source.name}"] = source.read_bytes()
    return files


def build_context(
    environment: ModelEnvironment, bake_from: str | None = None, gpu: bool = False, runtime: str = Runtime.MLSERVER
) -> BuildContext:
    files = {**server_files(gpu, runtime), "requirements-model.txt": environment.requirements.encode()}
    build_args = {"PYTHON_VERSION": environment.python_version}
    if bake_from:
        build_args["MODEL_URI"] = BAKED_MODEL_PATH
    files["Dockerfile"] = with_arg_defaults(files["Dockerfile"].decode(), build_args).encode()
    return BuildContext(files, environment.python_version, bake_from, build_args)


def with_arg_defaults(dockerfile: str, values: dict[str, str]) -> str:
    """The Dockerfile with these `ARG NAME=default` lines set to `values`, so a plain `docker build <context>`
    builds what the stack means (the build args stay too, for builders that pass them)."""
    for name, value in values.items():
        dockerfile, count = re.subn(rf"^ARG {name}=\S*$", f"ARG {name}={value}", dockerfile, flags=re.M)
        if count == 0:
            raise ImageError(f"the serving image's Dockerfile has no `ARG {name}=...` line to set")
    return dockerfile


@dataclass(frozen=True)
class PreparedContext:
    """A build context laid out on disk, ready for `docker build`."""

    context: BuildContext
    path: Path


def write_context(context: BuildContext, out_dir: Path, with_model: bool) -> Path:
    """Lay the context out in `out_dir`; a baked model is downloaded into `model/` only when `with_model`."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for relative, content in context.files.items():
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    model_dir = out_dir / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / ".keep").write_text("the model is baked in here when the stack says bake: true\n")
    if context.bake_from and with_model:
        import mlflow

        staging = out_dir / ".download"
        fetched = Path(mlflow.artifacts.download_artifacts(artifact_uri=context.bake_from, dst_path=str(staging)))
        for item in fetched.iterdir():
            shutil.move(str(item), model_dir / item.name)
        shutil.rmtree(staging)
    return out_dir
