"""ml-serving: models from the MLflow registry to Seldon Core, one reviewed `pulumi up` diff per change."""

from pathlib import Path

import pulumi

from components import (
    GpuNodePool,
    GpuNodePoolArgs,
    ModelDeployment,
    ModelDeploymentArgs,
    ModelsSecurity,
    ModelsSecurityArgs,
    MonitoringStack,
    MonitoringStackArgs,
    ServingImage,
    ServingImageArgs,
    ServingPlatform,
    ServingPlatformArgs,
)
from ml_serving.program import (
    build_contexts,
    chart_sources,
    kubernetes_provider,
    load_settings,
    resolve_versions,
    secret,
)

settings = load_settings()
versions = resolve_versions(settings)
sources = chart_sources(settings)
contexts = build_contexts(settings, versions, Path("build") / pulumi.get_stack())
provider = kubernetes_provider(settings.kubernetes)

# The monitoring stack's namespaces come first: KEDA's release waits for every namespace the stack owns, so that
# `destroy` uninstalls it (and its aggregated API) before deleting any namespace (Release.serves_api).
monitoring = None
if settings.monitoring is not None:
    monitoring = MonitoringStack(
        "monitoring",
        MonitoringStackArgs(
            settings,
            secret(settings.grafana_admin_password),
            sources,
            platform=pulumi.create_urn("platform", "ml-serving:platform:ServingPlatform"),
        ),
        pulumi.ResourceOptions(providers=[provider]),
    )
platform = ServingPlatform(
    "platform",
    ServingPlatformArgs(settings, sources, namespaces=monitoring.namespaces if monitoring else []),
    pulumi.ResourceOptions(providers=[provider]),
)
if monitoring is not None:
    monitoring.install(platform.namespace, platform.namespaces)
security = ModelsSecurity(
    "security",
    ModelsSecurityArgs(settings),
    pulumi.ResourceOptions(providers=[provider], depends_on=[platform.namespace]),
)
pools = [
    GpuNodePool(pool, GpuNodePoolArgs(settings, pool), pulumi.ResourceOptions(providers=[provider]))
    for pool in settings.node_pools
]

deployments = {}
for model in settings.models:
    image = ServingImage(
        model, ServingImageArgs(model, contexts[model], settings.serving_image, secret(settings.registry_password))
    )
    deployments[model] = ModelDeployment(
        model,
        ModelDeploymentArgs(
            settings,
            model,
            {variant: versions.of(model, variant) for variant in settings.models[model].variants},
            images=image.images,
        ),
        pulumi.ResourceOptions(providers=[provider], depends_on=[*platform.ready, *pools]),
    )

pulumi.export("namespace", settings.namespace)
pulumi.export("models", {name: deployment.variants for name, deployment in deployments.items()})
pulumi.export("traffic", {name: model.traffic_fingerprint() for name, model in settings.models.items()})
