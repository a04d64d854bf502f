"""Malformed stack config fails before any resource is declared, naming the stack file, the path and the fix."""

from __future__ import annotations

import copy
import subprocess
import sys

import pulumi
import pytest

from ml_serving.plan import run_program
from ml_serving.settings import ConfigError
from ml_serving.stackfile import load_settings
from tests.conftest import PROJECT_DIR, copy_project, stack_config


def churn(config):
    return config["ml-serving:models"]["churn"]


def set_weight(config, variant, weight):
    churn(config)["variants"][variant]["weight"] = weight


def rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


def render_yaml_with_hpa(config):
    """A stack that renders YAML, with every chart 'existing' except the adapter that hpa + monitoring need."""
    config["ml-serving:kubernetes"] = {"renderYamlToDirectory": "rendered/x"}
    config["ml-serving:platform"].update(seldon="existing", keda="existing", autoscaler="hpa")
    config["ml-serving:gpu"].update(devicePlugin="existing", dcgmExporter="existing")
    config["ml-serving:monitoring"]["stack"] = "existing"
    for model in config["ml-serving:models"].values():  # hpa refuses a scaling behaviour: a refusal of its own
        for key in ("scaleUp", "scaleDown"):
            model.get("autoscaling", {}).pop(key, None)


# (id, edit of the prod config, config path expected in the message, words of the fix expected in the message)
CASES = [
    ("render-yaml-with-the-hpa-adapter", render_yaml_with_hpa, "platform.autoscaler", "prometheus-adapter"),
    ("weights-not-100", lambda c: set_weight(c, "challenger", 15), "models.churn.variants", "add up to 105, not 100"),
    (
        "negative-weight",
        lambda c: set_weight(c, "challenger", -10),
        "models.churn.variants.challenger.weight",
        "at least 0",
    ),
    (
        "fractional-weight",
        lambda c: set_weight(c, "challenger", 10.5),
        "models.churn.variants.challenger.weight",
        "whole number",
    ),
    ("weight-as-text", lambda c: set_weight(c, "challenger", "10"), "models.churn.variants.challenger.weight", "whole"),
    (
        "min-over-max-replicas",
        lambda c: churn(c)["autoscaling"].update(minReplicas=12),
        "models.churn.autoscaling",
        "minReplicas (12) is greater than maxReplicas (10)",
    ),
    (
        "model-name-not-dns",
        lambda c: rename(c["ml-serving:models"], "churn", "Churn_Model"),
        "models.Churn_Model",
        "DNS-1123",
    ),
    (
        "variant-name-not-dns",
        lambda c: rename(churn(c)["variants"], "challenger", "Challenger"),
        "models.churn.variants.Challenger",
        "DNS-1123",
    ),
    ("namespace-not-dns", lambda c: c.update({"ml-serving:namespace": "ML models"}), "namespace", "DNS-1123"),
    (
        "typo-in-variant-key",
        lambda c: rename(churn(c)["variants"]["challenger"], "weight", "weigth"),
        "models.churn.variants.challenger.weigth",
        "did you mean 'weight'",
    ),
    (
        "typo-in-top-level-key",
        lambda c: rename(c, "ml-serving:namespace", "ml-serving:namepsace"),
        "namepsace",
        "did you mean 'namespace'",
    ),
    (
        "alias-and-version",
        lambda c: churn(c)["variants"]["champion"].update(alias="champion"),
        "models.churn.variants.champion",
        "exactly one of 'alias'",
    ),
    (
        "neither-alias-nor-version",
        lambda c: churn(c)["variants"]["champion"].pop("version"),
        "models.churn.variants.champion",
        "exactly one of 'alias'",
    ),
    (
        "shadow-with-weight",
        lambda c: churn(c)["variants"]["mirror"].update(weight=5),
        "models.churn.variants.mirror",
        "remove 'weight'",
    ),
    (
        "unknown-platform-choice",
        lambda c: c["ml-serving:platform"].update(seldon="instal"),
        "platform.seldon",
        "'install' or 'existing'",
    ),
    ("missing-registered-model", lambda c: churn(c).pop("registeredModel"), "models.churn.registeredModel", "required"),
    (
        "bad-cpu-quantity",
        lambda c: churn(c)["resources"].update(cpu="half a core"),
        "models.churn.resources.cpu",
        "Kubernetes quantity",
    ),
    (
        "alias-without-registry",
        lambda c: (c.pop("ml-serving:registry"), churn(c)["variants"]["champion"].update(alias="x")),
        "models.churn.variants.champion",
        "",
    ),
    (
        "unpinned-variant-without-registry",
        lambda c: (c.pop("ml-serving:registry"), churn(c)["variants"]["champion"].pop("modelUri")),
        "models.churn.variants.champion",
        "needs the MLflow registry",
    ),
    (
        "push-without-credentials",
        lambda c: c.pop("ml-serving:registryPassword"),
        "servingImage.registryUsername",
        "ml-serving:registryPassword",
    ),
    (
        "negative-parallel-workers",
        lambda c: churn(c).update(serving={"parallelWorkers": -1}),
        "models.churn.serving.parallelWorkers",
        "at least 0",
    ),
    (
        "gpu-variant-without-a-pool",
        lambda c: c.pop("ml-serving:nodePools"),
        "models.embeddings.variants.champion.gpu",
        "no GPU node pool can host this variant",
    ),
    (
        "gpu-pool-limit-too-small",
        lambda c: c["ml-serving:nodePools"]["gpu-inference"]["gpu"].update(limit=1),
        "nodePools.gpu-inference.gpu.limit",
        "maxReplicas 4 x gpu 1 = 4",
    ),
    (
        "unknown-gpu-type",
        lambda c: c["ml-serving:models"]["embeddings"]["variants"]["champion"].update(gpuType="a10"),
        "models.embeddings.variants.champion.gpuType",
        "not a known GPU type",
    ),
    (
        "gpu-type-the-pool-lacks",
        lambda c: c["ml-serving:models"]["embeddings"]["variants"]["champion"].update(gpuType="h100"),
        "models.embeddings.variants.champion.gpu",
        "gpu.types including 'h100'",
    ),
    (
        "taint-key-mismatch",
        lambda c: c["ml-serving:nodePools"]["gpu-inference"].update(taintKey="nvidia.com/gpus"),
        "nodePools.gpu-inference.taintKey",
        "does not match gpu.taintKey",
    ),
    (
        "time-slicing-below-one",
        lambda c: c["ml-serving:nodePools"]["gpu-inference"]["gpu"].update(timeSlicing={"replicas": 0}),
        "nodePools.gpu-inference.gpu.timeSlicing.replicas",
        "at least 1",
    ),
    (
        "prometheus-url-without-scheme",
        lambda c: c["ml-serving:monitoring"].update(prometheusUrl="prometheus.monitoring.svc:9090"),
        "monitoring.prometheusUrl",
        "http://",
    ),
    (
        "behaviour-with-hpa",
        lambda c: c["ml-serving:platform"].update(autoscaler="hpa"),
        "models.churn.autoscaling.scaleDown",
        "hpaSpec has no scaling behaviour",
    ),
]


@pytest.mark.parametrize(("edit", "path", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_rejected_before_any_resource(edit, path, fix):
    config = copy.deepcopy(stack_config("prod"))
    edit(config)
    declared = []
    with pytest.raises(pulumi.RunError) as raised:
        run_program(PROJECT_DIR, "prod", config=config, declared=declared)
    message = str(raised.value)
    assert message.startswith("Pulumi.prod.yaml: invalid stack config")
    assert f"ml-serving:{path}:" in message
    assert fix in message
    assert declared == [], "nothing may be declared from an invalid config"


def test_the_unedited_config_is_accepted_and_every_edit_changes_it():
    """So each rejection above is caused by its own edit, not by something already wrong in prod's config."""
    original = stack_config("prod")
    run_program(PROJECT_DIR, "prod", config=copy.deepcopy(original), declared=[])
    for name, edit, _path, _fix in CASES:
        config = copy.deepcopy(original)
        edit(config)
        assert config != original, f"{name}: the edit changes nothing"


def test_every_problem_is_reported_at_once():
    config = copy.deepcopy(stack_config("prod"))
    set_weight(config, "challenger", -1)
    config["ml-serving:namespace"] = "Bad Namespace"
    with pytest.raises(pulumi.RunError, match=r"2 problems") as raised:
        run_program(PROJECT_DIR, "prod", config=config)
    assert "ml-serving:namespace" in str(raised.value)
    assert "models.churn.variants.challenger.weight" in str(raised.value)


def test_duplicate_key_in_the_stack_file_is_an_error(tmp_path):
    project = copy_project(tmp_path / "project")
    path = project / "Pulumi.prod.yaml"
    text = path.read_text().replace(
        "        challenger:\n", "        champion:\n          weight: 5\n        challenger:\n", 1
    )
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"Pulumi.prod.yaml: duplicate key.*champion"):
        load_settings(project, "prod")


def test_cli_prints_one_clear_error_and_writes_nothing(tmp_path):
    project = copy_project(tmp_path / "project")
    path = project / "Pulumi.prod.yaml"
    path.write_text(path.read_text().replace("weight: 10\n", "weight: 15\n", 1))
    run = subprocess.run(
        [sys.executable, "-m", "ml_serving.cli", "--project-dir", str(project), "plan", "prod"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr + run.stdout
    assert "Pulumi.prod.yaml" in run.stderr
    assert "ml-serving:models.churn.variants: weights of non-shadow variants add up to 105" in run.stderr
    assert not (project / "rendered").exists(), "a failed plan must not write files"


def test_unknown_stack_names_the_stacks_there(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "ml_serving.cli", "--project-dir", str(PROJECT_DIR), "plan", "staging"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "Pulumi.staging.yaml: no such stack file" in run.stderr
    assert "Pulumi.dev.yaml" in run.stderr and "Pulumi.prod.yaml" in run.stderr
