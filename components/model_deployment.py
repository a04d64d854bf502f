"""ModelDeployment: one model's serving objects, a variant per registry-resolved version, on the stack's backend:
a SeldonDeployment (`seldon`), or InferenceServices and a VirtualService (`kserve`)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components import _kubernetes
from ml_serving import labels
from ml_serving.registry import ResolvedVersion
from ml_serving.settings import Settings
from ml_serving.specs import kserve, seldon


@dataclass
class ModelDeploymentArgs:
    settings: Settings
    model: str
    versions: dict[str, ResolvedVersion]
    images: dict[str, pulumi.Input[str]]


class ModelDeployment(pulumi.ComponentResource):
    """Serves `settings.models[model]`: under Seldon, weights, shadows and autoscaling are all in its one object;
    under KServe, the weights and shadows are in its one VirtualService."""

    def __init__(self, name: str, args: ModelDeploymentArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ml-serving:serving:ModelDeployment", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        if args.settings.platform.backend == "kserve":
            routing = self._kserve(name, args, child)
            self.routing = routing
            served = routing.metadata["name"]
        else:
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
            served = self.seldon_deployment.metadata["name"]
        self.variants = {
            variant: {"version": v.version, "origin": v.origin, "modelUri": v.model_uri}
            for variant, v in args.versions.items()
        }
        self.register_outputs({"name": served, "variants": self.variants})

    def _kserve(self, name: str, args: ModelDeploymentArgs, child: pulumi.ResourceOptions) -> pulumi.CustomResource:
        """An InferenceService, ScaledObject and PDB per variant, then the VirtualService routing across them."""
        settings, model = args.settings, args.model
        placeholders = dict.fromkeys(args.images, "")  # only the InferenceServices hold the image
        served: list[pulumi.Resource] = []
        for obj in kserve.model_objects(settings, model, args.versions, placeholders):
            resource_name = f"{name}-{obj['kind'].lower()}-{obj['metadata']['name']}"
            if obj["kind"] == "InferenceService":
                variant = obj["metadata"]["labels"][labels.VARIANT]
                spec = pulumi.Output.from_input(args.images[variant]).apply(
                    lambda image, v=variant: kserve.inference_service(settings, model, v, args.versions[v], image)
                )
                obj = {**obj, "spec": spec["spec"]}
            if obj["kind"] == "VirtualService":
                return _kubernetes.custom_resource(
                    resource_name, obj, pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=served))
                )
            served.append(_kubernetes.resource(resource_name, obj, child))
        raise AssertionError("kserve.model_objects ends with the VirtualService")
