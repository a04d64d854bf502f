"""MonitoringStack: kube-prometheus-stack (or an existing one), the PodMonitor, alert rules and dashboards."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_kubernetes as k8s

from components import _kubernetes
from ml_serving.chartsource import ChartSource
from ml_serving.settings import Settings
from ml_serving.specs import charts
from ml_serving.specs import monitoring as specs


@dataclass
class MonitoringStackArgs:
    settings: Settings
    grafana_admin_password: pulumi.Input[str] | None = None
    chart_sources: dict[str, ChartSource] = field(default_factory=dict)  # as ServingPlatformArgs.chart_sources
    # The ServingPlatform's URN (it is declared after this stack's namespaces), which declared the DCGM exporter's
    # release and namespace before they moved here: their aliases' parent.
    platform: pulumi.Input[str] | None = None


class MonitoringStack(pulumi.ComponentResource):
    """With `monitoring.stack: existing`, only the monitors, rules and dashboards are declared.

    Built in two steps: the constructor declares the namespaces (before the platform, whose KEDA release must wait
    for every namespace: `Release.serves_api`), `install` the rest once the platform exists.
    """

    def __init__(self, name: str, args: MonitoringStackArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ml-serving:monitoring:MonitoringStack", name, None, opts)
        settings, self._args, self._child = args.settings, args, pulumi.ResourceOptions(parent=self)
        self._namespace = None
        if settings.monitoring is not None and settings.monitoring.stack == "install":
            self._namespace = _kubernetes.namespace(
                "monitoring-namespace", specs.monitoring_namespace(settings), self._child
            )
        self._owned = {r.chart.release: self._own(r) for r in charts.of(settings, "monitoring")}
        self.namespaces = [ns for ns in (self._namespace, *self._owned.values()) if ns is not None]

    def _moved(self, release: charts.Release) -> list[pulumi.Alias] | None:
        return [pulumi.Alias(parent=self._args.platform)] if release.moved_from and self._args.platform else None

    def _own(self, release: charts.Release) -> pulumi.Resource | None:
        moved = pulumi.ResourceOptions(aliases=self._moved(release))
        return _kubernetes.owned_namespace(release, pulumi.ResourceOptions.merge(self._child, moved))

    def install(self, models_namespace: pulumi.Resource, everything: list[pulumi.Resource]) -> None:
        """The releases, monitors, rules and dashboards; `everything`: every namespace the stack owns."""
        settings, args, child = self._args.settings, self._args, self._child
        first: list[pulumi.Resource] = []
        if self._namespace is not None:
            # The admin password goes into a Secret the chart reads, so the chart's values stay reviewable.
            admin = specs.grafana_admin_secret(settings)
            secret = k8s.core.v1.Secret(
                "grafana-admin",
                metadata=admin["metadata"],
                string_data={**admin["stringData"], specs.GRAFANA_PASSWORD_KEY: args.grafana_admin_password},
                opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[self._namespace])),
            )
            first = [secret]
        releases: dict[str, pulumi.Resource] = {}
        for release in charts.of(settings, "monitoring"):
            before = [*first, *(releases[name] for name in release.after if name in releases)]
            moved = self._moved(release)
            opts = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=before, aliases=moved))
            own = self._owned[release.chart.release]
            releases[release.chart.release] = _kubernetes.helm_release(
                release,
                args.chart_sources,
                settings.charts.wait,
                opts,
                everything if release.serves_api else [own] if own is not None else [],
            )
        # The Prometheus Operator's CRDs come with the chart: monitors and rules wait for it.
        wait = pulumi.ResourceOptions.merge(
            child, pulumi.ResourceOptions(depends_on=[models_namespace, *releases.values()])
        )
        self.pod_monitor = _kubernetes.custom_resource("pod-monitor", specs.pod_monitor(settings), wait)
        self.rules = _kubernetes.custom_resource("alert-rules", specs.prometheus_rule(settings), wait)
        self.dashboards = [
            _config_map(f"dashboard-{model}", specs.dashboard_config_map(settings, model), wait)
            for model in settings.models
        ]
        self.register_outputs({"dashboards": [d.metadata["name"] for d in self.dashboards]})


def _config_map(name: str, obj: dict, opts: pulumi.ResourceOptions) -> k8s.core.v1.ConfigMap:
    return k8s.core.v1.ConfigMap(name, metadata=obj["metadata"], data=obj["data"], opts=opts)
