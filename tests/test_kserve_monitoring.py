"""Monitoring under KServe with a real Prometheus: two real serving processes run with the env the InferenceService
gives them, are scraped with the PodMonitor's own relabelings over the pod labels KServe puts on its pods, and every
query the product runs (dashboards, alerts, KEDA trigger, rollout gates) answers per variant."""

from __future__ import annotations

import sys
import time

import pytest
import requests
from mlflow.tracking import MlflowClient

from ml_serving import metrics
from ml_serving.settings import parse_settings
from ml_serving.specs import kserve, monitoring
from tests import processes
from tests.test_kserve import kserve_config
from tests.test_monitoring import PROMETHEUS, by_variant, query, send_traffic

VARIANTS = ("champion", "challenger")
OPERATOR_RELABEL = [  # what prometheus-operator adds for every PodMonitor endpoint: namespace and pod target labels
    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
]


def kserve_pod_labels(isvc: dict) -> dict[str, str]:
    """The labels KServe v0.20 puts on a predictor pod (components/predictor.go buildObjectMeta, and the
    deployment reconciler's `app` label): the isvc's, the predictor's, and its own three."""
    name = isvc["metadata"]["name"]
    return {
        **isvc["metadata"]["labels"],
        **isvc["spec"]["predictor"]["labels"],
        "serving.kserve.io/inferenceservice": name,
        "component": "predictor",
        "app": f"isvc.{name}{kserve.PREDICTOR_SUFFIX}",
    }


def relabel(rules: list[dict]) -> list[dict]:
    """A PodMonitor relabeling (camelCase) as Prometheus' relabel_config (snake_case)."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return [{keys.get(k, k): v for k, v in rule.items()} for rule in rules]


@pytest.fixture(scope="module")
def kserve_live(registry, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    settings = parse_settings(kserve_config(), "Pulumi.prod.yaml")
    monitor = monitoring.pod_monitor(settings)
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    workdir = tmp_path_factory.mktemp("kserve-live")
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    model_dir = client.get_model_version_download_uri("churn-classifier", "1").removeprefix("file://")
    resolved = type("Resolved", (), {"version": "1", "model_uri": model_dir, "origin": "test", "run_id": None})
    pods = {}
    for variant in VARIANTS:
        isvc = kserve.inference_service(settings, "churn", variant, resolved, "image:tag")
        pods[variant] = (isvc, isvc["spec"]["predictor"]["containers"][0])
    # The env KServe's pod runs with, but for ports and paths the local processes need their own of.
    env = {e["name"]: e["value"] for e in pods["champion"][1]["env"] if e["name"] == "MLSERVER_METRICS_ENDPOINT"}
    dcgm = workdir / "dcgm"
    dcgm.mkdir()
    (dcgm / "metrics").write_text(
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",namespace="models",pod="churn-champion-predictor-7d9f8-abcde"} 42\n'
    )
    dcgm_port = processes.free_port()
    dcgm_server = [sys.executable, "-m", "http.server", str(dcgm_port), "--bind", "127.0.0.1", "--directory", str(dcgm)]
    with (
        processes.running(dcgm_server, workdir / "dcgm.log"),
        processes.serving_servers(dict.fromkeys(VARIANTS, model_dir), workdir, env=env) as ports,
    ):
        targets = []
        for variant, (isvc, container) in pods.items():
            meta = {monitoring._meta_label(k): v for k, v in kserve_pod_labels(isvc).items()}
            meta[monitoring.CONTAINER_NAME] = container["name"]
            meta["__meta_kubernetes_namespace"] = settings.namespace
            meta["__meta_kubernetes_pod_name"] = f"churn-{variant}-predictor-7d9f8-abcde"
            targets.append({"targets": [f"127.0.0.1:{ports[variant]['metrics']}"], "labels": meta})
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "podMonitor/models/ml-serving-models/0",
                    "metrics_path": endpoint["path"],
                    "static_configs": targets,
                    "relabel_configs": [*relabel(endpoint["relabelings"]), *OPERATOR_RELABEL],
                },
                {"job_name": "dcgm", "honor_labels": True, "static_configs": [{"targets": [f"127.0.0.1:{dcgm_port}"]}]},
            ],
        }
        with processes.prometheus_server(config, workdir) as url:
            send_traffic(ports, seconds=20)
            at = time.time() - 1
            time.sleep(3)  # let the last scrapes land
            yield url, at, settings


def test_every_module_query_selects_kserve_pods_series(kserve_live):
    url, at, _ = kserve_live
    for name, promql in metrics.catalogue("churn", "champion", ["challenger"], window="15s").items():
        answered = by_variant(query(url, promql, at))
        assert answered, f"{name} selects no series of KServe's pods: {promql}"
        if name.startswith(("scaling_request_rate", "error_ratio_vs", "latency_p95_vs")):
            continue  # one variant, or a ratio between two: a single unlabelled series
        if name == "gpu_utilization":
            assert answered == {"champion": 42.0}, "DCGM's per-pod series joined to the KServe pod"
            continue
        assert set(answered) == set(VARIANTS), f"{name}: {answered}"


def test_series_carry_the_stack_files_names_and_version(kserve_live):
    url, at, _ = kserve_live
    (series, *_) = query(url, f'{metrics.REQUESTS}{{{metrics.VARIANT}="challenger"}}', at)
    assert series["metric"][metrics.MODEL] == "churn" and series["metric"][metrics.MODEL_VERSION] == "1"
    assert series["metric"]["namespace"] == "models"


def test_alert_expressions_evaluate_on_kserve_pods(kserve_live):
    url, at, settings = kserve_live
    for group in monitoring.alert_rules(settings):
        for rule in group["rules"]:
            answer = requests.get(f"{url}/api/v1/query", params={"query": rule["expr"], "time": at}, timeout=10)
            assert answer.json()["status"] == "success", (rule["alert"], answer.text)
