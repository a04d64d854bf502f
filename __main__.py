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

platform = ServingPlatform(
    "platform", ServingPlatformArgs(settings, sources), pulumi.ResourceOptions(providers=[provider])
)
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

if settings.monitoring is not None:
    MonitoringStack(
        "monitoring",
        MonitoringStackArgs(settings, secret(settings.grafana_admin_password), sources, platform=platform),
        pulumi.ResourceOptions(providers=[provider], depends_on=[platform.namespace]),
    )

pulumi.export("namespace", settings.namespace)
pulumi.export("models", {name: deployment.variants for name, deployment in deployments.items()})
pulumi.export("traffic", {name: model.traffic_fingerprint() for name, model in settings.models.items()})
