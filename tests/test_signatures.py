"""A challenger that refuses what the champion's clients send is caught before it gets traffic: plan, pin, rollout."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_serving.signatures import SignatureError, breaking_changes, check_variants
from tests.conftest import copy_project, plan_stack, stack_config

COLUMNS = [{"type": "long", "name": "tenure_months", "required": True},
           {"type": "string", "name": "plan", "required": True}]  # fmt: skip


def test_breaking_changes_name_new_required_inputs_and_changed_types():
    assert breaking_changes(COLUMNS, COLUMNS) == []
    optional = [*COLUMNS, {"type": "string", "name": "region", "required": False}]
    assert breaking_changes(COLUMNS, optional) == [], "a new optional input breaks nobody"
    needs_more = [*COLUMNS, {"type": "string", "name": "contract_type", "required": True}]
    assert breaking_changes(COLUMNS, needs_more) == [
        "requires input 'contract_type' (string), which the champion does not take"
    ]
    retyped = [{"type": "double", "name": "tenure_months", "required": True}, COLUMNS[1]]
    assert breaking_changes(COLUMNS, retyped) == ["input 'tenure_months' changed from long to double"]
    assert breaking_changes(None, needs_more) == [] and breaking_changes(COLUMNS, None) == [], "nothing to compare"
    with pytest.raises(SignatureError, match=r"models.churn.variants.challenger requires input 'contract_type'.*"
                                             r"models.churn.allowBreakingSignature: true"):  # fmt: skip
        check_variants("models.churn", {"champion": COLUMNS, "challenger": needs_more}, "champion")


@pytest.fixture(scope="module")
def incompatible(tmp_path_factory) -> str:
    """A registry with churn-classifier v1 (@champion, the seeded model) and v2 that needs one more column."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from ml_serving.seed import EXPERIMENT, churn_frame, seed

    uri = f"sqlite:///{tmp_path_factory.mktemp('incompatible') / 'registry.db'}"
    seed(uri)
    frame, _ = churn_frame(rows=5)
    frame = frame.assign(contract_type="monthly")
    code = Path(__file__).resolve().parent / "fixtures" / "flaky_model.py"  # any model: the signature is the point
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment.experiment_id):  # artifacts beside the registry, not in ./mlruns
        mlflow.pyfunc.log_model(name="model", python_model=str(code), registered_model_name="churn-classifier",
                                signature=infer_signature(frame, pd.Series([0] * len(frame))),
                                pip_requirements=["mlflow"])  # fmt: skip
    return uri


def dev_with_challenger(uri: str, allow: bool = False) -> dict:
    config = stack_config("dev")
    config["ml-serving:registry"] = {"trackingUri": uri}
    churn = config["ml-serving:models"]["churn"]
    churn["variants"] = {"champion": {"alias": "champion", "weight": 90}, "challenger": {"version": "2", "weight": 10}}
    if allow:
        churn["allowBreakingSignature"] = True
    return config


@pytest.mark.registry
def test_plan_refuses_a_challenger_needing_a_column_the_clients_do_not_send(incompatible):
    import pulumi

    with pytest.raises(pulumi.RunError, match="challenger requires input 'contract_type' \\(string\\)"):
        plan_stack("dev", dev_with_challenger(incompatible))
    allowed = plan_stack("dev", dev_with_challenger(incompatible, allow=True))
    assert len(allowed.find("SeldonDeployment")[0]["spec"]["predictors"]) == 2, "a deliberate break is accepted"


@pytest.mark.registry
def test_pin_and_rollout_refuse_it_too(incompatible, tmp_path):
    from ml_serving.pin import pin_stack
    from ml_serving.rollout import Mode, Prometheus, PulumiStack, RolloutError, rollout_run
    from ml_serving.settings import ConfigError

    project = copy_project(tmp_path / "project")
    path = project / "Pulumi.dev.yaml"
    path.write_text(path.read_text().replace(
        "        champion: {alias: champion, weight: 100}",
        "        champion: {alias: champion, weight: 100}\n        challenger: {version: \"2\", weight: 0}",
    ).replace("sqlite:///.mlflow/registry.db", incompatible).replace(
        "      variants:", "      rollout: {stages: [50, 100]}\n      variants:"))  # fmt: skip
    before = path.read_text()
    with pytest.raises(ConfigError, match="contract_type"):
        pin_stack(project, "dev")
    assert path.read_text() == before, "nothing pinned"
    runner = rollout_run(project, "dev", "churn", Prometheus("http://127.0.0.1:9"), PulumiStack(project, "dev"),
                        project / "rollouts" / "log.jsonl", mode=Mode.RUN, report=lambda _: None)  # fmt: skip
    with pytest.raises(RolloutError, match="requires input 'contract_type'"):
        runner.run()
    assert path.read_text() == before, "nothing written before the first stage"


@pytest.fixture(scope="module")
def unsigned_version(incompatible) -> str:
    """churn-classifier v3 in the same registry, logged without a signature."""
    import mlflow

    from ml_serving.seed import EXPERIMENT

    code = Path(__file__).resolve().parent / "fixtures" / "flaky_model.py"
    experiment = mlflow.MlflowClient(tracking_uri=incompatible).get_experiment_by_name(EXPERIMENT)
    mlflow.set_tracking_uri(incompatible)
    with mlflow.start_run(experiment_id=experiment.experiment_id):  # artifacts beside the registry
        mlflow.pyfunc.log_model(name="model", python_model=str(code), registered_model_name="churn-classifier",
                                pip_requirements=["mlflow"])  # fmt: skip
    versions = mlflow.MlflowClient(tracking_uri=incompatible).search_model_versions("name='churn-classifier'")
    return max(versions, key=lambda v: int(v.version)).version


@pytest.mark.registry
def test_plan_and_pin_warn_about_a_version_without_a_signature(incompatible, unsigned_version, tmp_path, caplog):
    from ml_serving.pin import pin_stack

    config = dev_with_challenger(incompatible)
    config["ml-serving:models"]["churn"]["variants"]["challenger"]["version"] = unsigned_version
    with caplog.at_level("WARNING"):
        plan_stack("dev", config)
    expected = f"models.churn.variants.challenger: churn-classifier version {unsigned_version} has no signature"
    assert any(expected in record.getMessage() for record in caplog.records), caplog.text
    project = copy_project(tmp_path / "project")
    path = project / "Pulumi.dev.yaml"
    path.write_text(path.read_text().replace(
        "        champion: {alias: champion, weight: 100}",
        f"        champion: {{alias: champion, weight: 100}}\n        challenger: {{version: \"{unsigned_version}\", weight: 0}}",
    ).replace("sqlite:///.mlflow/registry.db", incompatible))  # fmt: skip
    heard: list[str] = []
    pin_stack(project, "dev", warn=heard.append)
    assert [m for m in heard if expected in m], heard
