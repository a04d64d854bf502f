"""The image build as a node of the stack's graph when pulumi-docker's provider plugin cannot be had.

A Pulumi dynamic provider runs inside the engine (the CLI starts `pulumi-resource-pulumi-python`, which this
project provides: see `dynamic_provider_dir`), so `pulumi up` builds, pushes and hands the digest to the
SeldonDeployment in one graph. The image's name carries the content-addressed tag: a changed context is a new
name, hence a replacement (a rebuild) of exactly that image; an unchanged one is no diff and no build.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pulumi
from pulumi.dynamic import CreateResult, DiffResult, Resource, ResourceProvider

# What identifies an image: a change in any of these rebuilds it. The context's path is not one of them (the
# same content in another checkout is the same image).
IDENTITY = ("name", "push")
PROVIDER_EXECUTABLE = "pulumi-resource-pulumi-python"
TYPE_TOKEN = "pulumi-python:dynamic:Resource"


class ImageBuilder(ResourceProvider):
    """`docker build` (and push) on the engine this machine runs; deleting leaves the image in place."""

    def create(self, props: dict[str, Any]) -> CreateResult:
        from ml_serving.containers import build_image

        built = build_image(Path(props["context"]), props["name"], push=bool(props["push"]))
        return CreateResult(id_=built.ref, outs={**props, "ref": built.ref, "image_id": built.image_id})

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        changed = [key for key in IDENTITY if olds.get(key) != news.get(key)]
        return DiffResult(changes=bool(changed), replaces=changed, delete_before_replace=False)

    def delete(self, _id: str, _props: dict[str, Any]) -> None:
        return None  # the image stays in the engine and the registry: a rollback may need it


class LocalImage(Resource):
    """One serving image built from `context` as `name` (repo:tag); `ref` is `repo@sha256:…` once pushed."""

    ref: pulumi.Output[str]
    image_id: pulumi.Output[str]

    def __init__(self, name: str, context: Path, image_name: str, push: bool, opts: pulumi.ResourceOptions | None):
        props = {"context": str(Path(context).resolve()), "name": image_name, "push": push}
        super().__init__(ImageBuilder(), name, {**props, "ref": None, "image_id": None}, opts)


def dynamic_provider_dir(folder: Path) -> Path:
    """A folder holding `pulumi-resource-pulumi-python` for this interpreter (the CLI built from Go modules does
    not ship it), to put on the engine's PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / PROVIDER_EXECUTABLE
    text = f'#!/bin/sh\nexec "{sys.executable}" -u -m pulumi.dynamic "$@"\n'
    if not script.exists() or script.read_text() != text:
        script.write_text(text)
        script.chmod(0o755)
    return folder


def provider_path_entry() -> str:
    """The PATH entry that provides the dynamic provider, kept beside this interpreter's environment."""
    return str(dynamic_provider_dir(Path(sys.prefix) / "pulumi-dynamic"))


def with_provider_on_path(path: str) -> str:
    return f"{provider_path_entry()}{os.pathsep}{path}"
