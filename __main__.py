"""ml-serving: models from the MLflow registry to Seldon Core, one reviewed `pulumi up` diff per change."""

from pathlib import Path

import pulumi

from components import (
    GpuNodePool,
    GpuNodePoolArgs,
    ModelDeployment,
    ModelDeploymentArgs,
    ServingImage,
    ServingImageArgs,
    ServingPlatform,
    ServingPlatformArgs,
)
from ml_serving.program import (
    build_contexts,
    kubernetes_provider,
    load_settings,
    registry_password,
    resolve_versions,
)

settings = load_settings()
versions = resolve_versions(settings)
contexts = build_contexts(settings, versions, Path("build") / pulumi.get_stack())
provider = kubernetes_provider(settings.kubernetes)

platform = ServingPlatform("platform", ServingPlatformArgs(settings), pulumi.ResourceOptions(providers=[provider]))
pools = [
    GpuNodePool(pool, GpuNodePoolArgs(settings, pool), pulumi.ResourceOptions(providers=[provider]))
    for pool in settings.node_pools
]

deployments = {}
for model in settings.models:
    image = ServingImage(
        model, ServingImageArgs(model, contexts[model], settings.serving_image, registry_password(settings))
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
