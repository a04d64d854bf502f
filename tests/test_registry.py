"""Resolution against a real MLflow registry: aliases, moves, errors, and one lookup per (model, alias)."""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from unittest import mock

import pulumi
import pytest
from mlflow.tracking import MlflowClient

from ml_serving import labels
from ml_serving.registry import RegistryError, RegistryResolver
from tests import processes
from tests.conftest import plan_stack, stack_config

pytestmark = pytest.mark.registry


def champion_of(plan, model="churn", variant="champion"):
    (sdep,) = plan.find("SeldonDeployment", model)
    return next(p for p in sdep["spec"]["predictors"] if p["name"] == variant)


@contextmanager
def alias_moved(registry, alias, version):
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    before = client.get_model_version_by_alias("churn-classifier", alias).version
    client.set_registered_model_alias("churn-classifier", alias, version)
    try:
        yield
    finally:
        client.set_registered_model_alias("churn-classifier", alias, before)


def test_alias_resolves_to_version_uri_and_run(registry):
    resolved = RegistryResolver(registry.tracking_uri).by_alias("churn-classifier", "candidate")
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    expected = client.get_model_version("churn-classifier", "2")
    assert resolved.version == "2"
    assert resolved.run_id == expected.run_id
    assert resolved.model_uri == client.get_model_version_download_uri("churn-classifier", "2")
    assert resolved.model_uri.startswith("file://"), "Seldon needs a storage URI, not a models:/ reference"


def test_moving_an_alias_changes_the_next_plan(registry):
    before = champion_of(plan_stack("dev", registry=registry))
    with alias_moved(registry, "champion", "2"):
        after = champion_of(plan_stack("dev", registry=registry))
    assert before["labels"][labels.MODEL_VERSION] == "1"
    assert after["labels"][labels.MODEL_VERSION] == "2"
    assert before["graph"]["modelUri"] != after["graph"]["modelUri"]
    assert before["annotations"][labels.RUN_ID] != after["annotations"][labels.RUN_ID]


def test_one_registry_lookup_per_model_and_alias(registry):
    config = copy.deepcopy(stack_config("dev"))
    config["ml-serving:models"]["churn"]["variants"] = {
        "champion": {"alias": "champion", "weight": 50},
        "twin": {"alias": "champion", "weight": 50},
        "mirror": {"alias": "candidate", "shadow": True},
        "again": {"alias": "candidate", "shadow": True},
    }
    real = MlflowClient.get_model_version_by_alias
    with mock.patch.object(MlflowClient, "get_model_version_by_alias", autospec=True, side_effect=real) as spy:
        plan = plan_stack("dev", config=config, registry=registry)
    asked = sorted(call.args[1:] for call in spy.call_args_list)
    assert asked == [("churn-classifier", "candidate"), ("churn-classifier", "champion")]
    versions = {
        p["name"]: p["labels"][labels.MODEL_VERSION] for p in plan.find("SeldonDeployment")[0]["spec"]["predictors"]
    }
    assert versions == {"champion": "1", "twin": "1", "mirror": "2", "again": "2"}


def test_pinned_variants_never_touch_the_registry():
    with mock.patch.object(MlflowClient, "__init__", side_effect=AssertionError("registry contacted")):
        plan = plan_stack("prod")
    assert champion_of(plan)["labels"][labels.MODEL_VERSION] == "7"


def test_unknown_alias_names_model_alias_and_tracking_uri(registry):
    config = copy.deepcopy(stack_config("dev"))
    config["ml-serving:models"]["churn"]["variants"]["champion"]["alias"] = "gold"
    with pytest.raises(pulumi.RunError) as raised:
        plan_stack("dev", config=config, registry=registry)
    message = str(raised.value)
    assert "Pulumi.dev.yaml: ml-serving:models.churn.variants.champion.alias:" in message, "names the line to fix"
    assert "'churn-classifier' has no alias 'gold'" in message
    assert registry.tracking_uri in message
    assert "@champion→v1" in message and "@candidate→v2" in message


def test_unknown_model_is_named(registry):
    config = copy.deepcopy(stack_config("dev"))
    config["ml-serving:models"]["churn"]["registeredModel"] = "churn-clasifier"
    with pytest.raises(pulumi.RunError, match="no registered model 'churn-clasifier' in the MLflow registry at sqlite"):
        plan_stack("dev", config=config, registry=registry)


def test_unreachable_registry_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = copy.deepcopy(stack_config("dev"))
    uri = f"http://127.0.0.1:{processes.free_port()}"
    config["ml-serving:registry"] = {"trackingUri": uri}
    started = time.monotonic()
    with pytest.raises(pulumi.RunError) as raised:
        plan_stack("dev", config=config)
    message = str(raised.value)
    assert (
        f"registered model 'churn-classifier' alias 'champion': the MLflow registry at {uri} is unreachable" in message
    )
    assert time.monotonic() - started < 60


@pytest.fixture(scope="module")
def mlflow_server(registry, tmp_path_factory):
    """`mlflow server` on loopback over the session's registry database."""
    with processes.mlflow_server(registry.tracking_uri, tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


def test_resolution_over_http_against_mlflow_server(mlflow_server, registry):
    config = copy.deepcopy(stack_config("dev"))
    config["ml-serving:registry"] = {"trackingUri": mlflow_server}
    champion = champion_of(plan_stack("dev", config=config))
    assert champion["labels"][labels.MODEL_VERSION] == "1"
    with pytest.raises(RegistryError, match=f"has no alias 'gold' in the MLflow registry at {mlflow_server}"):
        RegistryResolver(mlflow_server).by_alias("churn-classifier", "gold")


def test_a_plan_reads_a_remote_models_environment_without_writing_a_lock(registry, tmp_path, monkeypatch):
    """Only `ml-serving pin` writes model-lock/: a plan that cached its download there would pin a version nobody
    reviewed, and a later plan against another registry with the same version number would read it."""
    import mlflow

    from ml_serving.modelenv import model_environment

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(registry.tracking_uri)
    try:
        environment = model_environment("churn-classifier", "1", "models:/churn-classifier/1", tmp_path / "lock")
    finally:
        mlflow.set_tracking_uri(previous)
    assert "scikit-learn" in environment.requirements
    assert not (tmp_path / "lock").exists(), "the plan wrote a lock folder"
