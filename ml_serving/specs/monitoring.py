"""Monitoring objects from settings: the scrape (PodMonitor), alert rules, Grafana dashboards, the chart.

All PromQL comes from `ml_serving.metrics`; this module only arranges it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from ml_serving import labels, metrics
from ml_serving.metrics import Scope
from ml_serving.runtimes import Runtime
from ml_serving.settings import AlertThresholds, Model, Settings
from ml_serving.specs.kserve import CONTAINER as KSERVE_CONTAINER
from ml_serving.specs.kserve import METRICS_PATH
from ml_serving.specs.platform import (
    OPERATOR_UID,
    HelmChart,
    chart_resources,
    locked_down,
    namespace_object,
    runtime_default,
)

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
                        {
                            "sourceLabels": [_meta_label(labels.RUNTIME)],
                            "regex": str(Runtime.BENTOML),
                            "action": "keep",
                        },
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


@dataclass(frozen=True)
class Target:
    """What one alert rule is about: a model, one of its variants (or a challenger and its champion)."""

    key: str
    model: Model
    limits: AlertThresholds
    namespace: str
    variant: str = ""

    @property
    def scope(self) -> Scope:
        return Scope(model=self.key, variant=self.variant or None, namespace=self.namespace)

    @property
    def window(self) -> str:
        return self.limits.window

    def relative(self, query: Callable[..., str]) -> str:
        return metrics.relative_to(query, self.key, self.variant, self.model.champion, self.window)

    @property
    def labels(self) -> dict[str, str]:
        return {metrics.MODEL: self.key, **({metrics.VARIANT: self.variant} if self.variant else {})}


@dataclass(frozen=True)
class AlertRule:
    """One alert, declared once: `per` says what it is repeated for (a model, each variant, each weighted
    variant, each challenger); the other fields build its parts from the `Target`."""

    alert: str
    per: Literal["model", "variant", "weighted variant", "challenger"]
    severity: Literal["critical", "warning"]
    expr: Callable[[Target], str]
    summary: Callable[[Target], str]
    description: Callable[[Target], str]
    waits: bool = True  # fires once the condition held for alerts.for; False: at once


ALERTS = (
    AlertRule(
        alert="ModelHighErrorRatio", per="model", severity="critical",
        expr=lambda t: f"{metrics.error_ratio(t.scope, t.window)} > {t.limits.error_ratio}",
        summary=lambda t: f"{WHO}: {{{{ $value | humanizePercentage }}}} of requests fail",
        description=lambda t: (
            f"More than {t.limits.error_ratio:.0%} of inference requests end in a server error (5xx)."
        ),
    ),
    AlertRule(
        alert="ModelHighLatencyP95", per="model", severity="warning",
        expr=lambda t: f"{metrics.latency_p95(t.scope, t.window)} > {t.limits.latency_p95_seconds}",
        summary=lambda t: f"{WHO}: p95 latency {{{{ $value | humanizeDuration }}}}",
        description=lambda t: f"95th percentile request latency is over {t.limits.latency_p95_seconds} s.",
    ),
    AlertRule(
        alert="ModelServingRestarts", per="model", severity="warning", waits=False,
        expr=lambda t: f"{metrics.restarts(t.scope)} > 0",
        summary=lambda t: f"{WHO}: serving process restarted",
        description=lambda t: "A serving process restarted in the last 15 minutes (its request counters reset).",
    ),
    AlertRule(
        alert="ModelVariantNoTraffic", per="weighted variant", severity="warning",
        expr=lambda t: metrics.no_traffic(t.scope, t.window),
        summary=lambda t: f"{t.key}/{t.variant} gets no requests at weight {t.model.variants[t.variant].weight}",
        description=lambda t: (
            f"Variant {t.variant} of {t.key} is configured for {t.model.variants[t.variant].weight}% of traffic "
            "but received none."
        ),
    ),
    AlertRule(
        alert="ModelReplicasBelowMinimum", per="variant", severity="warning",
        expr=lambda t: metrics.replicas_below(t.scope, t.model.autoscaling.min_replicas),
        summary=lambda t: (
            f"{t.key}/{t.variant} runs {{{{ $value }}}} pods, fewer than its minimum "
            f"{t.model.autoscaling.min_replicas}"
        ),
        description=lambda t: "Fewer serving pods are up (scraped) than autoscaling.minReplicas.",
    ),
    AlertRule(
        alert="ModelChallengerWorseThanChampion", per="challenger", severity="warning",
        expr=lambda t: (
            f"({t.relative(metrics.error_ratio)} > {t.limits.challenger_error_factor}) or "
            f"({t.relative(metrics.latency_p95)} > {t.limits.challenger_latency_factor})"
        ),
        summary=lambda t: f"{t.key}: {t.variant} is worse than {t.model.champion}",
        description=lambda t: (
            f"The challenger's error ratio is over {t.limits.challenger_error_factor}x, or its p95 latency over "
            f"{t.limits.challenger_latency_factor}x, the champion's."
        ),
    ),
)  # fmt: skip


def alert_rules(settings: Settings) -> list[dict[str, Any]]:
    """A rule group per model, from ALERTS: each model's rules, then each variant's, then each challenger's."""
    limits = _monitoring(settings).alerts
    groups = []
    for key, model in settings.models.items():
        targets = [("model", Target(key, model, limits, settings.namespace))]
        for name, variant in model.variants.items():
            target = Target(key, model, limits, settings.namespace, name)
            targets += [("weighted variant", target)] if not variant.shadow and variant.weight else []
            targets.append(("variant", target))
        targets += [("challenger", Target(key, model, limits, settings.namespace, name))
                    for name in served(model) if name != model.champion]  # fmt: skip
        rules = []
        for per, target in targets:
            rules += [_alert(rule, target) for rule in ALERTS if rule.per == per]
        groups.append({"name": f"ml-serving-{key}", "rules": rules})
    return groups


def _alert(rule: AlertRule, target: Target) -> dict[str, Any]:
    built: dict[str, Any] = {
        "alert": rule.alert,
        "expr": rule.expr(target),
        "labels": {"severity": rule.severity, **target.labels},
        "annotations": {"summary": rule.summary(target), "description": rule.description(target)},
    }
    if rule.waits and target.limits.for_ != "0m":  # "0m": at once, as Prometheus has it without `for`
        built["for"] = target.limits.for_
    return built


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
            "resources": chart_resources("100m", "128Mi", "500m", "512Mi"),
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
                    },
                    # It writes only to its dashboards folder, an emptyDir (k8s-sidecar 1.30.3, src/helpers.py).
                    "securityContext": {"readOnlyRootFilesystem": True},
                    "resources": chart_resources("50m", "64Mi", "200m", "256Mi"),
                },
                # The image's files are world-readable and its data paths mode 777, so any user runs it; Grafana
                # writes to /var/lib/grafana (the chart's emptyDir), and to /tmp and its log folder, given here.
                "securityContext": {"runAsUser": OPERATOR_UID, "runAsGroup": OPERATOR_UID, "fsGroup": OPERATOR_UID},
                "containerSecurityContext": {"readOnlyRootFilesystem": True},
                "extraEmptyDirMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "logs", "mountPath": "/var/log/grafana"},
                ],
                "resources": chart_resources("100m", "256Mi", "1", "1Gi"),
                "testFramework": {"enabled": False},  # a `helm test` Pod (bats as root) that no `up` ever runs
            },
            "prometheusOperator": {
                "resources": chart_resources("100m", "128Mi", "500m", "512Mi"),
                "admissionWebhooks": {
                    "patch": {
                        "resources": chart_resources("50m", "64Mi", "200m", "128Mi"),
                        "securityContext": {"runAsUser": OPERATOR_UID, "runAsGroup": OPERATOR_UID},
                    }
                },
            },
            "kube-state-metrics": {"resources": chart_resources("50m", "128Mi", "500m", "512Mi")},
            "prometheus-node-exporter": {
                "resources": chart_resources("50m", "64Mi", "250m", "128Mi"),
                "securityContext": runtime_default(),  # merged into the chart's pod context (user 65534)
                "containerSecurityContext": locked_down(),
            },
        },
    )
