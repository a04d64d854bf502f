"""The serving image's entrypoint: `python -m ml_serving.server [MODEL]`.

Settings come from the files in the settings folder (`serving_image/` here, `/app/serving` in the image), and
environment variables win over them, because Seldon configures the container through `MLSERVER_*` variables
(ports, model name, model URI). `ml-serving serve` runs exactly this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

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


def model_settings(folder: Path, model_path: Path, name: str | None) -> Any:
    from mlserver.settings import ModelParameters, ModelSettings

    from ml_serving.server.runtime import ServingRuntime

    values = _without_env(_read(folder / "model-settings.json"), "MLSERVER_MODEL_")
    parameters = _without_env(values.pop("parameters", {}), "MLSERVER_MODEL_")
    values.pop("name", None)
    values.pop("implementation", None)
    return ModelSettings(
        name=name or os.environ.get("MLSERVER_MODEL_NAME", "model"),
        implementation=ServingRuntime,
        parameters=ModelParameters(**{**parameters, "uri": str(model_path)}),
        **values,
    )


class ModelNotFound(RuntimeError):
    """The model to serve cannot be found or fetched: a user's mistake, reported in one line, exit code 2."""


def local_model(model: str, download_to: Path | None = None) -> Path:
    """A local folder with the MLflow model: a path as is, `models:/…` or `runs:/…` downloaded from the registry."""
    path = Path(model)
    if path.is_dir():
        if not (path / "MLmodel").exists():
            raise ModelNotFound(f"{path} has no MLmodel file: point at the folder MLflow logged the model to")
        return path.resolve()
    if "://" in model or model.startswith("models:/") or model.startswith("runs:/"):
        import mlflow

        target = download_to or Path(os.environ.get("TMPDIR", "/tmp")) / "ml-serving-models"
        target.mkdir(parents=True, exist_ok=True)
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(target)))
        except Exception as error:  # MlflowException, OSError, requests' errors: all mean "cannot fetch it"
            reason = getattr(error, "message", None) or str(error) or type(error).__name__
            raise ModelNotFound(
                f"cannot fetch {model} from the registry at {mlflow.get_registry_uri()}: {reason.strip()}\n"
                "check the model name and alias or version (`mlflow models` / the registry UI) and the tracking URI"
            ) from None
    raise ModelNotFound(f"model {model!r} is neither a folder nor a models:/, runs:/ or storage URI")


async def serve(settings: Any, model: Any, columns: Any, limits: Any) -> None:
    from mlserver import MLServer
    from starlette.middleware import Middleware

    from ml_serving.server.middleware import ValidationMiddleware

    server = MLServer(settings)
    app = server._rest_server._app
    # A route for metrics and docs to match; the middleware answers every /invocations request itself.
    app.add_api_route("/invocations", _served_by_middleware, methods=["POST"])
    version = model.parameters.version if model.parameters else None
    app.user_middleware.append(
        Middleware(
            ValidationMiddleware,
            model_name=model.name,
            model_version=version,
            columns=columns,
            limits=limits,
            data_plane=server._data_plane,
        )
    )
    server._add_signal_handlers()
    await server.start([model])


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
    args = parser.parse_args(argv)

    from mlflow.models import Model

    from ml_serving.server.validation import columns_from_signature

    folder = settings_dir()
    try:
        path = local_model(args.model)
    except ModelNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    columns = columns_from_signature(Model.load(str(path)).signature)
    settings = server_settings(folder)
    Path(settings.metrics_dir).mkdir(parents=True, exist_ok=True)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(settings, model_settings(folder, path, args.name), columns, load_limits(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
