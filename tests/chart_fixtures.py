"""The pinned Helm charts unpacked from ../shared/charts, and the real `helm` (tools/build.sh helm) to render them."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from ml_serving.tools import TOOLS_SCRIPT, tools_folder

CHARTS_TARBALL = Path(
    os.environ.get("ML_SERVING_CHARTS") or TOOLS_SCRIPT.parents[2] / "shared" / "charts" / "helm-charts.tar.gz"
)
KUBE_VERSION = "1.31.0"  # as tests/schemas.py validates


def _missing(why: str) -> None:
    if os.environ.get("ML_SERVING_REQUIRE_ENGINE"):  # .ci/run: a missing tool or chart folder is a failure there
        pytest.fail(f"ML_SERVING_REQUIRE_ENGINE is set but {why}")
    pytest.skip(why)


@pytest.fixture(scope="session", name="chart_folder")
def chart_folder_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every chart the stacks pin, unpacked as an air-gapped team keeps them: `<chart>-<version>/`."""
    if not CHARTS_TARBALL.exists():
        _missing(f"the pinned charts are not at {CHARTS_TARBALL} (set ML_SERVING_CHARTS)")
    folder = tmp_path_factory.mktemp("charts")
    with tarfile.open(CHARTS_TARBALL) as archive:
        archive.extractall(folder, filter="data")
    return folder


@pytest.fixture(scope="session", name="helm")
def helm_fixture() -> Path:
    folder = tools_folder()
    binary = folder / "bin" / "helm" if folder is not None else None
    if binary is None or not binary.exists():
        _missing("helm is not built: run `tools/build.sh helm` (or `./run tools`)")
    return binary


def render(
    helm: Path, chart_dir: Path, release: str, namespace: str, values: dict[str, Any], work: Path
) -> list[dict[str, Any]]:
    """`helm template` of one chart with the stack's values, CRDs included, as the provider's Helm installs it."""
    work.mkdir(parents=True, exist_ok=True)
    values_file = work / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = subprocess.run(
        [str(helm), "template", release, str(chart_dir), "--namespace", namespace, "--values", str(values_file),
         "--include-crds", "--kube-version", KUBE_VERSION, "--api-versions", "monitoring.coreos.com/v1",
         "--api-versions", "apiregistration.k8s.io/v1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HELM_CACHE_HOME": str(work / "helm-cache"),
        "HELM_CONFIG_HOME": str(work / "helm-config"), "HELM_DATA_HOME": str(work / "helm-data")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [obj for obj in yaml.load_all(done.stdout, Loader=_Loader) if obj]


class _Loader(yaml.SafeLoader):
    """PyYAML reads a bare `=` (an enum value in the Prometheus Operator's CRDs) as YAML 1.1's value tag."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:value"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
