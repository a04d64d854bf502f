"""ModelDeployment: one model's SeldonDeployment, a predictor per variant with its registry-resolved version."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components import _kubernetes
from ml_serving.registry import ResolvedVersion
from ml_serving.settings import Settings
from ml_serving.specs import seldon


@dataclass
class ModelDeploymentArgs:
    settings: Settings
    model: str
    versions: dict[str, ResolvedVersion]
    images: dict[str, pulumi.Input[str]]


class ModelDeployment(pulumi.ComponentResource):
    """Serves `settings.models[model]`: traffic weights, shadows and autoscaling are all in its one object."""

    def __init__(self, name: str, args: ModelDeploymentArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ml-serving:serving:ModelDeployment", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        spec = pulumi.Output.all(**args.images).apply(
            lambda images: seldon.seldon_deployment(args.settings, args.model, args.versions, images)
        )
        self.seldon_deployment = _kubernetes.custom_resource(
            f"{name}-seldon",
            {
                "apiVersion": seldon.API_VERSION,
                "kind": "SeldonDeployment",
                "metadata": spec["metadata"],
                "spec": spec["spec"],
            },
            child,
        )
        self.variants = {
            variant: {"version": v.version, "origin": v.origin, "modelUri": v.model_uri}
            for variant, v in args.versions.items()
        }
        self.register_outputs({"name": self.seldon_deployment.metadata["name"], "variants": self.variants})
