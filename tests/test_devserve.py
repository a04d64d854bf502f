"""`ml-serving cluster --node --up`'s pure part (ml_serving/devserve.py): the stack pinned to the local S3 store,
without editing the team's stack file. The run itself is `tests/test_pods_serving.py`'s `dev_stack` (marker `pods`)."""

from __future__ import annotations

import copy
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from ml_serving.artifactstore import S3Store
from ml_serving.cli import main
from ml_serving.devserve import LOCAL_REPOSITORY, on_store, refusing, registry_root, serving_images
from ml_serving.localcluster import ClusterError
from ml_serving.registry import RegistryResolver
from ml_serving.stackfile import edit, parse_settings, stack_file
from tests.conftest import PROJECT_DIR, LocalRegistry, stack_config


def store_over(root: Path) -> S3Store:
    return S3Store(Path("bin"), root, "10.244.7.1", root / "rclone.log", port=9000)


def dev_config(**variants: dict) -> dict:
    config = copy.deepcopy(stack_config("dev"))
    if variants:
        config["ml-serving:models"]["churn"]["variants"] = variants
    return config


def test_every_variant_is_pinned_to_its_s3_uri_on_the_store_and_the_store_is_the_artifact_store(
    registry: LocalRegistry,
) -> None:
    config = dev_config(champion={"alias": "champion", "weight": 90}, challenger={"version": 2, "weight": 10})
    store = store_over(registry.root)
    pinned = on_store(config, parse_settings(config, "Pulumi.dev.yaml"), RegistryResolver(registry.tracking_uri), store)

    variants = pinned["ml-serving:models"]["churn"]["variants"]
    assert variants["champion"]["version"] == "1" and "alias" not in variants["champion"]
    assert variants["challenger"]["version"] == "2"
    assert [v["weight"] for v in variants.values()] == [90, 10]
    for variant in variants.values():
        assert variant["modelUri"].startswith("s3://"), variant
        assert (registry.root / variant["modelUri"].removeprefix("s3://") / "MLmodel").exists()
    assert pinned["ml-serving:artifactStore"] == {"rclone": store.rclone_env()}
    assert pinned["ml-serving:servingImage"]["repository"] == LOCAL_REPOSITORY
    assert config["ml-serving:models"]["churn"]["variants"]["champion"] == {"alias": "champion", "weight": 90}

    settings = parse_settings(pinned, "Pulumi.dev.yaml")  # a valid stack; the plan of it needs the store running
    assert settings.artifact_store is not None and settings.artifact_store.rclone == store.rclone_env()


def test_a_model_outside_the_registry_folder_is_refused_naming_the_variant(registry: LocalRegistry, tmp_path) -> None:
    config = dev_config()
    settings = parse_settings(config, "Pulumi.dev.yaml")
    with pytest.raises(ClusterError, match=r"models\.churn\.variants\.champion: .* is not in the registry's folder"):
        on_store(config, settings, RegistryResolver(registry.tracking_uri), store_over(tmp_path))


def test_the_registry_root_is_the_folder_of_a_local_registry_only(tmp_path: Path) -> None:
    assert registry_root("sqlite:///.mlflow/registry.db", tmp_path) == (tmp_path / ".mlflow").resolve()
    assert registry_root(f"sqlite:///{tmp_path}/r/registry.db", Path("/elsewhere")) == tmp_path / "r"
    with pytest.raises(ClusterError, match="trackingUri is http://mlflow:5000: --up serves a local registry"):
        registry_root("http://mlflow:5000", tmp_path)


def test_a_baked_model_is_refused_since_the_images_are_built_without_models() -> None:
    sdep = {"metadata": {"name": "churn"}, "spec": {"predictors": [{"name": "champion", "graph": {"name": "churn"},
            "componentSpecs": [{"spec": {"containers": [{"name": "churn", "image": "localhost/x:1"}]}}]}]}}  # fmt: skip
    with pytest.raises(ClusterError, match="churn/champion bakes its model into the image"):
        serving_images([sdep])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--up"], "--up serves the stack from pods: add --node"),
        (["--node", "--up", "--no-operator"], "--up serves the stack through the Seldon operator"),
        (["--node", "--up", "--no-images"], "the node pulls it from the OCI registry: drop --no-images"),
        (["--monitoring"], "--monitoring runs Prometheus as a pod: add --node"),
    ],
)
def test_cluster_flags_that_need_others_are_refused_before_anything_starts(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--project-dir", str(PROJECT_DIR), "cluster", *flags]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def _dev_project(tmp_path: Path, change: Callable[[dict], None]) -> Path:
    for name in ("Pulumi.yaml", "Pulumi.dev.yaml"):
        shutil.copy(PROJECT_DIR / name, tmp_path / name)
    edit(stack_file(tmp_path, "dev"), lambda document: change(document["config"]))
    return tmp_path


@pytest.mark.parametrize(
    ("flags", "change", "message"),
    [
        (["--node", "--up"], lambda c: c["ml-serving:registry"].update(trackingUri="http://mlflow:5000"),
         "trackingUri is http://mlflow:5000: --up serves a local registry"),
        (["--node", "--up"], lambda c: c["ml-serving:registry"].update(trackingUri="sqlite:///nowhere/registry.db"),
         "no registry at"),
        (["--node", "--monitoring"], lambda c: c.pop("ml-serving:monitoring"), "has no ml-serving:monitoring"),
    ],
)  # fmt: skip
def test_a_stack_cluster_cannot_serve_is_refused_before_anything_starts(
    flags: list[str], change: Callable[[dict], None], message: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    def nothing_starts() -> None:
        raise AssertionError("the cluster was about to start")

    monkeypatch.setattr("ml_serving.localcluster.tools_dir", nothing_starts)
    assert main(["--project-dir", str(_dev_project(tmp_path, change)), "cluster", *flags]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_a_predictor_url_is_given_only_once_its_service_accepts_connections() -> None:
    """kube-proxy writes a Service's rules a moment after the pod is Ready: `cluster --up` waits for a ClusterIP
    that refuses (here a loopback port that starts listening at the third poll) and names one that never answers."""
    unbound = socket.socket()
    unbound.bind(("127.0.0.1", 0))  # reserved, not listening: a connection is refused
    late, never = unbound.getsockname()[1], socket.socket()
    never.bind(("127.0.0.1", 0))
    now, polls = [0.0], []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        now[0] += seconds
        if len(polls) == 3:
            unbound.listen()

    with unbound, never:
        urls = {"churn/champion": f"http://127.0.0.1:{late}"}
        assert refusing(urls, 60, clock=lambda: now[0], sleep=sleep) == []
        assert len(polls) == 3, "it polled until the port listened, and no longer"

        urls["churn/challenger"] = f"http://127.0.0.1:{never.getsockname()[1]}"
        polls.clear()
        assert refusing(urls, 10, clock=lambda: now[0], sleep=sleep) == ["churn/challenger"]
        assert now[0] >= 10 + 3, "it gave up only when the time ran out"


def test_up_without_the_images_it_makes_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--up makes the executor and initializer images from `./run tools`' binaries: without them it says so before
    the cluster starts, not with a traceback minutes later."""
    (tmp_path / "registry").mkdir()
    (tmp_path / "tools" / "bin").mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'registry' / 'registry.db'}"
    project = _dev_project(tmp_path, lambda c: c["ml-serving:registry"].update(trackingUri=uri))
    monkeypatch.setattr("ml_serving.localcluster.tools_dir", lambda: tmp_path / "tools")
    monkeypatch.setattr("ml_serving.localcluster.LocalCluster.start", lambda *a, **k: pytest.fail("it started"))
    assert main(["--project-dir", str(project), "cluster", "--node", "--up"]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "--up needs" in error and "seldon-executor" in error and "rclone" in error and "./run tools" in error


def test_a_failed_push_is_an_error_the_cli_reports_naming_the_image() -> None:
    from ml_serving.devserve import pushing
    from ml_serving.ocipush import PushError

    for failure in (PushError("HTTP 500"), ConnectionRefusedError("registry gone")):
        with (
            pytest.raises(ClusterError, match="pushing localhost/x:1 to the node's registry"),
            pushing("localhost/x:1"),
        ):
            raise failure
