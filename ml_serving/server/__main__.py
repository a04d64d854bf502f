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

from ml_serving.server import INVOCATIONS_ROUTE, VERSION_ENV
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
    """One MLServer with the model in this process; as `replica`, one of several sharing the inherited socket."""
    from mlserver import MLServer
    from mlserver.metrics import MetricsServer
    from mlserver.metrics.prometheus import configure_metrics
    from starlette.middleware import Middleware

    from ml_serving.server.batching import BatchGate, uvicorn_connections
    from ml_serving.server.middleware import RequestMetrics, ValidationMiddleware, runs_in_front

    settings.parallel_workers = 0  # the model runs here: no front process between the request and the model
    # Metrics in a multiprocess folder even for one process: replicas share it, and without it MLServer exports
    # none of its own registry's metrics (`batch_request_queue`). Set before MLServer makes its metrics.
    shared = settings.model_copy(update={"parallel_workers": replica.count if replica else 1})
    configure_metrics(shared)
    if replica is not None:
        settings._custom_rest_server_settings = {"fd": replica.http_fd}
    server = MLServer(settings)
    # One process serves the metrics of every replica, summed: replica 0, or the only one.
    serves_metrics = settings.metrics_endpoint and (replica is None or replica.index == 0)
    server._metrics_server = MetricsServer(shared) if serves_metrics else None
    seal_repository(server, model)
    app = server._rest_server._app
    # A route for docs and metrics to match; the middleware answers every /invocations request itself.
    app.add_api_route(INVOCATIONS_ROUTE, _served_by_middleware, methods=["POST"])
    version = model.parameters.version if model.parameters else None
    layer = {
        "model_name": model.name,
        "model_version": version,
        "inputs": inputs,
        "limits": limits,
        "data_plane": server._data_plane,
        "gate": BatchGate(uvicorn_connections(server._rest_server)),
    }
    front = None
    if runs_in_front(settings):
        metrics = RequestMetrics(settings) if settings.metrics_endpoint else None
        front = ValidationMiddleware(app, **layer, metrics=metrics, routes=app.routes)
    else:
        app.user_middleware.append(Middleware(ValidationMiddleware, **layer))
    server._add_signal_handlers()
    await start(server, model, front, layer["gate"])


async def start(server: Any, model: Any, front: Any = None, gate: Any = None) -> None:
    """MLServer's start, in an order for replicas: the metrics port, then the model, then the ports that take
    requests, so that a replica accepts requests only for a model it has loaded and a ready server is scraped.
    `front`, if any, takes the place of MLServer's REST app once the model is loaded (loading adds its routes);
    `gate`, if any, closes the loaded model's batches early (batching.close_batches_early)."""
    metrics_server = server._metrics_server
    metrics = asyncio.ensure_future(metrics_server.start()) if metrics_server else None
    while metrics and not metrics.done() and not _listening(metrics_server):
        await asyncio.sleep(0.01)
    loaded = await server._model_registry.load(model)  # ServingRuntime.load freezes the heap once it is in
    if gate is not None:
        from ml_serving.server.batching import close_batches_early

        close_batches_early(loaded, gate)
    if front is not None:
        server._rest_server._app = front
    await asyncio.gather(server._rest_server.start(), server._grpc_server.start(), *([metrics] if metrics else []))


def _listening(mlserver_server: Any) -> bool:
    """Whether one of MLServer's servers (a uvicorn server inside) has bound its port."""
    return bool(getattr(getattr(mlserver_server, "_server", None), "started", False))


def seal_repository(server: Any, model: Any) -> None:
    """A pod serves the one model its stack declares: the repository API's load and unload are refused (403) on
    REST and gRPC alike, since both call these handlers (loading at start does not go through them), and its
    index lists that model (loaded at start, not found on disk, so MLServer's own scan would list nothing)."""
    import grpc
    from mlserver.errors import MLServerError
    from mlserver.grpc import utils as grpc_utils

    from ml_serving.server.middleware import refusals
    from ml_serving.server.validation import FORBIDDEN, Refusal

    async def refuse(*args: Any, **kwargs: Any) -> bool:
        refusals().labels(model=model.name, reason=Refusal.READ_ONLY.value).inc()
        raise MLServerError(
            f"loading and unloading models is disabled here: this server serves '{model.name}', as its stack declares",
            status_code=FORBIDDEN,
        )

    async def served() -> list[Any]:
        return [model]

    handlers = server._model_repository_handlers
    handlers.load = handlers.unload = refuse
    handlers._repository.list = served
    grpc_utils.STATUS_CODE_MAPPING.setdefault(FORBIDDEN, grpc.StatusCode.PERMISSION_DENIED)


async def _served_by_middleware() -> None:
    raise NotImplementedError


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
    asyncio.run(serve(settings, model, inputs, load_limits(folder), replica))
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
