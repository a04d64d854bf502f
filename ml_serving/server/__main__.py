"""The serving image's entrypoint: `python -m ml_serving.server [MODEL]`.

Settings come from the files in the settings folder (`serving_image/` here, `/app/serving` in the image), and
environment variables win over them, because Seldon configures the container through `MLSERVER_*` variables
(ports, model name, model URI). `ml-serving serve` runs exactly this.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ml_serving.server import VERSION_ENV
from ml_serving.server.replicas import Replica, listen, supervise

DEFAULT_SETTINGS_DIR = Path(__file__).resolve().parents[2] / "serving_image"
IMAGE_SETTINGS_DIR = Path("/app/serving")
LIMITS_ENV_PREFIX = "ML_SERVING_"


def settings_dir() -> Path:
    configured = os.environ.get("ML_SERVING_SETTINGS_DIR")
    if configured:
        return Path(configured)
    return IMAGE_SETTINGS_DIR if IMAGE_SETTINGS_DIR.is_dir() else DEFAULT_SETTINGS_DIR


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _without_env(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """File values, less those an `MLSERVER_*` variable sets: the variable wins."""
    return {k: v for k, v in values.items() if f"{prefix}{k.upper()}" not in os.environ}


def load_limits(folder: Path) -> Any:
    from ml_serving.server.validation import Limits

    values = _read(folder / "limits.json")
    for field in fields(Limits):
        env = os.environ.get(f"{LIMITS_ENV_PREFIX}{field.name.upper()}")
        if env is not None:
            values[field.name] = float(env) if field.type in ("float", float) else int(env)
    return Limits(**values)


def server_settings(folder: Path) -> Any:
    from mlserver.settings import Settings

    return Settings(**_without_env(_read(folder / "settings.json"), "MLSERVER_"))


def model_settings(folder: Path, model_path: Path, name: str | None, version: str | None = None) -> Any:
    from mlserver.settings import ModelParameters, ModelSettings

    from ml_serving.server.runtime import ServingRuntime

    values = _without_env(_read(folder / "model-settings.json"), "MLSERVER_MODEL_")
    parameters = _without_env(values.pop("parameters", {}), "MLSERVER_MODEL_")
    values.pop("name", None)
    values.pop("implementation", None)
    if version:  # the registry's version; Seldon's MLSERVER_MODEL_VERSION is always "v1" and loses to it
        parameters["version"] = version
    return ModelSettings(
        name=name or os.environ.get("MLSERVER_MODEL_NAME", "model"),
        implementation=ServingRuntime,
        parameters=ModelParameters(**{**parameters, "uri": str(model_path)}),
        **values,
    )


class ModelNotFound(RuntimeError):
    """The model to serve cannot be found or fetched: a user's mistake, reported in one line, exit code 2."""


@dataclass(frozen=True)
class Served:
    """The model folder this process loads, and the registry version it is (None for a folder given by hand)."""

    path: Path
    version: str | None


def local_model(model: str, version: str | None = None) -> Served:
    """A local folder with the MLflow model, or a registry or storage URI downloaded into this process's own folder.

    `models:/NAME@ALIAS` is resolved to its version first and that version is downloaded, so an alias moving
    meanwhile cannot mix two versions; the loaded MLmodel's run must be the version's run.
    """
    path = Path(model)
    if path.is_dir():
        if not (path / "MLmodel").exists():
            raise ModelNotFound(f"{path} has no MLmodel file: point at the folder MLflow logged the model to")
        return Served(path.resolve(), version)
    if not ("://" in model or model.startswith(("models:/", "runs:/"))):
        raise ModelNotFound(f"model {model!r} is neither a folder nor a models:/, runs:/ or storage URI")
    import mlflow

    registered = _registry_version(model) if model.startswith("models:/") else None
    uri = f"models:/{registered.name}/{registered.version}" if registered else model
    target = Path(tempfile.mkdtemp(prefix="ml-serving-model-"))  # this process's own: never shared
    atexit.register(shutil.rmtree, target, True)
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except Exception as error:  # MlflowException, OSError, requests' errors: all mean "cannot fetch it"
        reason = getattr(error, "message", None) or str(error) or type(error).__name__
        raise ModelNotFound(
            f"cannot fetch {model} from the registry at {mlflow.get_registry_uri()}: {reason.strip()}\n"
            "check the model name and alias or version (`mlflow models` / the registry UI) and the tracking URI"
        ) from None
    if registered is None:
        return Served(path, version)
    from mlflow.models import Model

    loaded_run = Model.load(str(path)).run_id
    if registered.run_id and loaded_run and loaded_run != registered.run_id:
        raise ModelNotFound(
            f"{model} is version {registered.version} (run {registered.run_id}), but the folder loaded holds run "
            f"{loaded_run}: refusing to serve another model"
        )
    return Served(path, str(registered.version))


def _registry_version(model: str) -> Any:
    """The registry's model version behind `models:/NAME@ALIAS`, `models:/NAME/VERSION` (None for other forms)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    reference = model.removeprefix("models:/").rstrip("/")
    client = MlflowClient()
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = reference.partition("/")
        if version.isdigit():
            return client.get_model_version(name, version)
    except Exception as error:
        reason = getattr(error, "message", None) or str(error) or type(error).__name__
        raise ModelNotFound(
            f"cannot fetch {model} from the registry at {mlflow.get_registry_uri()}: {reason.strip()}\n"
            "check the model name and alias or version (`mlflow models` / the registry UI) and the tracking URI"
        ) from None
    return None


def own_metrics_dir(configured: str | None) -> str:
    """MLServer sums every file in its metrics folder into /metrics: a folder of this process, emptied at start.

    A folder named by MLSERVER_METRICS_DIR (the pod's own /tmp under Seldon) is emptied; otherwise a new one.
    """
    if configured:
        folder = Path(configured)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)
    folder = tempfile.mkdtemp(prefix="ml-serving-metrics-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


async def serve(settings: Any, model: Any, inputs: Any, limits: Any, replica: Replica | None = None) -> None:
    """One server with the model in this process; as `replica`, one of several sharing the inherited socket."""
    from mlserver.metrics.prometheus import configure_metrics

    from ml_serving.server.servers import FrontServer

    settings.parallel_workers = 0  # the model runs here: no front process between the request and the model
    # Metrics in a multiprocess folder even for one process: replicas share it, and without it MLServer exports
    # none of its own registry's metrics (`batch_request_queue`). Set before MLServer makes its metrics.
    shared = settings.model_copy(update={"parallel_workers": replica.count if replica else 1})
    configure_metrics(shared)
    # One process serves the metrics of every replica, summed: replica 0, or the only one.
    serves_metrics = replica is None or replica.index == 0
    server = FrontServer(
        settings,
        model,
        inputs,
        limits,
        http_fd=replica.http_fd if replica else None,
        metrics_settings=shared if serves_metrics else None,
    )
    await server.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml_serving.server", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model",
        nargs="?",
        default=os.environ.get("MLSERVER_MODEL_URI", "/mnt/models"),
        help="a local MLflow model folder, models:/NAME@ALIAS, models:/NAME/VERSION or a storage URI",
    )
    parser.add_argument("--name", help="the model name in V2 paths (default: MLSERVER_MODEL_NAME or 'model')")
    parser.add_argument(
        "--version",
        default=os.environ.get(VERSION_ENV),
        help=f"the registry version it answers as (default: {VERSION_ENV}, or the registry's for models:/ URIs)",
    )
    args = parser.parse_args(argv)
    replica = Replica.from_env()
    from ml_serving.server.mlserver_compat import IncompatibleMLServer, check_version

    try:
        check_version()
    except IncompatibleMLServer as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    folder = settings_dir()
    try:
        served = local_model(args.model, args.version)
    except ModelNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = server_settings(folder)
    if replica is None:
        settings.metrics_dir = own_metrics_dir(os.environ.get("MLSERVER_METRICS_DIR"))
        if settings.parallel_workers > 1:
            return run_replicas(settings, served, args.name)
    from mlflow.models import Model

    from ml_serving.server.validation import model_inputs

    inputs = model_inputs(Model.load(str(served.path)).signature)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    model = model_settings(folder, served.path, args.name, served.version)
    from ml_serving.server.servers import ModelLoadFailed

    try:
        asyncio.run(serve(settings, model, inputs, load_limits(folder), replica))
    except ModelLoadFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run_replicas(settings: Any, served: Served, name: str | None) -> int:
    """`parallel_workers` replicas of this server on the model already fetched, sharing the HTTP port."""
    try:
        listeners = listen(settings.host, settings.http_port, settings.parallel_workers)
    except OSError as error:
        print(f"error: cannot listen on {settings.host}:{settings.http_port}: {error.strerror}", file=sys.stderr)
        return 2
    argv = [
        str(served.path),
        *(["--name", name] if name else []),
        *(["--version", served.version] if served.version else []),
    ]
    env = {**os.environ, "MLSERVER_METRICS_DIR": settings.metrics_dir}
    return supervise(listeners, argv, env)


if __name__ == "__main__":
    sys.exit(main())
