"""The serving images built from the contexts the program writes, pushed to a local OCI registry, and run the way
a pod runs them. Marked `image`: they need a Docker engine (started here if none runs) and `tools/build.sh
registry`; the unmarked tests at the top check the pure parts."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import requests
from mlflow.tracking import MlflowClient

from ml_serving import containers, image
from ml_serving.image_provider import IDENTITY, ImageBuilder, dynamic_provider_dir
from ml_serving.specs import seldon
from ml_serving.stackfile import load_settings
from tests import container_fixtures, processes
from tests.conftest import PROJECT_DIR, plan_stack, stack_config
from tests.container_fixtures import container
from tests.test_serving import ROWS, v2_body

docker_engine = container_fixtures.docker_engine  # fixtures, shared by any module that names them so
oci_registry = container_fixtures.oci_registry
GRACE_SECONDS = 30  # the pod's terminationGracePeriodSeconds: the spec sets none, so Kubernetes' default


# --- pure parts ----------------------------------------------------------------------------------------------


def test_base_images_are_the_dockerfiles_own_from_lines():
    cpu = (image.SERVING_IMAGE_DIR / "Dockerfile").read_text()
    assert containers.base_images(cpu) == ["python:3.11.14-slim-bookworm"]
    gpu = (image.SERVING_IMAGE_DIR / "Dockerfile.gpu").read_text()
    assert containers.base_images(gpu) == [
        "python:3.11.14-slim-bookworm",
        "nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04",
    ], "stages (`python`, `build`) are not bases"
    assert containers.base_images(gpu, target="build") == ["python:3.11.14-slim-bookworm"], "no CUDA needed"


def test_a_context_s_own_defaults_are_what_the_stack_means():
    """`docker build <context>` alone builds the right image: the model's Python and, baked, the model's path."""
    environment = image.ModelEnvironment("scikit-learn==1.5.2\n", "3.11.7")
    plain = image.build_context(environment).files["Dockerfile"].decode()
    assert "ARG PYTHON_VERSION=3.11.7\n" in plain and "ARG MODEL_URI=/mnt/models\n" in plain
    assert containers.base_images(plain) == ["python:3.11.7-slim-bookworm"]
    baked = image.build_context(environment, bake_from="s3://b/m/1").files["Dockerfile"].decode()
    assert f"ARG MODEL_URI={image.BAKED_MODEL_PATH}\n" in baked
    for runtime in ("mlserver", "bentoml"):
        text = image.build_context(environment, bake_from="s3://b", runtime=runtime).files["Dockerfile"].decode()
        assert f"ARG MODEL_URI={image.BAKED_MODEL_PATH}\n" in text, runtime


def test_the_dynamic_builder_rebuilds_only_when_the_name_or_push_changes():
    old = {"context": "/a/build/dev/churn-1", "name": "r/churn:1", "push": True}
    assert not ImageBuilder().diff("id", old, {**old, "context": "/elsewhere/churn-1"}).changes
    changed = ImageBuilder().diff("id", old, {**old, "name": "r/churn:2"})
    assert changed.changes and changed.replaces == ["name"] and set(IDENTITY) == {"name", "push"}


def test_the_dynamic_provider_executable_runs_this_python(tmp_path):
    script = dynamic_provider_dir(tmp_path) / "pulumi-resource-pulumi-python"
    assert script.stat().st_mode & 0o111
    assert "-m pulumi.dynamic" in script.read_text()


def test_a_pushed_image_reaches_the_seldondeployment_by_digest(registry):
    """Offline (mock engine): both builders hand the SeldonDeployment `repo@sha256:…` when they push."""
    config = stack_config("dev")
    config["ml-serving:servingImage"] = {
        "repository": "127.0.0.1:5001/ml-serving-dev", "build": True, "builder": "dynamic", "push": True,
    }  # fmt: skip
    plan = plan_stack("dev", config, registry=registry)
    (built,) = plan.local_images
    assert built["push"] is True and built["name"].startswith("127.0.0.1:5001/ml-serving-dev/churn:")
    (sdep,) = plan.find("SeldonDeployment")
    ref = sdep["spec"]["predictors"][0]["componentSpecs"][0]["spec"]["containers"][0]["image"]
    assert ref.startswith("127.0.0.1:5001/ml-serving-dev/churn@sha256:"), ref
    prod = plan_stack("prod")
    refs = {c["image"] for s in prod.find("SeldonDeployment") for p in s["spec"]["predictors"]
            for cs in p["componentSpecs"] for c in cs["spec"]["containers"]}  # fmt: skip
    assert refs and all("@sha256:" in ref for ref in refs), refs


# --- real images ---------------------------------------------------------------------------------------------

RUNTIMES = {"mlserver": {}, "mlserver-baked": {"bake": True}, "bentoml": {"runtime": "bentoml"}}


@pytest.fixture(scope="module")
def model_dir(registry) -> Path:
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    return Path(client.get_model_version_download_uri("churn-classifier", "1").removeprefix("file://"))


@pytest.fixture(scope="module")
def built(model_dir, docker_engine, oci_registry, tmp_path_factory) -> dict[str, containers.BuiltImage]:
    """Each CPU image, built from the context the program writes (plain `docker build <context>`) and pushed."""
    environment = image.read_environment(model_dir)
    images = {}
    for key, options in RUNTIMES.items():
        bake_from = model_dir.as_uri() if options.get("bake") else None
        context = image.build_context(environment, bake_from, runtime=options.get("runtime", "mlserver"))
        path = image.write_context(context, tmp_path_factory.mktemp(key) / "ctx", with_model=bool(bake_from))
        name = f"{oci_registry.address}/ml-serving-test/churn-{key}:{context.tag}"
        images[key] = containers.build_image(path, name, push=True)
    return images


def operator_env(ports: dict[str, int]) -> dict[str, str]:
    """What Seldon's operator sets on an MLServer container (FACTS: operator/controllers/mlserver.go), plus the
    env of our own container spec for the dev stack."""
    settings = load_settings(PROJECT_DIR, "dev")
    model = settings.models["churn"]
    spec = seldon.serving_container("churn", model, model.variants["champion"], "unused", "1")
    env = {e["name"]: e["value"] for e in spec["env"]}
    return {
        **env,
        "MLSERVER_MODEL_NAME": "churn",
        "MLSERVER_MODEL_VERSION": "v1",
        "MLSERVER_MODEL_URI": "/mnt/models",
        "MLSERVER_HTTP_PORT": str(ports["http"]),
        "MLSERVER_GRPC_PORT": str(ports["grpc"]),
        "MLSERVER_METRICS_PORT": str(ports["metrics"]),
        "MLSERVER_METRICS_ENDPOINT": "/prometheus",
    }


def mlserver_ports() -> dict[str, int]:
    return {"http": processes.free_port(), "grpc": processes.free_port(), "metrics": processes.free_port()}


def grpc_predict(address: str) -> list[int]:
    from mlserver.grpc import dataplane_pb2_grpc
    from mlserver.grpc.converters import ModelInferRequestConverter
    from mlserver.types import InferenceRequest

    body = v2_body()
    for tensor in body["inputs"]:
        if tensor["datatype"] == "BYTES":
            tensor["data"] = [value.encode() for value in tensor["data"]]
            tensor["parameters"] = {"content_type": "str"}
    proto = ModelInferRequestConverter.from_types(InferenceRequest.model_validate(body), model_name="churn")
    with grpc.insecure_channel(address) as channel:
        answer = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(proto, timeout=30)
    return list(answer.outputs[0].contents.int64_contents)


def assert_stops_on_sigterm(running) -> None:
    running.stop("TERM")
    deadline = time.monotonic() + GRACE_SECONDS
    while running.running():
        assert time.monotonic() < deadline, f"still running {GRACE_SECONDS} s after SIGTERM"
        time.sleep(0.2)


@pytest.mark.image
def test_every_image_is_pushed_and_named_by_the_digest_the_registry_holds(built, oci_registry):
    for key, done in built.items():
        repository, digest = done.ref.split("@")
        path = repository.removeprefix(oci_registry.address + "/")
        assert digest == oci_registry.digest(path, done.name.rsplit(":", 1)[1]), key
        assert set(done.base.values()) <= {"present", "pulled", "stand-in"}


@pytest.mark.image
def test_the_gpu_image_builds_its_python_stages_and_names_the_missing_cuda_base(model_dir, built, tmp_path):
    """No CUDA base can be pulled here: the GPU Dockerfile's `build` stage (the model's and the server's packages on
    the same Python) builds; the whole image is refused up front, naming the base and what to do."""
    context = image.build_context(image.read_environment(model_dir), gpu=True)
    path = image.write_context(context, tmp_path / "gpu", with_model=False)
    stage = containers.build_image(path, f"ml-serving-test/churn-gpu-build:{context.tag}", target="build")
    assert set(stage.base.values()) == {"present"}, "the CPU image made the same base"
    with pytest.raises(containers.ContainerError, match=re.escape("nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04")):
        containers.build_image(path, f"ml-serving-test/churn-gpu:{context.tag}")


@pytest.mark.image
def test_the_base_stand_in_has_python_and_the_host_ca_store(built):
    (base,) = built["mlserver"].base
    probe = "import ssl, sys, venv; print(sys.version_info[:2], ssl.get_default_verify_paths().cafile)"
    run = subprocess.run(
        ["docker", "run", "--rm", "--network", "host", base, "python", "-c", probe], capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.startswith("(3, 11)"), run.stdout + run.stderr


@pytest.mark.image
def test_mlserver_image_serves_as_a_pod_runs_it(built, model_dir):
    ports = mlserver_ports()
    with container(built["mlserver"].ref, operator_env(ports), ports, model=model_dir) as running:
        running.wait_ready("/v2/health/ready")
        assert requests.get(running.url() + "/v2/models/churn/ready", timeout=5).status_code == 200
        v2 = requests.post(running.url() + "/v2/models/churn/infer", json=v2_body(), timeout=30)
        assert v2.status_code == 200, v2.text
        expected = v2.json()["outputs"][0]["data"]
        invocations = requests.post(running.url() + "/invocations", json={"dataframe_records": ROWS}, timeout=30)
        assert invocations.status_code == 200 and invocations.json()["predictions"] == expected
        assert grpc_predict(f"127.0.0.1:{ports['grpc']}") == expected
        metrics = requests.get(running.url("metrics") + "/prometheus", timeout=10)
        assert metrics.status_code == 200 and "rest_server_requests_total" in metrics.text
        bad = requests.post(running.url() + "/invocations", data=b'{"dataframe_records": [', timeout=30,
                            headers={"Content-Type": "application/json"})  # fmt: skip
        assert 400 <= bad.status_code < 500, bad.text
        assert_stops_on_sigterm(running)


@pytest.mark.image
def test_the_ready_probe_is_200_only_with_the_model_loaded(built, tmp_path):
    """An empty /mnt/models: the server never says ready (it exits), so a pod would never get traffic."""
    (tmp_path / "empty").mkdir()
    ports = mlserver_ports()
    with container(built["mlserver"].ref, operator_env(ports), ports, model=tmp_path / "empty") as running:
        deadline = time.monotonic() + 120
        while running.running() and time.monotonic() < deadline:
            try:
                ready = requests.get(running.url() + "/v2/health/ready", timeout=1).status_code
            except requests.RequestException:
                ready = None
            assert ready != 200, "ready without a model"
            time.sleep(0.2)
        assert not running.running() and running.exit_code() != 0, running.logs()


@pytest.mark.image
def test_a_baked_image_built_from_its_context_alone_serves_with_no_model_env(built):
    """The context's own defaults bake the model's path in: no MODEL_URI build arg, no MLSERVER_MODEL_URI."""
    ports = mlserver_ports()
    env = {f"MLSERVER_{k.upper()}_PORT": str(v) for k, v in ports.items()} | {"MLSERVER_MODEL_NAME": "churn"}
    with container(built["mlserver-baked"].ref, env, ports) as running:
        running.wait_ready("/v2/health/ready")
        answer = requests.post(running.url() + "/invocations", json={"dataframe_records": ROWS}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == len(ROWS)


@pytest.mark.image
def test_bentoml_image_serves_as_a_pod_runs_it(built, model_dir):
    port = processes.free_port()  # the image listens on 3000; a later --port wins, so tests share no fixed port
    ports = {"http": port}
    env = {"MLSERVER_MODEL_NAME": "churn", "MLSERVER_MODEL_URI": "/mnt/models", "ML_SERVING_MODEL_VERSION": "1"}
    with container(built["bentoml"].ref, env, ports, model=model_dir, args=["--port", str(port)]) as running:
        running.wait_ready("/readyz")
        assert requests.get(running.url() + "/livez", timeout=5).status_code == 200
        v2 = requests.post(running.url() + "/v2/models/churn/infer", json=v2_body(), timeout=30)
        assert v2.status_code == 200, v2.text
        invocations = requests.post(running.url() + "/invocations", json={"dataframe_records": ROWS}, timeout=30)
        assert invocations.json()["predictions"] == v2.json()["outputs"][0]["data"]
        assert "bentoml" in requests.get(running.url() + "/metrics", timeout=10).text
        bad = requests.post(running.url() + "/invocations", data=b"{", timeout=30,
                            headers={"Content-Type": "application/json"})  # fmt: skip
        assert 400 <= bad.status_code < 500, bad.text
        assert_stops_on_sigterm(running)


# --- the build inside the stack's graph ----------------------------------------------------------------------


def sdep_images(cluster, namespace: str) -> dict[str, str]:
    """Each predictor's model image in the namespace's one SeldonDeployment, as the API server holds it."""
    from kubernetes.dynamic import DynamicClient

    api = DynamicClient(cluster.api_client()).resources.get(
        api_version="machinelearning.seldon.io/v1", kind="SeldonDeployment"
    )
    (sdep,) = api.get(namespace=namespace).to_dict()["items"]
    return {p["name"]: p["componentSpecs"][0]["spec"]["containers"][0]["image"] for p in sdep["spec"]["predictors"]}


def image_steps(steps: list[dict[str, str]]) -> dict[str, str]:
    """The dynamic provider's images in a preview: resource name (it ends with the context's tag) -> op."""
    return {s["urn"].rsplit("::", 1)[1]: s["op"] for s in steps if s["type"] == "pulumi-python:dynamic:Resource"}


@pytest.mark.image
@pytest.mark.engine
def test_up_builds_pushes_and_deploys_the_image_by_digest(tools, cluster, docker_engine, oci_registry, tmp_path):
    """`ml-serving up dev` with `build: true` on the real engine: the dynamic provider builds and pushes, and the
    SeldonDeployment names what the registry holds; a second `up` with the same context builds nothing; a model
    version whose context differs (here its Python) rebuilds exactly its own image, the other stays as it is."""
    import os
    import shutil
    import sys

    import yaml

    from ml_serving.localcluster import tools_env
    from tests.conftest import copy_project

    project = copy_project(tmp_path / "project")
    stack = project / "Pulumi.dev.yaml"
    text = stack.read_text().replace("ml-serving:namespace: models-dev", "ml-serving:namespace: models-image")
    old = text[text.index("  ml-serving:servingImage:\n") : text.index("  ml-serving:monitoring:")]
    repository = f"{oci_registry.address}/ml-serving-dev"
    new = f"  ml-serving:servingImage: {{repository: {repository}, build: true, builder: dynamic, push: true}}\n"
    text = text.replace(old, new).replace(
        "champion: {alias: champion, weight: 100}",
        "champion: {alias: champion, weight: 90}\n        challenger: {alias: challenger, weight: 10}",
    )
    stack.write_text(text)
    (tmp_path / "state").mkdir()
    env = {**os.environ, **tools_env(tools), "KUBECONFIG": str(cluster.kubeconfig),
           "PULUMI_CONFIG_PASSPHRASE": "ml-serving-example", "PULUMI_BACKEND_URL": (tmp_path / "state").as_uri()}  # fmt: skip

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "ml_serving.cli", "--project-dir", str(project), *args],
                              cwd=project, env=env, capture_output=True, text=True, timeout=3600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    def registry_digest(tag: str) -> str:
        return oci_registry.digest("ml-serving-dev/churn", tag)

    cli("seed", "--stack", "dev")
    uri = f"sqlite:///{project / '.mlflow' / 'registry.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias("churn-classifier", "challenger", "1")
    cli("up", "dev", "--json")
    first = sdep_images(cluster, "models-image")
    assert first["champion"] == first["challenger"], "one context, one image"
    assert first["champion"].startswith(f"{repository}/churn@sha256:"), first
    (first_tag,) = requests.get(f"http://{oci_registry.address}/v2/ml-serving-dev/churn/tags/list", timeout=10).json()[
        "tags"
    ]
    assert first["champion"].split("@")[1] == registry_digest(first_tag), "the digest the registry holds"
    steps = image_steps(json.loads(cli("preview", "dev", "--json").strip().splitlines()[-1]))
    assert steps and set(steps.values()) == {"same"}, f"an unchanged context builds nothing: {steps}"

    # Version 2: the same model logged under another Python patch release, so its context (and tag) differ.
    source = Path(client.get_model_version_download_uri("churn-classifier", "1").removeprefix("file://"))
    moved = shutil.copytree(source, tmp_path / "churn-v2")
    python_env = yaml.safe_load((moved / "python_env.yaml").read_text())
    python_env["python"] = "3.11.9" if python_env["python"] != "3.11.9" else "3.11.8"
    (moved / "python_env.yaml").write_text(yaml.safe_dump(python_env))
    version = client.create_model_version("churn-classifier", str(moved)).version
    client.set_registered_model_alias("churn-classifier", "challenger", version)
    steps = image_steps(json.loads(cli("preview", "dev", "--json").strip().splitlines()[-1]))
    (kept,) = [name for name, op in steps.items() if name.endswith(first_tag)]
    assert steps.pop(kept) == "same", f"the champion's image is not rebuilt: {steps}"
    assert list(steps.values()) == ["create"], f"exactly one image is built: {steps}"
    cli("up", "dev", "--json")
    second = sdep_images(cluster, "models-image")
    assert second["champion"] == first["champion"]
    assert second["challenger"].startswith(f"{repository}/churn@sha256:")
    new_tag = next(iter(steps)).rsplit("-", 1)[1]
    assert second["challenger"].split("@")[1] == registry_digest(new_tag), "the new tag's digest, as pushed"


@pytest.mark.image
def test_the_engine_is_started_only_when_none_answers_and_stopped_by_its_pid(docker_engine, monkeypatch, tmp_path):
    """A running engine is used and left alone; with none on the socket, `dockerd` is started, answers, and is
    stopped by the PID it was started with (a private one here, beside the session's engine)."""
    import os
    import shutil
    import tempfile

    assert not containers.start_engine().started_here or docker_engine.started_here
    root = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))  # a unix socket path must stay short
    monkeypatch.setenv("DOCKER_HOST", f"unix://{root}/docker.sock")
    assert not containers.engine_answers()
    engine = containers.start_engine(tmp_path, private_root=root)
    try:
        assert engine.started_here and containers.engine_answers()
        pid = engine.process.pid
    finally:
        engine.stop()
    assert not containers.engine_answers()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    shutil.rmtree(root, ignore_errors=True)
