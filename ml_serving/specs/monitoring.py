"""Monitoring objects from settings: the scrape (PodMonitor), alert rules, Grafana dashboards, the chart.

All PromQL comes from `ml_serving.metrics`; this module only arranges it.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

from ml_serving import labels, metrics
from ml_serving.metrics import Scope
from ml_serving.settings import Model, Settings
from ml_serving.specs.kserve import CONTAINER as KSERVE_CONTAINER
from ml_serving.specs.kserve import METRICS_PATH
from ml_serving.specs.platform import HelmChart, namespace_object

MONITORING_API = "monitoring.coreos.com/v1"
DASHBOARD_LABEL = "grafana_dashboard"
BENTOML_METRICS_PATH = "/metrics"
CONTAINER_NAME = "__meta_kubernetes_pod_container_name"  # Prometheus' service discovery label
GRAFANA_ADMIN_SECRET = "grafana-admin"
GRAFANA_USER_KEY, GRAFANA_PASSWORD_KEY = "admin-user", "admin-password"
WHO = f"{metrics.alert_label(metrics.MODEL)}/{metrics.alert_label(metrics.VARIANT)}"  # an alert's model/variant


def _meta_label(key: str) -> str:
    """Prometheus' name for a pod label in service discovery (`ml-serving.io/model` → `…_ml_serving_io_model`)."""
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in key)


def pod_monitor(settings: Settings) -> dict[str, Any]:
    """Scrape every serving pod's MLServer metrics; carry model, variant and version over from pod labels."""
    # Seldon's executor sidecar names a port `metrics` too: only the model's container (named like the graph node,
    # i.e. the model key; under KServe, `kserve-container`) is scraped, so each pod is one target.
    containers = [KSERVE_CONTAINER] if settings.platform.backend == "kserve" else list(settings.models)
    keep_model_container = {
        "sourceLabels": [CONTAINER_NAME],
        "regex": "|".join(re.escape(name) for name in containers),
        "action": "keep",
    }
    relabel = [keep_model_container] + [
        {"sourceLabels": [_meta_label(label)], "targetLabel": target, "action": "replace"}
        for label, target in (
            (labels.MODEL, metrics.MODEL),
            (labels.VARIANT, metrics.VARIANT),
            (labels.MODEL_VERSION, metrics.MODEL_VERSION),
        )
    ]
    return {
        "apiVersion": MONITORING_API,
        "kind": "PodMonitor",
        "metadata": {
            "name": "ml-serving-models",
            "namespace": settings.namespace,
            "labels": {**labels.common("monitoring"), **_monitoring(settings).selector_labels},
        },
        "spec": {
            "selector": {"matchExpressions": [{"key": labels.MODEL, "operator": "Exists"}]},
            "namespaceSelector": {"matchNames": [settings.namespace]},
            "podMetricsEndpoints": [
                {  # MLServer pods only: the operator names a port `metrics` on BentoML's container too (6000)
                    "port": "metrics",
                    "path": METRICS_PATH,
                    "interval": _monitoring(settings).scrape_interval,
                    "relabelings": [
                        {"sourceLabels": [_meta_label(labels.RUNTIME)], "regex": "mlserver", "action": "keep"},
                        *relabel,
                    ],
                },
                {  # BentoML serves /metrics on its one port, `http`; only BentoML pods are scraped there
                    "port": "http",
                    "path": BENTOML_METRICS_PATH,
                    "interval": _monitoring(settings).scrape_interval,
                    "relabelings": [
                        {"sourceLabels": [_meta_label(labels.RUNTIME)], "regex": "bentoml", "action": "keep"},
                        *relabel,
                    ],
                },
            ],
        },
    }


def _monitoring(settings: Settings):  # type: ignore[no-untyped-def]
    assert settings.monitoring is not None, "monitoring specs are built only for stacks with ml-serving:monitoring"
    return settings.monitoring


def served(model: Model) -> list[str]:
    return [name for name, variant in model.variants.items() if not variant.shadow]


def alert_rules(settings: Settings) -> list[dict[str, Any]]:
    """A rule group per model: errors, p95 latency, silent variants, replicas, challenger vs champion, restarts."""
    monitoring = _monitoring(settings)
    limits, window = monitoring.alerts, monitoring.alerts.window
    groups = []
    for key, model in settings.models.items():
        scope = Scope(model=key, namespace=settings.namespace)
        rules: list[dict[str, Any]] = [
            _alert(
                "ModelHighErrorRatio",
                f"{metrics.error_ratio(scope, window)} > {limits.error_ratio}",
                limits.for_,
                "critical",
                f"{WHO}: {{{{ $value | humanizePercentage }}}} of requests fail",
                f"More than {limits.error_ratio:.0%} of inference requests end in a server error (5xx).",
                {metrics.MODEL: key},
            ),
            _alert(
                "ModelHighLatencyP95",
                f"{metrics.latency_p95(scope, window)} > {limits.latency_p95_seconds}",
                limits.for_,
                "warning",
                f"{WHO}: p95 latency {{{{ $value | humanizeDuration }}}}",
                f"95th percentile request latency is over {limits.latency_p95_seconds} s.",
                {metrics.MODEL: key},
            ),
            _alert(
                "ModelServingRestarts",
                f"{metrics.restarts(scope)} > 0",
                "0m",
                "warning",
                f"{WHO}: serving process restarted",
                "A serving process restarted in the last 15 minutes (its request counters reset).",
                {metrics.MODEL: key},
            ),
        ]
        for name, variant in model.variants.items():
            one = Scope(model=key, variant=name, namespace=settings.namespace)
            if not variant.shadow and variant.weight:
                rules.append(
                    _alert(
                        "ModelVariantNoTraffic",
                        metrics.no_traffic(one, window),
                        limits.for_,
                        "warning",
                        f"{key}/{name} gets no requests at weight {variant.weight}",
                        f"Variant {name} of {key} is configured for {variant.weight}% of traffic but received none.",
                        {metrics.MODEL: key, metrics.VARIANT: name},
                    )
                )
            rules.append(
                _alert(
                    "ModelReplicasBelowMinimum",
                    metrics.replicas_below(one, model.autoscaling.min_replicas),
                    limits.for_,
                    "warning",
                    f"{key}/{name} runs {{{{ $value }}}} pods, fewer than its minimum {model.autoscaling.min_replicas}",
                    "Fewer serving pods are up (scraped) than autoscaling.minReplicas.",
                    {metrics.MODEL: key, metrics.VARIANT: name},
                )
            )
        champion = model.champion
        for challenger in (n for n in served(model) if n != champion):
            rules.append(
                _alert(
                    "ModelChallengerWorseThanChampion",
                    f"({metrics.relative_to(metrics.error_ratio, key, challenger, champion, window)} "
                    f"> {limits.challenger_error_factor}) or "
                    f"({metrics.relative_to(metrics.latency_p95, key, challenger, champion, window)} "
                    f"> {limits.challenger_latency_factor})",
                    limits.for_,
                    "warning",
                    f"{key}: {challenger} is worse than {champion}",
                    f"The challenger's error ratio is over {limits.challenger_error_factor}x, or its p95 latency over "
                    f"{limits.challenger_latency_factor}x, the champion's.",
                    {metrics.MODEL: key, metrics.VARIANT: challenger},
                )
            )
        groups.append({"name": f"ml-serving-{key}", "rules": rules})
    return groups


def _alert(
    name: str, expr: str, for_: str, severity: str, summary: str, description: str, extra: dict | None = None
) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "alert": name,
        "expr": expr,
        "labels": {"severity": severity, **(extra or {})},
        "annotations": {"summary": summary, "description": description},
    }
    if for_ != "0m":
        rule["for"] = for_
    return rule


def prometheus_rule(settings: Settings) -> dict[str, Any]:
    return {
        "apiVersion": MONITORING_API,
        "kind": "PrometheusRule",
        "metadata": {
            "name": "ml-serving-alerts",
            "namespace": settings.namespace,
            "labels": {**labels.common("monitoring"), **_monitoring(settings).selector_labels},
        },
        "spec": {"groups": alert_rules(settings)},
    }


def dashboard(settings: Settings, key: str) -> dict[str, Any]:
    """A Grafana dashboard for one model: the four panels per variant, champion vs challenger, weights, replicas."""
    model = settings.models[key]
    scope = Scope(model=key, namespace=settings.namespace)
    panels: list[dict[str, Any]] = []
    row = _Layout(panels)
    row.header("Per variant")
    row.panel("Predictions per second", [metrics.predictions_rate(scope)], "reqps")
    row.panel("p95 latency", [metrics.latency_p95(scope)], "s")
    row.panel("Error rate (5xx share)", [metrics.error_ratio(scope)], "percentunit")
    row.panel("Active requests", [metrics.in_flight(scope)], "short")
    row.panel(
        "Request latency p50 / p99", [metrics.latency_quantile(0.5, scope), metrics.latency_quantile(0.99, scope)], "s"
    )
    row.panel("Batch queue (mean size)", [metrics.batch_queue(scope)], "short")
    row.panel(
        "Refused requests by reason (4xx)",
        [metrics.refusals_by_reason(scope)],
        "reqps",
        metrics.legend(metrics.VARIANT, metrics.REASON),
    )
    champion = model.champion
    challengers = [n for n in served(model) if n != champion]
    if challengers:
        row.header(f"Champion ({champion}) vs challenger")
        for challenger in challengers:
            row.panel(
                f"{challenger} / {champion}: error ratio",
                [metrics.relative_to(metrics.error_ratio, key, challenger, champion)],
                "short",
            )
            row.panel(
                f"{challenger} / {champion}: p95 latency",
                [metrics.relative_to(metrics.latency_p95, key, challenger, champion)],
                "short",
            )
    row.header("Traffic and capacity")
    weights = [metrics.configured_value(key, n, float(model.variants[n].weight or 0)) for n in served(model)]
    row.panel(
        "Traffic share: configured vs observed (%)", [*weights, metrics.observed_share(key, served(model))], "percent"
    )
    bounds = [
        metrics.configured_value(key, "min", float(model.autoscaling.min_replicas)),
        metrics.configured_value(key, "max", float(model.autoscaling.max_replicas)),
    ]
    row.panel("Replicas and autoscaling bounds", [metrics.replicas(scope), *bounds], "short")
    if any(v.gpu for v in model.variants.values()):
        row.panel("GPU utilisation (%)", [metrics.gpu_utilization(scope)], "percent")
    return {
        "title": f"ml-serving / {settings.namespace} / {key}",
        "uid": f"ml-serving-{settings.namespace}-{key}"[:40],
        "tags": ["ml-serving", key],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "templating": {
            "list": [
                _variable("namespace", metrics.label_values("namespace"), settings.namespace),
                _variable("model", metrics.label_values(metrics.MODEL), key),
            ]
        },
        "panels": panels,
    }


def _variable(name: str, query: str, current: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "query": {"query": query, "refId": name},
        "current": {"text": current, "value": current},
        "refresh": 2,
    }


class _Layout:
    """Places panels four to a row on Grafana's 24-column grid."""

    def __init__(self, panels: list[dict[str, Any]]) -> None:
        self.panels, self.x, self.y = panels, 0, 0

    def header(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + 8
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "row",
                "title": title,
                "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
                "collapsed": False,
                "panels": [],
            }
        )
        self.y += 1

    def panel(self, title: str, queries: list[str], unit: str, legend: str = metrics.legend()) -> None:
        self.panels.append(
            {
                "id": len(self.panels) + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "prometheus"},
                "gridPos": {"x": self.x, "y": self.y, "w": 6, "h": 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "table", "placement": "bottom"}},
                "targets": [
                    {"refId": chr(ord("A") + i), "expr": q, "legendFormat": legend} for i, q in enumerate(queries)
                ],
            }
        )
        self.x += 6
        if self.x >= 24:
            self.x, self.y = 0, self.y + 8


def dashboard_config_map(settings: Settings, key: str) -> dict[str, Any]:
    """Grafana's sidecar loads every ConfigMap with the dashboard label. The shared monitoring namespace holds every
    stack's dashboards, so the name carries the stack's own namespace (two stacks may both serve `churn`)."""
    board = json.dumps(dashboard(settings, key), indent=1, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"ml-serving-dashboard-{settings.namespace}-{key}",
            "namespace": _monitoring(settings).namespace,
            "labels": {**labels.common("monitoring"), DASHBOARD_LABEL: "1"},
        },
        "data": {f"ml-serving-{settings.namespace}-{key}.json": board},
    }


def prometheus_adapter(settings: Settings) -> HelmChart:
    """Serves the request rate to Kubernetes' custom metrics API for stacks on Seldon's hpaSpec (no KEDA)."""
    monitoring = _monitoring(settings)
    url = urlsplit(monitoring.prometheus_url)
    prometheus: dict[str, Any] = {
        "url": f"{url.scheme}://{url.hostname}",
        "port": url.port or (443 if url.scheme == "https" else 80),
    }
    if url.path.strip("/"):
        prometheus["path"] = url.path
    return HelmChart(
        release="prometheus-adapter",
        chart="prometheus-adapter",
        version="4.14.1",
        repository="https://prometheus-community.github.io/helm-charts",
        namespace=monitoring.namespace,
        values={
            "prometheus": prometheus,
            "rules": {"default": False, "custom": [metrics.adapter_rule()]},
        },
    )


def monitoring_namespace(settings: Settings) -> dict[str, Any]:
    return namespace_object(_monitoring(settings).namespace, "monitoring")


def grafana_admin_secret(settings: Settings) -> dict[str, Any]:
    """Grafana's admin credentials; the component adds the password (a Pulumi secret) under GRAFANA_PASSWORD_KEY."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": GRAFANA_ADMIN_SECRET,
            "namespace": _monitoring(settings).namespace,
            "labels": labels.common("monitoring"),
        },
        "stringData": {GRAFANA_USER_KEY: "admin"},
    }


def kube_prometheus_stack(settings: Settings) -> HelmChart:
    """Prometheus Operator, Prometheus, Alertmanager and Grafana, pinned; Grafana's admin from GRAFANA_ADMIN_SECRET."""
    monitoring = _monitoring(settings)
    return HelmChart(
        release="kube-prometheus-stack",
        chart="kube-prometheus-stack",
        version="77.0.0",
        repository="https://prometheus-community.github.io/helm-charts",
        namespace=monitoring.namespace,
        values={
            "prometheus": {
                "prometheusSpec": {
                    "retention": monitoring.retention,
                    "scrapeInterval": monitoring.scrape_interval,
                    "resources": {
                        "requests": {"cpu": monitoring.resources.cpu, "memory": monitoring.resources.memory},
                        "limits": {"memory": monitoring.resources.memory_limit or monitoring.resources.memory},
                    },
                    "storageSpec": {
                        "volumeClaimTemplate": {
                            "spec": {
                                "accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": monitoring.storage_size}},
                            }
                        }
                    },
                    # Every PodMonitor, ServiceMonitor and PrometheusRule: the chart's own service monitors carry
                    # `release: <release>`, the DCGM exporter's carry selectorLabels; a label selector cannot
                    # select both once selectorLabels differ from the release label.
                    "podMonitorSelectorNilUsesHelmValues": False,
                    "serviceMonitorSelectorNilUsesHelmValues": False,
                    "ruleSelectorNilUsesHelmValues": False,
                }
            },
            "grafana": {
                "admin": {
                    "existingSecret": GRAFANA_ADMIN_SECRET,
                    "userKey": GRAFANA_USER_KEY,
                    "passwordKey": GRAFANA_PASSWORD_KEY,
                },
                "sidecar": {
                    "dashboards": {
                        "enabled": True,
                        "label": DASHBOARD_LABEL,
                        "labelValue": "1",
                        "searchNamespace": "ALL",
                    }
                },
            },
        },
    )
