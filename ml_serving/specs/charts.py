"""Every Helm release the stack may declare, in one list: the components install what it returns, and a stack
whose provider renders YAML (which cannot apply a Helm release) is refused for exactly what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ml_serving.configbase import ConfigError, one_problem
from ml_serving.settings import Settings
from ml_serving.specs import gpu, monitoring, platform
from ml_serving.specs.platform import HelmChart


@dataclass(frozen=True)
class Release:
    """A chart the stack installs, the component that owns it, and the config that asked for it."""

    chart: HelmChart
    component: Literal["platform", "monitoring"]
    config_path: str  # the stack-config field that makes the stack install it
    instead: str  # how to do without it
    after: tuple[str, ...] = ()  # releases (by name) that must be installed first: their CRDs, their webhooks
    # False when the chart renders something new each time (a certificate from `genCA`): the provider's checksum
    # of the rendered manifest then changes on every `up`, so it is ignored and only values and version count.
    stable_output: bool = True
    # The stack declares the release's namespace, so `destroy` removes it (Helm never deletes a namespace it made);
    # not the monitoring namespace, which the monitoring stack declares or the cluster already has.
    owns_namespace: bool = True
    # The component that declared it before (its URN then had that parent): an alias keeps the installed release.
    moved_from: Literal["platform"] | None = None
    # It registers an aggregated API (an APIService served by its own pod). While that API has no ready pod, the
    # namespace controller's discovery fails and every namespace deletion stalls in Terminating; `destroy` deletes
    # in waves, so it must uninstall this release before any namespace: it depends on every namespace the stack owns.
    serves_api: bool = False


def charts(settings: Settings) -> list[Release]:
    """The Helm releases `settings` asks for, in install order."""
    releases: list[Release] = []
    existing = "set it to 'existing' (the cluster runs it already)"
    if settings.platform.keda == "install":
        releases.append(Release(platform.keda(settings), "platform", "platform.keda", existing, serves_api=True))
    if settings.platform.seldon == "install" and settings.platform.backend == "seldon":
        # The operator's webhook reads KEDA's CRDs, so KEDA goes first. Its webhook certificate comes from the
        # chart's genCA: a new one at each render.
        releases.append(
            Release(
                platform.seldon_operator(settings),
                "platform",
                "platform.seldon",
                existing,
                after=("keda",),
                stable_output=False,
            )
        )
    if any(pool.gpu for pool in settings.node_pools.values()):
        # nvidia.com/gpu is schedulable only once the device plugin (or the GPU Operator) runs on GPU nodes.
        if settings.gpu.device_plugin == "device-plugin":
            releases.append(Release(gpu.device_plugin(settings), "platform", "gpu.devicePlugin", existing))
        elif settings.gpu.device_plugin == "gpu-operator":
            releases.append(Release(gpu.gpu_operator(settings), "platform", "gpu.devicePlugin", existing))
    if settings.monitoring is not None and settings.monitoring.stack == "install":
        releases.append(
            Release(
                monitoring.kube_prometheus_stack(settings),
                "monitoring",
                "monitoring.stack",
                existing,
                owns_namespace=False,
            )
        )
    if any(pool.gpu for pool in settings.node_pools.values()) and settings.gpu.dcgm_exporter == "install":
        # Its ServiceMonitor is a kind the Prometheus Operator's CRDs define: with a stack that installs them, the
        # exporter goes after kube-prometheus-stack, in the monitoring component (without monitoring: the platform).
        installs_stack = settings.monitoring is not None and settings.monitoring.stack == "install"
        releases.append(
            Release(
                gpu.dcgm_exporter(settings),
                "monitoring" if settings.monitoring is not None else "platform",
                "gpu.dcgmExporter",
                existing,
                after=("kube-prometheus-stack",) if installs_stack else (),
                moved_from="platform" if settings.monitoring is not None else None,
            )
        )
    if settings.monitoring is not None and settings.platform.autoscaler == "hpa":
        releases.append(
            Release(
                monitoring.prometheus_adapter(settings),
                "monitoring",
                "platform.autoscaler",
                "use platform.autoscaler: keda (its prometheus trigger needs no adapter)",
                owns_namespace=False,
                serves_api=True,
            )
        )
    return releases


def of(settings: Settings, component: str) -> list[Release]:
    return [release for release in charts(settings) if release.component == component]


def check_renderable(settings: Settings, source: str) -> None:
    """A provider that renders YAML cannot apply a Helm release: refuse each one the stack asks for.

    Checked here, where the chart list is built, not in `settings` (which knows nothing of the specs).
    """
    if not settings.kubernetes.render_yaml_to_directory:
        return
    for release in charts(settings):
        raise ConfigError(
            one_problem(
                source,
                release.config_path,
                f"installs the Helm chart {release.chart.chart}, which a provider that renders YAML cannot "
                f"apply: {release.instead}, or remove kubernetes.renderYamlToDirectory",
            )
        )
