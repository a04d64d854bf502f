"""ServingPlatform: the namespace and what Seldon needs to serve and split traffic (each part switchable off)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_kubernetes as k8s

from components import _kubernetes
from ml_serving.chartsource import ChartSource
from ml_serving.settings import Settings
from ml_serving.specs import charts, kserve, seldon
from ml_serving.specs import platform as specs


@dataclass
class ServingPlatformArgs:
    settings: Settings
    # Each release's chart source by release name (ml_serving.chartsource.sources, as the program located them).
    chart_sources: dict[str, ChartSource]
    # Namespaces declared before the platform (the monitoring stack's): a release that serves an aggregated API
    # waits for them too, so `destroy` uninstalls it before deleting them.
    namespaces: list[pulumi.Resource] = field(default_factory=list)


class ServingPlatform(pulumi.ComponentResource):
    """Namespace, Seldon Core v1 operator, KEDA, the Istio gateway, GPU support and the artifact store's Secret
    (under KServe, its Secret and service account)."""

    def __init__(self, name: str, args: ServingPlatformArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ml-serving:platform:ServingPlatform", name, None, opts)
        settings, child = args.settings, pulumi.ResourceOptions(parent=self)
        self.namespace = _kubernetes.namespace(settings.namespace, specs.namespace(settings), child)
        platform_releases = charts.of(settings, "platform")
        owned = {r.chart.release: _kubernetes.owned_namespace(r, child) for r in platform_releases}
        # Every namespace the stack owns, for a release that must be uninstalled before any of them is deleted.
        self.namespaces = [self.namespace, *(ns for ns in owned.values() if ns is not None), *args.namespaces]
        releases: dict[str, pulumi.Resource] = {}
        for release in platform_releases:
            first = [releases[name] for name in release.after if name in releases]
            opts = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=first))
            own = owned[release.chart.release]
            releases[release.chart.release] = _kubernetes.helm_release(
                release,
                args.chart_sources,
                settings.charts.wait,
                opts,
                self.namespaces if release.serves_api else [own] if own is not None else [],
            )
        kserve_backend = settings.platform.backend == "kserve"
        artifacts = kserve.s3_secret(settings) if kserve_backend else seldon.artifact_secret(settings)
        self.artifact_secret = None
        if artifacts is not None:
            # rclone's variables may hold keys (`pulumi config set --secret --path ...`): a secret in the state.
            self.artifact_secret = k8s.core.v1.Secret(
                "artifact-store",
                metadata=artifacts["metadata"],
                type=artifacts["type"],
                string_data=pulumi.Output.secret(artifacts["stringData"]),
                opts=pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[self.namespace])),
            )
        account = kserve.service_account(settings) if kserve_backend else None
        self.service_account = None
        if account is not None:
            after = [r for r in (self.namespace, self.artifact_secret) if r is not None]
            self.service_account = _kubernetes.resource(
                "artifact-store-account",
                account,
                pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=after)),
            )
        self.gateway = None
        if settings.platform.istio_gateway == "install":
            self.gateway = _kubernetes.custom_resource("istio-gateway", specs.istio_gateway(settings), child)
        extras = [r for r in (self.gateway, self.artifact_secret, self.service_account) if r is not None]
        self.ready = [self.namespace, *releases.values(), *extras]
        self.register_outputs({"namespace": self.namespace.metadata["name"]})
