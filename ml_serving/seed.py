"""A small real model in a real MLflow registry, so the dev stack (and the tests) have something to resolve.

The churn classifier is an sklearn pipeline over numeric and string columns, logged with its signature and
registered; aliases are set the way a team would (`champion`, `candidate`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHURN_MODEL = "churn-classifier"
EXPERIMENT = "ml-serving-seed"
NUMERIC = ["tenure_months", "monthly_charges", "support_calls"]
CATEGORICAL = ["plan", "region"]


@dataclass(frozen=True)
class Seeded:
    model: str
    version: str
    aliases: tuple[str, ...]
    created: bool


def churn_frame(rows: int = 400, random_state: int = 0) -> tuple[Any, Any]:
    """Synthetic customers and whether they churned: the label depends on both kinds of column."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(random_state)
    frame = pd.DataFrame(
        {
            "tenure_months": rng.integers(1, 72, rows).astype("int64"),
            "monthly_charges": rng.uniform(10, 120, rows).round(2),
            "support_calls": rng.integers(0, 8, rows).astype("int64"),
            "plan": rng.choice(["basic", "standard", "premium"], rows),
            "region": rng.choice(["north", "south", "east", "west"], rows),
        }
    )
    risk = (
        0.04 * frame["monthly_charges"]
        - 0.06 * frame["tenure_months"]
        + 0.5 * frame["support_calls"]
        + frame["plan"].map({"basic": 1.0, "standard": 0.0, "premium": -1.0})
    )
    return frame, (risk + rng.normal(0, 0.5, rows) > 0).astype("int64")


def train_churn_model(random_state: int = 0) -> tuple[Any, Any]:
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    features, labels = churn_frame(random_state=random_state)
    pipeline = Pipeline(
        [
            (
                "features",
                ColumnTransformer(
                    [
                        ("numeric", StandardScaler(), NUMERIC),
                        ("categorical", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL),
                    ]
                ),
            ),
            ("classifier", LogisticRegression(max_iter=500, C=1.0 / (1 + random_state))),
        ]
    )
    pipeline.fit(features, labels)
    return pipeline, features


def model_requirements() -> list[str]:
    """Exactly what loading the pipeline needs, pinned to what trained it (inference would add test tools)."""
    from importlib.metadata import version

    return [
        f"{package}=={version(package)}" for package in ("mlflow", "scikit-learn", "pandas", "numpy", "scipy", "skops")
    ]


def sqlite_database(tracking_uri: str, base: Path | None = None) -> Path | None:
    """The database file of a sqlite registry (a relative one is relative to `base`, by default the working
    folder); None for any other registry. Its folder is the dev registry's: the artifacts live next to it."""
    if urlparse(tracking_uri).scheme != "sqlite":
        return None
    return ((base or Path.cwd()) / tracking_uri.removeprefix("sqlite:///")).resolve()


def _artifact_location(tracking_uri: str) -> str | None:
    """Next to a sqlite registry file, so the whole dev registry lives in one folder."""
    database = sqlite_database(tracking_uri)
    if database is None:
        return None
    database.parent.mkdir(parents=True, exist_ok=True)
    return (database.parent / "artifacts").as_uri()


def register_churn_model(
    tracking_uri: str, name: str = CHURN_MODEL, aliases: tuple[str, ...] = (), random_state: int = 0
) -> str:
    """Train, log and register one new version of the churn model; return its version number."""
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    artifact_location = _artifact_location(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
    )
    pipeline, features = train_churn_model(random_state)
    example = features.head(3)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with warnings.catch_warnings(), mlflow.start_run(experiment_id=experiment_id):
        warnings.simplefilter("ignore")  # mlflow's hints about integer columns are about other people's data
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=infer_signature(example, pipeline.predict(example)),
            input_example=example,
            registered_model_name=name,
            pip_requirements=model_requirements(),
        )
    version = str(info.registered_model_version)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    return version


def seed(tracking_uri: str, name: str = CHURN_MODEL) -> Seeded:
    """Make sure `name@champion` exists; a registry that already has it is left as it is."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _artifact_location(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        existing = client.get_model_version_by_alias(name, "champion")
        return Seeded(name, str(existing.version), ("champion",), created=False)
    except MlflowException:
        pass
    version = register_churn_model(tracking_uri, name, aliases=("champion",))
    return Seeded(name, version, ("champion",), created=True)
