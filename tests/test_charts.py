"""Charts from a folder or a mirror (air-gapped clusters), the charts' real output validated and scanned, and the
defects found by reading the charts against the values (GPU time-slicing, the DCGM scrape interval, which
ServiceMonitors Prometheus selects).

The fast tests run the program under the mock engine; those marked `charts` render the pinned charts from
../shared/charts with the real `helm` (tools/build.sh helm).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pulumi
import pytest
import yaml

from ml_serving.chartsource import candidates
from ml_serving.plan import run_program
from ml_serving.settings import ConfigError, parse_settings
from ml_serving.specs import charts, gpu, monitoring
from tests import schemas
from tests.chart_fixtures import KUBE_VERSION, chart_folder_fixture, helm_fixture, render  # noqa: F401  (fixtures)
from tests.conftest import PROJECT_DIR, stack_config


def prod_config(**changes: Any) -> dict[str, Any]:
    config = copy.deepcopy(stack_config("prod"))
    for key, value in changes.items():
        config[f"ml-serving:{key}"] = value
    return config


def settings_of(config: dict[str, Any]):
    return parse_settings(config, "Pulumi.prod.yaml")


def plan(config: dict[str, Any]):
    return run_program(PROJECT_DIR, "prod", config=config)


# 1. Charts from a folder or a mirror -----------------------------------------------------------------------------


def test_by_default_every_release_comes_from_its_public_repository():
    releases = plan(prod_config()).releases
    assert releases and all(r["repositoryOpts"]["repo"].startswith("https://") for r in releases)
    assert all(r["version"] and "/" not in r["chart"] for r in releases)


def test_with_a_folder_every_release_installs_the_pinned_version_from_it(chart_folder):
    config = prod_config(charts={"folder": str(chart_folder)})
    releases = {r["name"]: r for r in plan(config).releases}
    pinned = {r.chart.release: r.chart for r in charts.charts(settings_of(config))}
    assert set(releases) == set(pinned) and len(pinned) >= 4
    for name, chart in pinned.items():
        path = Path(releases[name]["chart"])
        assert path == candidates(chart_folder, chart)[0], name
        assert yaml.safe_load((path / "Chart.yaml").read_text())["version"] == chart.version
        assert "repositoryOpts" not in releases[name], "nothing is fetched from a repository"


def test_a_relative_folder_is_relative_to_the_project(chart_folder):
    relative = os.path.relpath(chart_folder, PROJECT_DIR)
    releases = plan(prod_config(charts={"folder": relative})).releases
    assert releases and all(Path(r["chart"]).parent == chart_folder for r in releases)


def _refused(config: dict) -> str:
    declared: list = []
    with pytest.raises(pulumi.RunError) as raised:
        run_program(PROJECT_DIR, "prod", config=config, declared=declared)
    assert not [d for d in declared if d.custom], "nothing may be declared"
    return str(raised.value)


def test_a_folder_chart_at_another_version_is_a_config_error_naming_both(tmp_path, chart_folder):
    folder = tmp_path / "charts"
    folder.mkdir()
    for release in charts.charts(settings_of(prod_config())):
        (folder / release.chart.chart).symlink_to(candidates(chart_folder, release.chart)[0])
    (folder / "keda").unlink()
    (folder / "keda").mkdir()
    (folder / "keda" / "Chart.yaml").write_text("apiVersion: v2\nname: keda\nversion: 2.15.0\n")
    message = _refused(prod_config(charts={"folder": str(folder)}))
    assert message.startswith("Pulumi.prod.yaml: ml-serving:charts.folder: the stack pins keda 2.16.1, but ")
    assert f"{folder / 'keda' / 'Chart.yaml'} says version 2.15.0" in message
    assert "helm pull keda --repo https://kedacore.github.io/charts --version 2.16.1 --untar" in message
    assert message.count("\n") == 0, "only keda is wrong"


def test_a_chart_missing_from_the_folder_is_a_config_error_naming_where_it_was_looked_for(tmp_path):
    message = _refused(prod_config(charts={"folder": str(tmp_path)}))
    assert f"no chart seldon-core-operator at {tmp_path / 'seldon-core-operator-1.18.2'} or " in message
    assert len(message.splitlines()) == len(charts.charts(settings_of(prod_config()))), "every chart is listed"


@pytest.mark.parametrize(
    ("mirror", "chart", "repo"),
    [
        ("oci://registry.internal/helm-charts", "oci://registry.internal/helm-charts/keda", None),
        ("https://charts.internal/stable", "keda", "https://charts.internal/stable"),
    ],
)
def test_a_mirror_serves_every_chart_at_the_pinned_version(mirror, chart, repo):
    releases = {r["name"]: r for r in plan(prod_config(charts={"mirror": mirror})).releases}
    assert releases["keda"]["chart"] == chart and releases["keda"]["version"] == "2.16.1"
    assert releases["keda"].get("repositoryOpts", {}).get("repo") == repo
    assert all(r.get("repositoryOpts", {}).get("repo") == repo for r in releases.values())


def test_a_folder_and_a_mirror_together_are_refused():
    with pytest.raises(ConfigError) as raised:
        settings_of(prod_config(charts={"folder": "charts", "mirror": "oci://registry.internal/charts"}))
    assert "ml-serving:charts: set folder (unpacked charts) or mirror (a chart repository), not both" in str(
        raised.value
    )


def gpu_operator_from(folder: Path, **charts_config: Any) -> dict[str, Any]:
    return prod_config(
        gpu={"devicePlugin": "gpu-operator", "dcgmExporter": "install"},
        charts={"folder": str(folder), **charts_config},
    )


def test_the_gpu_operator_s_source_tree_is_refused_naming_both_versions_and_the_fix(chart_folder):
    """The archive's gpu-operator is NVIDIA's source at tag v24.9.2: its Chart.yaml says v1.0.0-devel."""
    chart_yaml = candidates(chart_folder, gpu.gpu_operator(settings_of(prod_config())))[0] / "Chart.yaml"
    message = _refused(gpu_operator_from(chart_folder))
    assert message == (
        f"Pulumi.prod.yaml: ml-serving:charts.folder: the stack pins gpu-operator v24.9.2, but {chart_yaml} says "
        "version v1.0.0-devel (appVersion devel-ubi8): a development build (the chart's source tree, not the "
        "published chart): put the published gpu-operator v24.9.2 there (`helm pull gpu-operator --repo "
        "https://helm.ngc.nvidia.com/nvidia --version v24.9.2 --untar`), or, if that folder is the "
        "source at tag v24.9.2, accept it with charts.develBuilds: {gpu-operator: v1.0.0-devel}"
    )


def test_a_devel_build_accepted_by_name_installs_from_the_folder_and_runs_the_release_images(chart_folder):
    config = gpu_operator_from(chart_folder, develBuilds={"gpu-operator": "v1.0.0-devel"})
    release = next(r for r in plan(config).releases if r["name"] == "gpu-operator")
    assert release["chart"] == str(chart_folder / "gpu-operator-v24.9.2") and "repositoryOpts" not in release
    values = release["values"]
    assert values["operator"]["version"] == values["validator"]["version"] == "v24.9.2", "not the appVersion"


@pytest.mark.parametrize(
    ("devel_builds", "expected"),
    [
        (
            {"gpu-operator": "v2.0.0-devel"},
            "says version v1.0.0-devel, not the v2.0.0-devel that charts.develBuilds accepts",
        ),
        ({"gpu-operator": "v1.0.0-devel", "keda": "v2.16.1-rc1"}, "ml-serving:charts.develBuilds.keda: "),
        (
            {"gpu-operator": "v1.0.0-devel", "kserve": "v0.1.0-devel"},
            "ml-serving:charts.develBuilds.kserve: the stack installs no chart kserve (it installs ",
        ),
    ],
)
def test_develbuilds_accepts_exactly_what_the_folder_holds(chart_folder, devel_builds, expected):
    assert expected in _refused(gpu_operator_from(chart_folder, develBuilds=devel_builds))


@pytest.mark.parametrize(
    ("charts_config", "expected"),
    [
        ({"folder": "charts", "develBuilds": {"gpu-operator": "v24.9.2"}},
         "ml-serving:charts.develBuilds.gpu-operator: 'v24.9.2' is not a development version"),
        ({"develBuilds": {"gpu-operator": "v1.0.0-devel"}},
         "ml-serving:charts: develBuilds accepts charts of a folder: set folder too"),
    ],
)  # fmt: skip
def test_develbuilds_takes_only_development_versions_of_a_folder(charts_config, expected):
    with pytest.raises(ConfigError) as raised:
        settings_of(prod_config(charts=charts_config))
    assert expected in str(raised.value)


def test_releases_wait_for_their_pods_unless_told_not_to():
    waiting = plan(prod_config()).releases
    assert all(r["atomic"] and not r.get("skipAwait") and not r.get("disableWebhooks") for r in waiting)
    eager = plan(prod_config(charts={"wait": False})).releases
    assert all(r["skipAwait"] and r["disableWebhooks"] and not r.get("atomic") for r in eager)


# 2. What the first `up` creates, in order ------------------------------------------------------------------------


def test_each_release_namespace_is_declared_so_destroy_removes_it():
    """Helm's createNamespace makes a namespace Helm never deletes; the monitoring namespace is the stack's own."""
    prod = plan(prod_config())
    declared = {o["metadata"]["name"] for o in prod.find("Namespace")}
    releases = {r["name"]: r for r in prod.releases}
    for name, release in releases.items():
        assert release["namespace"] in declared, name
        assert not release.get("createNamespace") or release["namespace"] == "monitoring", name
    assert {"keda", "seldon-system", "nvidia-device-plugin", "nvidia-dcgm-exporter", "monitoring"} <= declared


def test_the_dcgm_exporter_waits_for_the_prometheus_operator_crds():
    """Its chart holds a ServiceMonitor: Helm refuses a kind the API server does not know yet."""
    listed = {r.chart.release: r for r in charts.charts(settings_of(prod_config()))}
    assert listed["dcgm-exporter"].after == ("kube-prometheus-stack",)
    assert listed["dcgm-exporter"].component == listed["kube-prometheus-stack"].component == "monitoring"
    assert listed["seldon-core"].after == ("keda",)


# 4. Defects found by reading the charts against the values -------------------------------------------------------


def gpu_operator_config() -> dict[str, Any]:
    return prod_config(gpu={"devicePlugin": "gpu-operator", "dcgmExporter": "install"})


def test_the_gpu_operator_gets_the_time_slicing_config_the_settings_count_on():
    values = gpu.gpu_operator(settings_of(gpu_operator_config())).values
    config = values["devicePlugin"]["config"]
    assert config["create"] and config["default"] == "default"
    assert "replicas: 2" in config["data"]["gpu-inference"], "prod's pool shares each GPU between two pods"


def test_the_dcgm_service_monitor_scrapes_at_the_stack_interval():
    config = prod_config()
    config["ml-serving:monitoring"]["scrapeInterval"] = "45s"
    assert gpu.dcgm_exporter(settings_of(config)).values["serviceMonitor"]["interval"] == "45s"


def test_prometheus_selects_every_service_monitor_whatever_the_selector_labels():
    config = prod_config()
    config["ml-serving:monitoring"]["selectorLabels"] = {"team": "ml"}
    spec = monitoring.kube_prometheus_stack(settings_of(config)).values["prometheus"]["prometheusSpec"]
    assert spec["serviceMonitorSelectorNilUsesHelmValues"] is False and "serviceMonitorSelector" not in spec


# 3. The charts' real output --------------------------------------------------------------------------------------


def releases_of(config: dict[str, Any]) -> list[charts.Release]:
    return charts.charts(settings_of(config))


def rendered(helm, chart_folder, release: charts.Release, work: Path) -> list[dict[str, Any]]:
    chart = release.chart
    # Found by folder name: gpu-operator's source tree says v1.0.0-devel, which only charts.develBuilds accepts
    # (test_a_devel_build_accepted_by_name_installs_from_the_folder_and_runs_the_release_images).
    folder = candidates(chart_folder, chart)[0]
    return render(helm, folder, chart.release, chart.namespace, json.loads(json.dumps(chart.values)), work)


def case_configs() -> dict[str, dict[str, Any]]:
    """Every chart a stack may install: prod's, the GPU Operator instead of the plugin, the adapter of `hpa`."""
    hpa = prod_config()
    hpa["ml-serving:platform"]["autoscaler"] = "hpa"
    for model in hpa["ml-serving:models"].values():
        model["autoscaling"].pop("scaleUp", None)
        model["autoscaling"].pop("scaleDown", None)
    return {"prod": prod_config(), "gpu-operator": gpu_operator_config(), "hpa": hpa}


def chart_releases() -> list[tuple[str, str]]:
    """(case, release) once per release name, from the first case that installs it."""
    seen: dict[str, str] = {}
    for case, config in case_configs().items():
        for release in releases_of(config):
            seen.setdefault(release.chart.release, case)
    return [(case, name) for name, case in seen.items()]


def release_named(case: str, name: str) -> charts.Release:
    return next(r for r in releases_of(case_configs()[case]) if r.chart.release == name)


def chart_crd_schemas(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for crd in objects:
        if crd["kind"] == "CustomResourceDefinition":
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                found[(f"{group}/{version['name']}", kind)] = schemas.strict(version["schema"]["openAPIV3Schema"])
    return found


def without_nulls(value: Any) -> Any:
    """The API server drops a custom resource's null fields (non-nullable, structural schema) before validating:
    the GPU Operator's ClusterPolicy renders `migManager.config.name` empty by default."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def validate_all(objects: list[dict[str, Any]], extra: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    problems = []
    known = {**schemas.crd_schemas(), **extra}
    for obj in objects:
        where = f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
        try:
            if schemas.is_custom(obj):
                schema = known.get((obj["apiVersion"], obj["kind"]))
                if schema is None:
                    problems.append(f"{where}: no CRD for {obj['apiVersion']}")
                    continue
                jsonschema.Draft7Validator(schema).validate(without_nulls(obj))
            else:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            problems.append(f"{where}: {getattr(exc, 'message', exc)}"[:400])
    return problems


@pytest.mark.charts
@pytest.mark.parametrize(("case", "name"), chart_releases())
def test_each_chart_renders_with_the_stack_values_into_valid_objects(case, name, helm, chart_folder, tmp_path):
    objects = rendered(helm, chart_folder, release_named(case, name), tmp_path)
    assert objects, "the chart renders something"
    extra = {}
    for release in releases_of(prod_config()):  # CRDs of the other charts (dcgm's ServiceMonitor: kube-prometheus)
        if release.chart.release == "kube-prometheus-stack" and name != release.chart.release:
            extra.update(chart_crd_schemas(rendered(helm, chart_folder, release, tmp_path / "kps")))
    extra.update(chart_crd_schemas(objects))
    assert not validate_all(objects, extra)


# 4, on the rendered charts -----------------------------------------------------------------------------------------


def with_monitoring(**changes: Any) -> dict[str, Any]:
    config = prod_config()
    config["ml-serving:monitoring"].update(changes)
    return config


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return found


@pytest.mark.charts
def test_the_rendered_gpu_operator_shares_each_gpu_as_the_settings_count(helm, chart_folder, tmp_path):
    objects = rendered(helm, chart_folder, release_named("gpu-operator", "gpu-operator"), tmp_path)
    policy = one(objects, "ClusterPolicy")
    assert policy["spec"]["devicePlugin"]["config"] == {"name": gpu.DEVICE_PLUGIN_CONFIG, "default": "default"}
    data = one(objects, "ConfigMap", gpu.DEVICE_PLUGIN_CONFIG)["data"]
    sharing = yaml.safe_load(data["gpu-inference"])["sharing"]["timeSlicing"]["resources"]
    assert sharing == [{"name": gpu.GPU_RESOURCE, "replicas": 2}], "the pool's nodes are labelled with its name"


@pytest.mark.charts
def test_the_rendered_dcgm_service_monitor_scrapes_at_the_stack_interval(helm, chart_folder, tmp_path):
    release = next(r for r in releases_of(with_monitoring(scrapeInterval="45s")) if r.chart.release == "dcgm-exporter")
    monitor = one(rendered(helm, chart_folder, release, tmp_path), "ServiceMonitor")
    assert [e["interval"] for e in monitor["spec"]["endpoints"]] == ["45s"]


@pytest.mark.charts
def test_the_rendered_gpu_operator_from_its_source_tree_runs_the_release_images(helm, chart_folder, tmp_path):
    """Its Chart.yaml says appVersion devel-ubi8, the default tag of the operator's and validator's images."""
    objects = rendered(helm, chart_folder, release_named("gpu-operator", "gpu-operator"), tmp_path)
    (operator,) = one(objects, "Deployment", "gpu-operator")["spec"]["template"]["spec"]["containers"]
    assert operator["image"] == f"nvcr.io/nvidia/gpu-operator:{gpu.GPU_OPERATOR_VERSION}"
    policy = one(objects, "ClusterPolicy")["spec"]
    assert policy["validator"]["version"] == policy["nodeStatusExporter"]["version"] == gpu.GPU_OPERATOR_VERSION


def containers_of(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = obj["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


@pytest.mark.charts
def test_the_rendered_device_plugin_runs_without_capabilities(helm, chart_folder, tmp_path):
    """The containers the chart lets values reach; the rest are PLUGIN_UNSET in SKIP_ROWS."""
    plugin = one(rendered(helm, chart_folder, release_named("prod", PLUGIN), tmp_path), "DaemonSet", PLUGIN)
    containers = containers_of(plugin)
    assert set(containers) == {"nvidia-device-plugin-init", "nvidia-device-plugin-sidecar", "nvidia-device-plugin-ctr"}
    for name in ("nvidia-device-plugin-sidecar", "nvidia-device-plugin-ctr"):
        context = containers[name]["securityContext"]
        assert context["capabilities"] == {"drop": ["ALL"]}, f"{name}: the chart's SYS_ADMIN is not needed"
        assert context["readOnlyRootFilesystem"] and context["allowPrivilegeEscalation"] is False, name
    assert containers["nvidia-device-plugin-ctr"]["resources"]["limits"]["memory"]
    assert plugin["spec"]["template"]["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.charts
def test_the_rendered_writable_folders_of_read_only_containers_are_volumes(helm, chart_folder, tmp_path):
    """A read-only root must not take away a folder the program writes to: Grafana's /tmp and log folder."""
    objects = rendered(helm, chart_folder, release_named("prod", KPS), tmp_path)
    grafana = one(objects, "Deployment", "kube-prometheus-stack-grafana")
    volumes = {v["name"]: v for v in grafana["spec"]["template"]["spec"]["volumes"]}
    for name, container in containers_of(grafana).items():
        assert container["securityContext"]["readOnlyRootFilesystem"], name
    mounts = {m["mountPath"]: m["name"] for m in containers_of(grafana)["grafana"]["volumeMounts"]}
    for folder in ("/tmp", "/var/log/grafana", "/var/lib/grafana"):
        assert "emptyDir" in volumes[mounts[folder]], folder
    assert not [o for o in objects if o["kind"] == "Pod"], "no helm-test Pod: no `up` runs it"


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against an object's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[operator]  # fmt: skip
        if not ok:
            return False
    return True


@pytest.mark.charts
def test_the_rendered_prometheus_selects_its_own_and_the_dcgm_service_monitors(helm, chart_folder, tmp_path):
    by_name = {r.chart.release: r for r in releases_of(with_monitoring(selectorLabels={"team": "ml"}))}
    stack = rendered(helm, chart_folder, by_name["kube-prometheus-stack"], tmp_path / "kps")
    dcgm = rendered(helm, chart_folder, by_name["dcgm-exporter"], tmp_path / "dcgm")
    selector = one(stack, "Prometheus")["spec"]["serviceMonitorSelector"]
    monitors = [o for o in stack + dcgm if o["kind"] == "ServiceMonitor"]
    assert len(monitors) > 5 and any(m["metadata"]["namespace"] == "nvidia-dcgm-exporter" for m in monitors)
    dropped = [m["metadata"]["name"] for m in monitors if not selects(selector, m["metadata"].get("labels", {}))]
    assert not dropped, f"Prometheus would not scrape {dropped}"


# 3. checkov on what the charts really create -----------------------------------------------------------------------

PROD_CHARTS = ("dcgm-exporter", "keda", "kube-prometheus-stack", "nvidia-device-plugin", "seldon-core")
SCANNED = (*PROD_CHARTS, "prometheus-adapter", "gpu-operator")
KPS, DCGM, PLUGIN, SELDON = "kube-prometheus-stack", "dcgm-exporter", "nvidia-device-plugin", "seldon-core"
ADAPTER, OPERATOR = "prometheus-adapter", "gpu-operator"
# A skip for one object of a chart: `chart@` and the start of checkov's resource name.
GPU_OPERATOR_POD = "gpu-operator@Deployment.default.gpu-operator"
CRD_HOOK = "gpu-operator@Job.gpu-operator.gpu-operator-upgrade-crd"
NFD_PRUNE = "gpu-operator@Job.gpu-operator.gpu-operator-node-feature-discovery-prune"
NFD_GC = "gpu-operator@Deployment.gpu-operator.gpu-operator-node-feature-discovery-gc"
SELDON_MANAGER = (
    "chart: seldon-core-operator 1.18.2 templates no container securityContext for its manager (only the pod's "
    "runAsUser, which the stack sets: managerUserID); no value reaches the container"
)
PLUGIN_UNSET = (
    "chart: no value reaches the config-manager init containers' securityContext or resources, nor the sidecar's "
    "resources, and the MPS control daemon's containers are privileged by template (it runs only on nodes labelled "
    "nvidia.com/mps.capable, which time-slicing never sets); the plugin's and sidecar's own contexts and resources "
    "are set (test_the_rendered_device_plugin_runs_without_capabilities)"
)
# Why each check still fails on the charts' output (checkov 3.3.30, the pinned charts, prod's values): one row per
# reason, with the checks and charts it covers. 'chart:' the chart has no value for it; 'upstream:' the workload
# needs it; 'ours:' the stack chooses it. Every (chart, check) pair must still fail: a stale skip fails the test.
SKIP_ROWS: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("CKV2_K8S_6",), SCANNED,
     "ours: the charts ship no NetworkPolicy for their own pods; the stack's NetworkPolicies guard the models "
     "namespace only (the platform's pods talk to the API server, the kubelet and each other)"),
    (("CKV_K8S_15",), (DCGM, KPS, PLUGIN, SELDON, ADAPTER, OPERATOR),  # KEDA's chart pulls Always
     "ours: IfNotPresent with the charts' pinned tags; Always would make each restart depend on the registry (an "
     "air-gapped cluster's mirror)"),
    (("CKV_K8S_43",), SCANNED,
     "ours: images by the charts' pinned tags; a digest must be read from the registry that serves them (the "
     "team's mirror), which the stack does not reach (kube-prometheus-stack's image.sha values could take them)"),
    (("CKV_K8S_38",), (KPS, "keda", PLUGIN, SELDON, ADAPTER, OPERATOR),
     "upstream: the operators, Grafana's sidecars, kube-state-metrics, the webhook Jobs and the device plugin's "
     "config-manager (node labels) call the API server"),
    (("CKV_K8S_38",), (DCGM,),
     "chart: no automountServiceAccountToken value; the token serves `-m` (counters from a ConfigMap), which the "
     "stack does not use (`-f`, a file)"),
    (("CKV_K8S_155",), (KPS, "keda"), "upstream: the operators patch their own webhook configurations (caBundle)"),
    (("CKV2_K8S_5",), (KPS,),
     "upstream: Grafana's dashboard sidecar and the admission-webhook Job read Secrets by design"),
    (("CKV_K8S_49",), (KPS,), "upstream: the Prometheus Operator's ClusterRole uses wildcards on its own API group"),
    (("CKV_K8S_49",), (ADAPTER,),
     "upstream: the adapter's ClusterRole reads every resource's metrics (a wildcard), what a custom metrics API "
     "serves"),
    (("CKV2_K8S_1", "CKV2_K8S_2", "CKV2_K8S_3", "CKV2_K8S_4", "CKV2_K8S_5"), (ADAPTER,),
     "upstream: the chart binds kube-system's horizontal-pod-autoscaler account to read the custom metrics API (what "
     "the adapter is for); checkov cannot see that account's other rights, so it assumes the worst"),
    (("CKV_K8S_17", "CKV_K8S_19"), (KPS,),
     "upstream: node-exporter measures the node, so it needs the host's PID and network namespaces (the chart's "
     "hostPID/hostNetwork: off, it would measure its own pod)"),
    (("CKV_K8S_35",), (KPS,),
     "chart: Grafana reads the admin password from env (GF_SECURITY_ADMIN_PASSWORD), the chart's only way"),
    (("CKV_K8S_8", "CKV_K8S_9"), (KPS,),
     "upstream: Grafana's dashboard sidecars (k8s-sidecar 1.30.3, the chart's pin) serve no health endpoint (its "
     "/healthz came in 1.31.0), so the chart's sidecar probe values have nothing to probe; Grafana has both"),
    (("CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_28", "CKV_K8S_30", "CKV_K8S_31", "CKV_K8S_37"), (SELDON,), SELDON_MANAGER),
    (("CKV_K8S_8", "CKV_K8S_9"), (SELDON, PLUGIN, NFD_GC), "chart: templates no probe and has no value for one"),
    (("CKV_K8S_21",), (OPERATOR,),
     "chart: gpu-operator v24.9.2 templates its Deployment, Role, RoleBinding and ServiceAccounts without a "
     "namespace (Helm puts them in the release's: gpu-operator)"),
    (("CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_23", "CKV_K8S_28", "CKV_K8S_30", "CKV_K8S_37", "CKV_K8S_40"),
     (GPU_OPERATOR_POD, CRD_HOOK),
     "chart: no securityContext value reaches the GPU Operator's container or its CRD-upgrade hook Job"),
    (("CKV_K8S_29", "CKV_K8S_31"), (GPU_OPERATOR_POD, CRD_HOOK, NFD_PRUNE),
     "chart: no pod securityContext value for the GPU Operator, its CRD-upgrade hook Job or NFD's prune hook Job "
     "(whose container takes NFD master's context, set)"),
    (("CKV_K8S_10", "CKV_K8S_11", "CKV_K8S_12", "CKV_K8S_13"), (CRD_HOOK, NFD_PRUNE),
     "chart: no resources value for the hook Jobs (the CRD upgrade, NFD's prune)"),
    (("CKV_K8S_22",), (DCGM,),
     "upstream: the image's entrypoint runs `ldconfig` and `setcap` on its own binary under `set -e` "
     "(dcgm-exporter 4.2.3-4.1.1), so a read-only root stops it; the chart has no value to replace it"),
    (("CKV_K8S_23", "CKV_K8S_40"), (DCGM,),
     "upstream: root, to read the kubelet's pod-resources socket (which pod holds each GPU, what the GPU panels "
     "join on)"),
    (("CKV_K8S_25", "CKV_K8S_39"), (DCGM,), "upstream: SYS_ADMIN for DCGM's profiling metrics (DCGM_FI_PROF_*)"),
    (("CKV_K8S_10", "CKV_K8S_11", "CKV_K8S_12", "CKV_K8S_13", "CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_28",
      "CKV_K8S_30", "CKV_K8S_37"), (PLUGIN,), PLUGIN_UNSET),
    (("CKV_K8S_16",), (PLUGIN,), "chart: the MPS control daemon is privileged by template (see the row of CKV_K8S_20)"),
    (("CKV_K8S_23", "CKV_K8S_40"), (PLUGIN,),
     "upstream: root, to register with the kubelet in its root-owned device-plugins folder (and the MPS daemon)"),
]  # fmt: skip


def checkov_releases() -> list[charts.Release]:
    """prod's charts, the adapter of `hpa` and the GPU Operator (instead of the bare plugin)."""
    return [*releases_of(prod_config()), release_named("hpa", ADAPTER), release_named(OPERATOR, OPERATOR)]


def chart_checkov_skips() -> dict[tuple[str, str], str]:
    """(target, check) -> why; a target is a chart, or `chart@resource` for one of its objects."""
    skips: dict[tuple[str, str], str] = {}
    for checks, targets, why in SKIP_ROWS:
        for target in targets:
            for check in checks:
                assert (target, check) not in skips, f"{target} {check} is in two rows"
                skips[(target, check)] = why
    return skips


def skipped_by(skips: dict[tuple[str, str], str], chart: str, check: str, resource: str) -> list[tuple[str, str]]:
    return [
        (target, c)
        for target, c in skips
        if c == check
        and (target == chart or (target.startswith(f"{chart}@") and resource.startswith(target.split("@")[1])))
    ]


@pytest.mark.charts
def test_checkov_finds_nothing_in_the_charts_output_beyond_the_written_skips(helm, chart_folder, tmp_path):
    from tests.test_cluster_wiring import checkov

    out = tmp_path / "out"
    for release in checkov_releases():
        objects = rendered(helm, chart_folder, release, tmp_path / "render")
        (out / release.chart.release).mkdir(parents=True)
        kept = [o for o in objects if o["kind"] != "CustomResourceDefinition"]
        (out / release.chart.release / "objects.yaml").write_text(yaml.safe_dump_all(kept))
    run = subprocess.run([checkov(), "-d", str(out), "--framework", "kubernetes", "--compact", "-o", "json"],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    reports = json.loads(run.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = {(f["file_path"].strip("/").split("/")[0], f["check_id"], f["resource"])
              for r in reports for f in r["results"]["failed_checks"]}  # fmt: skip
    skips = chart_checkov_skips()
    unexplained = sorted(f for f in failed if not skipped_by(skips, *f))
    assert not unexplained, "\n".join(f"{c} {chart} {res}" for chart, c, res in unexplained)
    stale = sorted(set(skips) - {skip for f in failed for skip in skipped_by(skips, *f)})
    assert not stale, f"skips no longer needed: {stale}"
