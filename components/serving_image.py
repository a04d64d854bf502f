"""ServingImage: the per-model serving images, built from generated contexts, pushed, and named by digest.

Two builders make the same images: pulumi-docker's provider where its plugin can be had, or the project's own
dynamic provider driving the local engine (`builder: dynamic`, ml_serving/image_provider.py). Either way a pushed
image reaches the SeldonDeployment as `repo@sha256:…`, so pods run exactly what was built.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from ml_serving.image import PreparedContext
from ml_serving.image_provider import LocalImage
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
        names: dict[str, pulumi.Input[str]] = {}
        for prepared in {p.context.tag: p for p in args.contexts.values()}.values():
            tag = prepared.context.tag
            names[tag] = f"{settings.repository}/{args.model}:{tag}"
            child = pulumi.ResourceOptions(parent=self)
            if settings.build and settings.builder == "dynamic":
                names[tag] = LocalImage(f"{name}-{tag}", prepared.path, names[tag], settings.push, child).ref
            elif settings.build:
                names[tag] = self._docker_image(f"{name}-{tag}", prepared, names[tag], args, child)
        self.images = {variant: names[p.context.tag] for variant, p in args.contexts.items()}
        self.register_outputs({"images": self.images})

    @staticmethod
    def _docker_image(
        name: str, prepared: PreparedContext, image_name: str, args: ServingImageArgs, opts: pulumi.ResourceOptions
    ) -> pulumi.Output[str]:
        settings = args.settings
        registry = None
        if settings.push and settings.registry_server:
            registry = docker.RegistryArgs(
                server=settings.registry_server, username=settings.registry_username, password=args.password
            )
        image = docker.Image(
            name,
            build=docker.DockerBuildArgs(
                context=str(prepared.path),
                dockerfile=str(prepared.path / "Dockerfile"),
                platform=settings.platform,
                args=prepared.context.build_args,
            ),
            image_name=image_name,
            skip_push=not settings.push,
            registry=registry,
            opts=opts,
        )
        return image.repo_digest if settings.push else image.image_name
