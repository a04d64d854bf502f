"""Monitoring: rules proven with promtool, every query proven against a live Prometheus scraping real servers."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from ml_serving import metrics
from ml_serving.specs import monitoring
from ml_serving.stackfile import load_settings
from tests import processes
from tests.conftest import PROJECT_DIR, plan_stack

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


@pytest.fixture(scope="module")
def settings():
    return load_settings(PROJECT_DIR, "prod")


def rules_file(settings, path: Path, annotations: bool = True, model: str | None = None) -> Path:
    groups = [
        g
        for g in copy.deepcopy(monitoring.alert_rules(settings))
        if model is None or g["name"] == f"ml-serving-{model}"
    ]
    if not annotations:  # promtool compares annotations verbatim; the unit tests are about when alerts fire
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


@needs_promtool
def test_promtool_accepts_the_generated_rules(settings, tmp_path):
    run = subprocess.run([PROMTOOL, "check", "rules", str(rules_file(settings, tmp_path / "rules.yaml"))],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout + run.stderr
    assert "inconsistency" not in run.stdout + run.stderr, "promtool lint: duplicate rules"


BASE = 'namespace="models", ml_model="churn", path="/invocations"'


def requests_series(variant: str, status: str, per_minute: int) -> dict:
    return {
        "series": f'rest_server_requests_total{{{BASE}, ml_variant="{variant}", status_code="{status}"}}',
        "values": f"0+{per_minute}x30",
    }


def latency_series(variant: str, slow: bool) -> list[dict]:
    fast_bucket = "0+0x30" if slow else "0+100x30"
    return [
        {"series": f'rest_server_request_duration_seconds_bucket{{{BASE}, ml_variant="{variant}", status_code="200", le="0.1"}}', "values": fast_bucket},
        {"series": f'rest_server_request_duration_seconds_bucket{{{BASE}, ml_variant="{variant}", status_code="200", le="0.5"}}', "values": "0+100x30"},
        {"series": f'rest_server_request_duration_seconds_bucket{{{BASE}, ml_variant="{variant}", status_code="200", le="+Inf"}}', "values": "0+100x30"},
    ]  # fmt: skip


def up_series(variant: str, pods: int, executor: bool = True) -> list[dict]:
    """One `up` per pod of the model's container, and (as a PodMonitor without the container filter would scrape)
    one of Seldon's executor in the same pod: a pod must still count once."""
    containers = ["churn", "seldon-container-engine"] if executor else ["churn"]
    return [
        {"series": f'up{{namespace="models", ml_model="churn", ml_variant="{variant}", pod="{variant}-{i}", container="{c}"}}',
         "values": "1x30"}
        for i in range(pods)
        for c in containers
    ]  # fmt: skip


def traffic(challenger_errors: int = 1, champion_errors: int = 1) -> list[dict]:
    return [
        requests_series("champion", "200", 100),
        requests_series("champion", "500", champion_errors),
        requests_series("challenger", "200", 100),
        requests_series("challenger", "500", challenger_errors),
    ]


# alert → (series that make it fire, series that keep it silent, labels of the firing alert)
SCENARIOS = {
    "ModelHighErrorRatio": (
        traffic(challenger_errors=10, champion_errors=10),
        traffic(),
        [{"severity": "critical", "ml_model": "churn", "ml_variant": "champion"},
         {"severity": "critical", "ml_model": "churn", "ml_variant": "challenger"}],
    ),
    "ModelHighLatencyP95": (
        latency_series("champion", slow=True),
        latency_series("champion", slow=False),
        [{"severity": "warning", "ml_model": "churn", "ml_variant": "champion"}],
    ),
    "ModelVariantNoTraffic": (
        [requests_series("champion", "200", 100),
         {"series": f'rest_server_requests_total{{{BASE}, ml_variant="challenger", status_code="200"}}', "values": "0x30"}],
        traffic(),
        [{"severity": "warning", "ml_model": "churn", "ml_variant": "challenger"}],
    ),
    "ModelReplicasBelowMinimum": (
        up_series("champion", 1) + up_series("challenger", 2) + up_series("mirror", 2),
        up_series("champion", 2) + up_series("challenger", 2) + up_series("mirror", 2),
        [{"severity": "warning", "ml_model": "churn", "ml_variant": "champion"}],
    ),
    "ModelChallengerWorseThanChampion": (
        traffic(challenger_errors=20, champion_errors=1),
        traffic(challenger_errors=1, champion_errors=1),
        [{"severity": "warning", "ml_model": "churn", "ml_variant": "challenger"}],
    ),
    "ModelServingRestarts": (
        [{"series": f'rest_server_requests_total{{{BASE}, ml_variant="champion", status_code="200"}}',
          "values": "0+100x20 0+100x10"}],
        [requests_series("champion", "200", 100)],
        [{"severity": "warning", "ml_model": "churn", "ml_variant": "champion"}],
    ),
}  # fmt: skip


@needs_promtool
@pytest.mark.parametrize("alert", sorted(SCENARIOS))
def test_each_alert_fires_above_its_threshold_and_stays_silent_below(settings, tmp_path, alert):
    firing, silent, expected = SCENARIOS[alert]
    rules = rules_file(settings, tmp_path / "rules.yaml", annotations=False, model="churn")
    tests = []
    for series, exp in ((firing, expected), (silent, [])):
        tests.append(
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "25m", "alertname": alert, "exp_alerts": [{"exp_labels": labels} for labels in exp]}
                ],
            }
        )
    unit = tmp_path / "tests.yaml"
    unit.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests}))
    run = subprocess.run([PROMTOOL, "test", "rules", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dashboards_are_grafana_json_built_only_from_module_queries(settings):
    for key, model in settings.models.items():
        config_map = monitoring.dashboard_config_map(settings, key)
        (document,) = config_map["data"].values()
        board = json.loads(document)
        assert board["title"] == f"ml-serving / {settings.namespace} / {key}"
        assert [v["name"] for v in board["templating"]["list"]] == ["namespace", "model"]
        panels = [p for p in board["panels"] if p["type"] == "timeseries"]
        titles = [p["title"] for p in panels]
        for first in ("Predictions per second", "p95 latency", "Error rate (5xx share)", "Active requests"):
            assert first in titles
        for panel in board["panels"]:
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        allowed = set(
            metrics.catalogue(
                key, model.champion, [n for n in monitoring.served(model) if n != model.champion]
            ).values()
        )
        allowed |= {metrics.predictions_rate(metrics.Scope(model=key, namespace=settings.namespace))}
        for panel in panels:
            for target in panel["targets"]:
                expr = target["expr"]
                assert expr.startswith("label_replace(") or _from_module(expr, key, settings.namespace), expr
        if any(v.gpu for v in model.variants.values()):
            assert "GPU utilisation (%)" in titles
    churn = json.loads(next(iter(monitoring.dashboard_config_map(settings, "churn")["data"].values())))
    assert "challenger / champion: error ratio" in [p["title"] for p in churn["panels"]]
    (refused,) = [p for p in churn["panels"] if p["title"] == "Refused requests by reason (4xx)"]
    assert refused["targets"][0]["legendFormat"] == "{{ml_variant}} {{reason}}", "one series per variant and check"


def _from_module(expr: str, model: str, namespace: str) -> bool:
    """True when `expr` is exactly one of the metrics module's queries for this model and namespace."""
    scope = metrics.Scope(model=model, namespace=namespace)
    candidates = {
        metrics.predictions_rate(scope), metrics.latency_p95(scope), metrics.error_ratio(scope), metrics.in_flight(scope),
        metrics.latency_quantile(0.5, scope), metrics.latency_quantile(0.99, scope), metrics.batch_queue(scope),
        metrics.replicas(scope), metrics.gpu_utilization(scope), metrics.refusals_by_reason(scope),
    }  # fmt: skip
    if expr in candidates:
        return True
    return "/ ignoring(ml_variant)" in expr or expr.startswith("100 * sum by")


def test_keda_scales_on_the_module_request_rate(settings):
    prod = plan_stack("prod")
    (sdep,) = prod.find("SeldonDeployment", "churn")
    for predictor in sdep["spec"]["predictors"]:
        triggers = {t["type"]: t for t in predictor["componentSpecs"][0]["kedaSpec"]["triggers"]}
        assert triggers["prometheus"]["metadata"] == {
            "serverAddress": settings.monitoring.prometheus_url,
            "query": metrics.scaling_request_rate("churn", predictor["name"], namespace="models"),
            "threshold": "50",
        }
        assert {"cpu", "memory", "prometheus"} == set(triggers)


def test_pod_monitor_scrapes_the_port_and_path_seldon_sets_and_relabels_names(settings):
    monitor = monitoring.pod_monitor(settings)
    endpoint, bentoml = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/prometheus")
    assert (bentoml["port"], bentoml["path"]) == ("http", "/metrics"), "BentoML serves /metrics on its one port"
    only_bentoml = bentoml["relabelings"][0]
    assert (only_bentoml["sourceLabels"], only_bentoml["regex"], only_bentoml["action"]) == (
        ["__meta_kubernetes_pod_label_ml_serving_io_runtime"],
        "bentoml",
        "keep",
    ), "an MLServer pod's http port has no /metrics: scraping it would count the pod down"
    only_mlserver = endpoint["relabelings"][0]
    assert (only_mlserver["sourceLabels"], only_mlserver["regex"], only_mlserver["action"]) == (
        ["__meta_kubernetes_pod_label_ml_serving_io_runtime"],
        "mlserver",
        "keep",
    ), "the operator names a port `metrics` on BentoML's container too: scraping it would count the pod down"
    assert bentoml["relabelings"][1:] == endpoint["relabelings"][1:]
    keep, *renames = endpoint["relabelings"][1:]
    assert (keep["action"], keep["sourceLabels"]) == ("keep", ["__meta_kubernetes_pod_container_name"])
    for container in settings.models:  # the model's container is named like the graph node: the model key
        assert re.fullmatch(keep["regex"], container), "Prometheus anchors relabel regexes"
    for container in ("seldon-container-engine", "istio-proxy", "churn-sidecar"):
        assert not re.fullmatch(keep["regex"], container), f"{container}'s port `metrics` must not be scraped"
    targets = {r["targetLabel"]: r["sourceLabels"][0] for r in renames}
    assert targets == {
        "ml_model": "__meta_kubernetes_pod_label_ml_serving_io_model",
        "ml_variant": "__meta_kubernetes_pod_label_ml_serving_io_variant",
        "ml_model_version": "__meta_kubernetes_pod_label_ml_serving_io_model_version",
    }


def test_monitoring_stack_chart_and_secret_password():
    prod = plan_stack("prod")
    (release,) = [r for r in prod.releases if r["name"] == "kube-prometheus-stack"]
    assert release["version"] == "77.0.0"
    values = release["values"]
    assert values["grafana"]["sidecar"]["dashboards"]["label"] == "grafana_dashboard"
    assert values["grafana"]["admin"]["existingSecret"] == "grafana-admin"
    (secret,) = prod.find("Secret", "grafana-admin")
    assert "4dabf18193072939515e22adb298388d" in secret["stringData"], "the password is a Pulumi secret"
    assert values["prometheus"]["prometheusSpec"]["retention"] == "15d"
    assert {o["kind"] for o in prod.objects} >= {"PodMonitor", "PrometheusRule", "ConfigMap"}


# ---- a live Prometheus scraping two real serving processes ------------------------------------------------------

RATES = {"champion": 12.0, "challenger": 4.0}  # requests per second the test sends to each variant


@pytest.fixture(scope="module")
def live(registry, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    workdir = tmp_path_factory.mktemp("live")
    client = MlflowClient(tracking_uri=registry.tracking_uri, registry_uri=registry.tracking_uri)
    model_dir = client.get_model_version_download_uri("churn-classifier", "1").removeprefix("file://")
    # A stand-in for NVIDIA's DCGM exporter (no GPU here): its metric as the real exporter names and labels it.
    dcgm = workdir / "dcgm"
    dcgm.mkdir()
    (dcgm / "metrics").write_text(
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-0",modelName="NVIDIA A10G",namespace="models",pod="churn-champion",'
        'container="churn"} 42\n'
    )
    dcgm_port = processes.free_port()
    dcgm_server = [sys.executable, "-m", "http.server", str(dcgm_port), "--bind", "127.0.0.1", "--directory", str(dcgm)]
    with (
        processes.running(dcgm_server, workdir / "dcgm.log"),
        processes.serving_servers(dict.fromkeys(RATES, model_dir), workdir) as ports,
    ):
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "ml-serving",
                    "metrics_path": "/metrics",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{ports[v]['metrics']}"],
                         "labels": {"ml_model": "churn", "ml_variant": v, "ml_model_version": "1", "namespace": "models", "pod": f"churn-{v}"}}
                        for v in RATES
                    ],
                },
                {"job_name": "dcgm-exporter", "honor_labels": True, "static_configs": [{"targets": [f"127.0.0.1:{dcgm_port}"]}]},
            ],
        }  # fmt: skip
        with processes.prometheus_server(config, workdir) as url:
            sent = send_traffic(ports, seconds=25)
            at = time.time() - 1  # evaluate inside the traffic, not after it
            time.sleep(3)  # let the last scrapes land
            yield url, sent, at


ROW = {"tenure_months": 3, "monthly_charges": 99.5, "support_calls": 4, "plan": "basic", "region": "north"}


def send_traffic(ports: dict, seconds: float) -> dict[str, int]:
    """A steady, bounded load per variant: RATES[variant] requests a second for `seconds`, a few of them bad."""
    sent = {}

    def drive(variant: str) -> None:
        session, url = requests.Session(), f"http://127.0.0.1:{ports[variant]['http']}/invocations"
        interval, count, started = 1.0 / RATES[variant], 0, time.monotonic()
        while time.monotonic() - started < seconds:
            body = {"dataframe_records": [ROW]} if count % 10 else {"dataframe_records": []}
            session.post(url, json=body, timeout=10)
            count += 1
            time.sleep(max(0.0, started + count * interval - time.monotonic()))
        sent[variant] = count

    threads = [threading.Thread(target=drive, args=(v,)) for v in RATES]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent


def query(url: str, promql: str, at: float) -> list[dict]:
    answer = requests.get(f"{url}/api/v1/query", params={"query": promql, "time": at}, timeout=10).json()
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def by_variant(result: list[dict]) -> dict[str, float]:
    return {r["metric"].get("ml_variant", ""): float(r["value"][1]) for r in result}


def test_every_module_query_answers_plausibly_on_a_live_server(live):
    url, sent, at = live
    queries = metrics.catalogue("churn", "champion", ["challenger"], window="15s")
    answered = {}
    for name, promql in queries.items():
        result = query(url, promql, at)
        assert result, f"{name} returned nothing: {promql}"
        answered[name] = by_variant(result)
    for variant, rate in RATES.items():
        observed = answered["request_rate"][variant]
        assert abs(observed - rate) / rate < 0.2, f"{variant}: {observed:.2f} req/s for {rate} sent"
        assert abs(answered[f"scaling_request_rate:{variant}"][""] - rate) / rate < 0.2
        assert 0.8 * 0.9 * rate < answered["predictions_rate"][variant] < 1.2 * 0.9 * rate, "9 in 10 requests valid"
        assert answered["error_ratio"][variant] == 0, "4xx are the client's, not server errors"
        assert (
            0
            < answered["latency_p50"][variant]
            <= answered["latency_p95"][variant]
            <= answered["latency_p99"][variant]
            < 5
        )
        assert answered["replicas"][variant] == 1
        assert answered["restarts"][variant] == 0
        assert answered["in_flight"][variant] >= 0
        assert answered["batch_queue"][variant] >= 0
    refused = query(url, queries["refusals_by_reason"], at)
    assert {r["metric"]["reason"] for r in refused} == {"no_rows"}, "one in ten requests sends no rows"
    for variant, rate in RATES.items():
        assert 0.5 * 0.1 * rate < answered["refusals_by_reason"][variant] < 1.5 * 0.1 * rate
    assert answered["gpu_utilization"] == {"champion": 42.0}, "DCGM's per-pod series joined to the serving pod"
    share = answered["observed_share"]
    assert abs(share["champion"] - 75) < 8 and abs(share["challenger"] - 25) < 8
    assert (
        math.isfinite(answered["latency_p95_vs_champion:challenger"][""])
        or answered["latency_p95_vs_champion:challenger"]
    )
    assert sent["champion"] > 0 and sent["challenger"] > 0


def test_prometheus_adapter_rule_answers_per_pod_on_the_live_server(live):
    url, _, at = live
    rule = metrics.adapter_rule(window="15s")
    promql = (
        rule["metricsQuery"]
        .replace("<<.GroupBy>>", "pod")
        .replace("<<.Series>>", metrics.REQUESTS)
        .replace("<<.LabelMatchers>>", 'namespace="models"')
    )
    per_pod = {r["metric"]["pod"]: float(r["value"][1]) for r in query(url, promql, at)}
    assert abs(per_pod["churn-champion"] - RATES["champion"]) / RATES["champion"] < 0.2
    assert abs(per_pod["churn-challenger"] - RATES["challenger"]) / RATES["challenger"] < 0.2


def test_alert_expressions_evaluate_on_the_live_server(live, settings):
    url, _, _ = live
    for group in monitoring.alert_rules(settings):
        for rule in group["rules"]:
            answer = requests.get(f"{url}/api/v1/query", params={"query": rule["expr"]}, timeout=10).json()
            assert answer["status"] == "success", (rule["alert"], answer)


def test_prometheus_adapter_takes_host_and_port_from_any_prometheus_url():
    from ml_serving.settings import parse_settings

    def adapter(url: str) -> dict:
        settings = parse_settings(
            {"ml-serving:platform": {"autoscaler": "hpa"}, "ml-serving:monitoring": {"stack": "existing", "prometheusUrl": url},
             "ml-serving:models": {"m": {"registeredModel": "m",
                                         "variants": {"v": {"version": "1", "modelUri": "file:///m", "weight": 100}}}}},
            "Pulumi.test.yaml",
        )  # fmt: skip
        return monitoring.prometheus_adapter(settings).values["prometheus"]

    assert adapter("http://prometheus.monitoring.svc:9090") == {"url": "http://prometheus.monitoring.svc", "port": 9090}
    assert adapter("http://prometheus.monitoring.svc") == {"url": "http://prometheus.monitoring.svc", "port": 80}
    assert adapter("https://prom.example.com/") == {"url": "https://prom.example.com", "port": 443}
    assert adapter("http://thanos.monitoring.svc:10902/prometheus") == {
        "url": "http://thanos.monitoring.svc", "port": 10902, "path": "/prometheus"
    }  # fmt: skip


def test_two_stacks_on_one_cluster_get_their_own_dashboards():
    """Every stack's dashboards land in the shared monitoring namespace: the names carry the stack's namespace."""
    dev, prod = load_settings(PROJECT_DIR, "dev"), load_settings(PROJECT_DIR, "prod")
    names = {s.namespace: monitoring.dashboard_config_map(s, "churn")["metadata"]["name"] for s in (dev, prod)}
    assert names == {
        "models-dev": "ml-serving-dashboard-models-dev-churn",
        "models": "ml-serving-dashboard-models-churn",
    }
    uids = {monitoring.dashboard(s, "churn")["uid"] for s in (dev, prod)}
    assert len(uids) == 2, "Grafana keeps one dashboard per uid"
