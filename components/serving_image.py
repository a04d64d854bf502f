"""ServingImage: the per-model serving images, built from generated contexts and pushed with pulumi-docker."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from ml_serving.image import PreparedContext
from ml_serving.settings import ServingImage as ServingImageSettings


@dataclass
class ServingImageArgs:
    model: str
    contexts: dict[str, PreparedContext]
    settings: ServingImageSettings
    password: pulumi.Input[str] | None = None


class ServingImage(pulumi.ComponentResource):
    """One image per distinct build context of the model's variants: variants with equal requirements share it."""

    def __init__(self, name: str, args: ServingImageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ml-serving:image:ServingImage", name, None, opts)
        settings = args.settings
        registry = None
        if settings.push and settings.registry_server:
            registry = docker.RegistryArgs(
                server=settings.registry_server, username=settings.registry_username, password=args.password
            )
        names: dict[str, pulumi.Input[str]] = {}
        for prepared in {p.context.tag: p for p in args.contexts.values()}.values():
            tag = prepared.context.tag
            names[tag] = f"{settings.repository}/{args.model}:{tag}"
            if settings.build:
                names[tag] = docker.Image(
                    f"{name}-{tag}",
                    build=docker.DockerBuildArgs(
                        context=str(prepared.path),
                        dockerfile=str(prepared.path / "Dockerfile"),
                        platform=settings.platform,
                        args=prepared.context.build_args,
                    ),
                    image_name=names[tag],
                    skip_push=not settings.push,
                    registry=registry,
                    opts=pulumi.ResourceOptions(parent=self),
                ).image_name
        self.images = {variant: names[p.context.tag] for variant, p in args.contexts.items()}
        self.register_outputs({"images": self.images})
