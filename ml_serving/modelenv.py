"""What a model's serving image must carry, read from its MLflow files: requirements, Python version, signature.

Below both `image` (which builds from it) and `signatures` (which compares what it read), so neither imports the
other. A model is read from a lock folder written by `ml-serving pin` when there is one, else from the registry.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

LOCK_DIR = Path(__file__).resolve().parent.parent / "model-lock"
DEFAULT_PYTHON = "3.11.14"


class ImageError(RuntimeError):
    """The model's environment could not be read: the message names the model and what to do."""


@dataclass(frozen=True)
class ModelEnvironment:
    """What the image must carry for one model version."""

    requirements: str
    python_version: str
    signature_inputs: tuple[dict[str, Any], ...] | None = None  # from the MLmodel file, when there is one


def inputs_of(mlmodel: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The input specs of an MLmodel file's signature (None when the model was logged without one)."""
    signature = (mlmodel or {}).get("signature") or {}
    raw = signature.get("inputs")
    if not raw:
        return None
    return json.loads(raw) if isinstance(raw, str) else list(raw)


def lock_path(registered_model: str, version: str, lock_dir: Path = LOCK_DIR) -> Path:
    return lock_dir / registered_model / f"v{version}"


def read_environment(folder: Path) -> ModelEnvironment:
    requirements = folder / "requirements.txt"
    if not requirements.exists():
        raise ImageError(f"{folder} has no requirements.txt: log the model with MLflow >= 2, which writes one")
    python = DEFAULT_PYTHON
    python_env = folder / "python_env.yaml"
    if python_env.exists():
        python = str((yaml.safe_load(python_env.read_text()) or {}).get("python") or DEFAULT_PYTHON)
    inputs = None
    if (folder / "MLmodel").exists():
        found = inputs_of(yaml.safe_load((folder / "MLmodel").read_text()))
        inputs = tuple(found) if found is not None else None
    return ModelEnvironment(requirements.read_text(), python, inputs)


def model_environment(
    registered_model: str, version: str, model_uri: str, lock_dir: Path = LOCK_DIR
) -> ModelEnvironment:
    """From the lock folder if `ml-serving pin` wrote one, else downloaded from the model's artifacts."""
    locked = lock_path(registered_model, version, lock_dir)
    if (locked / "requirements.txt").exists():
        return read_environment(locked)
    if model_uri.startswith("file://") or Path(model_uri).is_dir():
        return read_environment(Path(model_uri.removeprefix("file://")))
    # Only `ml-serving pin` writes lock folders: a plan that wrote one would pin a version nobody reviewed (and a
    # later plan against another registry with the same version number would read it).
    with tempfile.TemporaryDirectory(prefix="ml-serving-model-env-") as folder:
        return read_environment(download_environment(model_uri, Path(folder)))


def download_environment(model_uri: str, target: Path) -> Path:
    """Fetch only `requirements.txt`, `python_env.yaml` and `MLmodel` (its signature): small, enough to build from."""
    import mlflow

    target.mkdir(parents=True, exist_ok=True)
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri.rstrip('/')}/requirements.txt", dst_path=str(target)
        )
    except Exception as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ImageError(
            f"cannot read requirements.txt of {model_uri} ({type(exc).__name__}): make the artifact store reachable, "
            "or run `ml-serving pin STACK` where it is, which keeps a copy under model-lock/"
        ) from None
    for name in ("python_env.yaml", "MLmodel"):
        download_optional(model_uri, name, target)
    return target


def download_optional(model_uri: str, name: str, target: Path) -> bool:
    """One more file of the model if it has it (older models lack python_env.yaml; MLmodel may be unreadable)."""
    import mlflow

    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/{name}", dst_path=str(target))
    except Exception:
        return False
    return True
