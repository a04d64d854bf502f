"""ml-serving: models from the MLflow registry to Seldon Core, one reviewed `pulumi up` diff per change."""

import pulumi

from components import ModelDeployment, ModelDeploymentArgs, ServingPlatform, ServingPlatformArgs
from ml_serving.program import kubernetes_provider, load_settings, resolve_versions

settings = load_settings()
versions = resolve_versions(settings)
provider = kubernetes_provider(settings.kubernetes)

platform = ServingPlatform("platform", ServingPlatformArgs(settings), pulumi.ResourceOptions(providers=[provider]))

deployments = {
    model: ModelDeployment(
        model,
        ModelDeploymentArgs(
            settings,
            model,
            {variant: versions.of(model, variant) for variant in settings.models[model].variants},
            image=settings.serving_image.image,
        ),
        pulumi.ResourceOptions(providers=[provider], depends_on=platform.ready),
    )
    for model in settings.models
}

pulumi.export("namespace", settings.namespace)
pulumi.export("models", {name: deployment.variants for name, deployment in deployments.items()})
