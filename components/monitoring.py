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
    # The ServingPlatform, which declared the DCGM exporter's release before it moved here: its alias's parent.
    platform: pulumi.Resource | None = None


class MonitoringStack(pulumi.ComponentResource):
    """With `monitoring.stack: existing`, only the monitors, rules and dashboards are declared."""

    def __init__(self, name: str, args: MonitoringStackArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ml-serving:monitoring:MonitoringStack", name, None, opts)
        settings, child = args.settings, pulumi.ResourceOptions(parent=self)
        first: list[pulumi.Resource] = []
        if settings.monitoring is not None and settings.monitoring.stack == "install":
            namespace = _kubernetes.namespace("monitoring-namespace", specs.monitoring_namespace(settings), child)
            # The admin password goes into a Secret the chart reads, so the chart's values stay reviewable.
            admin = specs.grafana_admin_secret(settings)
            secret = k8s.core.v1.Secret(
                "grafana-admin",
                metadata=admin["metadata"],
                string_data={**admin["stringData"], specs.GRAFANA_PASSWORD_KEY: args.grafana_admin_password},
                opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[namespace])),
            )
            first = [secret]
        releases: dict[str, pulumi.Resource] = {}
        for release in charts.of(settings, "monitoring"):
            before = [*first, *(releases[name] for name in release.after if name in releases)]
            moved = [pulumi.Alias(parent=args.platform)] if release.moved_from and args.platform else None
            opts = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=before, aliases=moved))
            releases[release.chart.release] = _kubernetes.helm_release(
                release, args.chart_sources, settings.charts.wait, opts
            )
        # The Prometheus Operator's CRDs come with the chart: monitors and rules wait for it.
        wait = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=list(releases.values())))
        self.pod_monitor = _kubernetes.custom_resource("pod-monitor", specs.pod_monitor(settings), wait)
        self.rules = _kubernetes.custom_resource("alert-rules", specs.prometheus_rule(settings), wait)
        self.dashboards = [
            _config_map(f"dashboard-{model}", specs.dashboard_config_map(settings, model), wait)
            for model in settings.models
        ]
        self.register_outputs({"dashboards": [d.metadata["name"] for d in self.dashboards]})


def _config_map(name: str, obj: dict, opts: pulumi.ResourceOptions) -> k8s.core.v1.ConfigMap:
    return k8s.core.v1.ConfigMap(name, metadata=obj["metadata"], data=obj["data"], opts=opts)
