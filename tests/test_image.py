"""The serving image's build context: the model's own requirements, a content-addressed tag, a clean Dockerfile."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from ml_serving import image
from tests import processes
from tests.conftest import plan_stack, stack_config

DOCKERFILE = Path(image.SERVING_IMAGE_DIR) / "Dockerfile"
DOCKERFILES = [DOCKERFILE, DOCKERFILE.with_name("Dockerfile.gpu"), image.BENTOML_IMAGE_DIR / "Dockerfile"]


@pytest.fixture(scope="module")
def model_dir(registry) -> Path:
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    uri = client.get_model_version_download_uri("churn-classifier", "1")
    return Path(uri.removeprefix("file://"))


def test_generated_requirements_equal_the_models(model_dir, tmp_path):
    context = image.build_context(image.read_environment(model_dir))
    written = image.write_context(context, tmp_path / "ctx", with_model=False)
    assert (written / "requirements-model.txt").read_text() == (model_dir / "requirements.txt").read_text()
    assert "scikit-learn==" in (written / "requirements-model.txt").read_text()
    assert "skops==" in (written / "requirements-model.txt").read_text(), "sklearn models need skops to load"
    assert context.build_args["PYTHON_VERSION"] == image.read_environment(model_dir).python_version
    expected = image.with_arg_defaults(DOCKERFILE.read_text(), {"PYTHON_VERSION": context.python_version})
    assert (written / "Dockerfile").read_text() == expected, "the serving image's Dockerfile, its Python set"


def test_tag_is_stable_for_the_same_inputs(model_dir):
    first = image.build_context(image.read_environment(model_dir)).tag
    second = image.build_context(image.read_environment(model_dir)).tag
    assert first == second and len(first) == 16


def test_tag_changes_with_the_requirements_only(model_dir, tmp_path):
    copy = Path(shutil.copytree(model_dir, tmp_path / "model"))
    base = image.build_context(image.read_environment(copy)).tag
    (copy / "MLmodel").write_text((copy / "MLmodel").read_text() + "\n# an unrelated edit\n")
    (copy / "conda.yaml").write_text("name: unrelated\n")
    assert image.build_context(image.read_environment(copy)).tag == base, "only requirements and serving_image count"
    (copy / "requirements.txt").write_text((copy / "requirements.txt").read_text() + "requests==2.32.3\n")
    assert image.build_context(image.read_environment(copy)).tag != base


def test_tag_changes_with_serving_image_files(model_dir, tmp_path, monkeypatch):
    environment = image.read_environment(model_dir)
    base = image.build_context(environment).tag
    serving = Path(shutil.copytree(image.SERVING_IMAGE_DIR, tmp_path / "serving_image"))
    monkeypatch.setattr(image, "SERVING_IMAGE_DIR", serving)
    assert image.build_context(environment).tag == base
    (serving / "model-settings.json").write_text((serving / "model-settings.json").read_text().replace("64", "32"))
    assert image.build_context(environment).tag != base


def test_baking_changes_the_tag_and_the_model_uri(model_dir):
    environment = image.read_environment(model_dir)
    baked = image.build_context(environment, bake_from="s3://b/m/1")
    assert baked.tag != image.build_context(environment).tag
    assert baked.build_args["MODEL_URI"] == image.BAKED_MODEL_PATH


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(image.SERVING_IMAGE_DIR)))
def test_hadolint_reports_nothing(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    run = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout == "", run.stdout + run.stderr


@pytest.mark.parametrize(
    "dockerfile", [DOCKERFILE, image.BENTOML_IMAGE_DIR / "Dockerfile"], ids=["mlserver", "bentoml"]
)
def test_dockerfile_is_multi_stage_pinned_and_non_root(dockerfile):
    text = dockerfile.read_text()
    assert text.count("FROM python:${PYTHON_VERSION}-slim-bookworm") == 2
    assert "ARG PYTHON_VERSION=3.11." in text
    uid = image.SERVING_UID
    assert f"USER {uid}:{uid}" in text and uid >= 10000 and "HEALTHCHECK" in text, "a high UID: no node user"
    final = text.split("AS build", 1)[1].split("\nFROM ", 1)[1]
    assert "pip install" not in final and "apt-get" not in final, "no build tools in the final stage"


@pytest.mark.parametrize("baked", [False, True], ids=["downloaded", "baked"])
def test_the_written_context_serves_on_its_own(model_dir, tmp_path, baked):
    """Run the entrypoint from the context's own files, laid out as the image lays them out."""
    context = image.build_context(image.read_environment(model_dir), bake_from=model_dir.as_uri() if baked else None)
    written = image.write_context(context, tmp_path / "ctx", with_model=baked)
    http, grpc_port, metrics = processes.free_port(), processes.free_port(), processes.free_port()
    env = {
        "PYTHONPATH": str(written / "app"),
        "ML_SERVING_SETTINGS_DIR": str(written / "serving"),
        "MLSERVER_HTTP_PORT": str(http),
        "MLSERVER_GRPC_PORT": str(grpc_port),
        "MLSERVER_METRICS_PORT": str(metrics),
        "MLSERVER_MODEL_NAME": "churn",
        "MLSERVER_METRICS_DIR": str(tmp_path / "metrics"),
        "MLSERVER_PARALLEL_WORKERS": "1",
        "MLSERVER_MODEL_URI": str(written / "model") if baked else str(model_dir),
    }
    command = [sys.executable, "-m", "ml_serving.server"]
    with processes.running(command, tmp_path / "server.log", env=env, cwd=tmp_path) as process:
        processes.wait_for(f"http://127.0.0.1:{http}/v2/health/ready", process, tmp_path / "server.log")
        row = {"tenure_months": 3, "monthly_charges": 99.5, "support_calls": 4, "plan": "basic", "region": "north"}
        answer = requests.post(f"http://127.0.0.1:{http}/invocations", json={"dataframe_records": [row]}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] in ([0], [1])
    if baked:
        assert (written / "model" / "MLmodel").exists()


def test_stacks_declare_one_image_per_distinct_context(registry):
    prod = plan_stack("prod")
    names = sorted(i["imageName"] for i in prod.images)
    assert len(names) == 4, "churn v7 and v9 share requirements, so they share an image"
    assert all(i["skipPush"] is False and i["build"]["platform"] == "linux/amd64" for i in prod.images)
    (fraud,) = [i for i in prod.images if "/fraud:" in i["imageName"]]
    assert fraud["build"]["args"]["MODEL_URI"] == image.BAKED_MODEL_PATH
    credentials = fraud["registry"]
    assert credentials["4dabf18193072939515e22adb298388d"] == "1b47061264138c4ac30d75fd1eb44270", "a Pulumi secret"
    assert credentials["value"]["server"] == "registry.example.com"
    assert credentials["value"]["username"] == "ci-bot"
    config = stack_config("dev")
    config["ml-serving:servingImage"] = {**config["ml-serving:servingImage"], "build": True}
    dev = plan_stack("dev", config, registry=registry)
    (local,) = dev.images
    assert local["skipPush"] is True and local["imageName"].startswith("ml-serving-dev/churn:")
    unbuilt = plan_stack("dev", registry=registry)
    assert not unbuilt.images, "build: false declares no image; the SeldonDeployment names the same tag"
    (sdep,) = unbuilt.find("SeldonDeployment")
    assert sdep["spec"]["predictors"][0]["componentSpecs"][0]["spec"]["containers"][0]["image"] == local["imageName"]


def test_baked_model_skips_the_storage_initializer():
    prod = plan_stack("prod")
    (fraud,) = prod.find("SeldonDeployment", "fraud")
    (predictor,) = fraud["spec"]["predictors"]
    assert "modelUri" not in predictor["graph"], "without modelUri Seldon adds no storage initializer"
    env = {e["name"]: e["value"] for e in predictor["componentSpecs"][0]["spec"]["containers"][0]["env"]}
    assert env["MLSERVER_MODEL_URI"] == image.BAKED_MODEL_PATH
    assert env["MLSERVER_PARALLEL_WORKERS"] == "2"
    (churn,) = prod.find("SeldonDeployment", "churn")
    assert all("modelUri" in p["graph"] for p in churn["spec"]["predictors"])


def test_registry_password_never_reaches_the_rendered_plan(tmp_path):
    from ml_serving.plan import write_rendered

    prod = plan_stack("prod")
    written = write_rendered(prod, tmp_path / "rendered")
    text = "\n".join(path.read_text() for path in written)
    assert "registryPassword" not in text and "ci-bot" not in text, "image registry credentials stay out"
    assert "4dabf18193072939515e22adb298388d" not in text, "secret values are masked, not written"
    assert "stringData: '[secret]'" in text


def test_variants_sharing_a_baked_version_build_from_one_context(registry, tmp_path, monkeypatch):
    """As `pulumi up` runs it: two variants on the same version get one context, and the model is fetched once."""
    from ml_serving import program
    from ml_serving.plan import run_program
    from tests.conftest import PROJECT_DIR, stack_config

    config = stack_config("dev")
    config["ml-serving:registry"] = {"trackingUri": registry.tracking_uri}
    config["ml-serving:servingImage"] = {**config["ml-serving:servingImage"], "build": True}
    churn = config["ml-serving:models"]["churn"]
    churn["serving"] = {"bake": True}
    churn["variants"] = {
        "champion": {"alias": "champion", "weight": 100},
        "mirror": {"alias": "champion", "shadow": True},
    }
    written = []
    real = program.write_context
    monkeypatch.setattr(program, "write_context", lambda *args, **kw: written.append(args[1]) or real(*args, **kw))
    plan = run_program(PROJECT_DIR, "dev", config=config, cwd=tmp_path, preview=False)
    assert len(plan.images) == 1
    assert len(written) == 1, f"one context, written (and its model downloaded) once: {written}"
    assert (tmp_path / written[0] / "model" / "MLmodel").exists(), "the model is baked into it"
