"""Plan a stack offline: run the real `__main__.py` with the real stack config under Pulumi's mock engine.

The mocks record what the program declares; the Kubernetes objects are written as YAML (one file each) and
summarised, so a stack can be reviewed without the Pulumi CLI, a cluster or cloud credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import runpy
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ml_serving import PROJECT
from ml_serving.stackfile import read_config, stack_file

HELM_RELEASE = "kubernetes:helm.sh/v3:Release"
DOCKER_IMAGE = "docker:index/image:Image"
DYNAMIC = "pulumi-python:dynamic:Resource"  # the image build on the local engine (ml_serving/image_provider.py)
IMAGES = (DOCKER_IMAGE, DYNAMIC)


@dataclass(frozen=True)
class Declared:
    """One resource registration the program made."""

    type: str
    name: str
    inputs: dict[str, Any]
    custom: bool


@dataclass
class Plan:
    stack: str
    resources: list[Declared] = field(default_factory=list)

    @property
    def objects(self) -> list[dict[str, Any]]:
        """Every Kubernetes object the stack declares, as the API server would receive it."""
        return [r.inputs for r in self.resources if r.custom and _is_kubernetes_object(r)]

    @property
    def releases(self) -> list[dict[str, Any]]:
        return [r.inputs for r in self.resources if r.type == HELM_RELEASE]

    @property
    def images(self) -> list[dict[str, Any]]:
        return [r.inputs for r in self.resources if r.type == DOCKER_IMAGE]

    @property
    def image_refs(self) -> list[str]:
        """What the pods are told to run: each built image's name, or `repo@sha256:…` once pushed."""
        return [next(iter(image_outputs(r.type, r.inputs).values())) for r in self.resources if r.type in IMAGES]

    @property
    def local_images(self) -> list[dict[str, Any]]:
        """Images the dynamic provider builds (`servingImage.builder: dynamic`), without its pickled code."""
        return [{k: v for k, v in r.inputs.items() if k != "__provider"} for r in self.resources if r.type == DYNAMIC]

    def components(self, type_token: str) -> list[Declared]:
        return [r for r in self.resources if r.type == type_token]

    def find(self, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def _is_kubernetes_object(resource: Declared) -> bool:
    return resource.type.startswith("kubernetes:") and "kind" in resource.inputs and "apiVersion" in resource.inputs


def normalize(value: Any) -> Any:
    """The mock engine hands every number over as a float; Kubernetes wants integers where they are whole."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def image_outputs(type_token: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """What a build would answer, offline: a pushed image's `repo@sha256:…` (a stand-in digest of its name, so
    the plan shows the shape pods get), else its name."""
    if type_token not in IMAGES or ("name" not in inputs and "imageName" not in inputs):
        return {}
    name = inputs.get("imageName") or inputs["name"]
    pushed = not inputs.get("skipPush", True) if type_token == DOCKER_IMAGE else bool(inputs.get("push"))
    digest = f"{name.rsplit(':', 1)[0]}@sha256:{hashlib.sha256(name.encode()).hexdigest()}"
    ref = digest if pushed else name
    return {"repoDigest": ref} if type_token == DOCKER_IMAGE else {"ref": ref}


def _mocks_class() -> type:
    import pulumi

    class RecordingMocks(pulumi.runtime.Mocks):
        """Accepts every resource as declared and remembers it."""

        def __init__(self, resources: list[Declared]) -> None:
            self.resources = resources

        def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
            inputs = normalize(dict(args.inputs))
            self.resources.append(Declared(args.typ, args.name, inputs, bool(args.custom)))
            return f"{args.name}-id", {**dict(args.inputs), **image_outputs(args.typ, inputs)}

        def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
            return {}

    return RecordingMocks


@contextlib.contextmanager
def _program_context(project_dir: Path, cwd: Path) -> Iterator[None]:
    """The program imports `components` from its own folder and resolves relative paths from the cwd."""
    old_cwd, old_path = Path.cwd(), list(sys.path)
    sys.path.insert(0, str(project_dir))
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path


def run_program(
    project_dir: Path,
    stack: str,
    config: dict[str, Any] | None = None,
    secret_keys: list[str] | None = None,
    cwd: Path | None = None,
    declared: list[Declared] | None = None,
    preview: bool = True,
) -> Plan:
    """Run `project_dir/__main__.py` for `stack` under the mock engine and return what it declared.

    `config` defaults to the stack file's config. Errors the program raises (bad config, registry) propagate;
    what was declared before the error is left in `declared`, if given. `preview=False` runs it as `pulumi up`
    would (e.g. baked models are downloaded into their build contexts).
    """
    import pulumi
    from pulumi.runtime import settings as runtime_settings

    if config is None:
        config, secret_keys = read_config(stack_file(project_dir, stack))
    mocks = _mocks_class()(declared if declared is not None else [])
    loop = asyncio.new_event_loop()  # before set_mocks, which binds the engine's futures to the current loop
    asyncio.set_event_loop(loop)
    runtime_settings.reset_options()
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=preview)
    pulumi.runtime.set_all_config(
        {k: v if isinstance(v, str) else _json(v) for k, v in config.items()}, secret_keys or []
    )
    plan = Plan(stack=stack)

    @pulumi.runtime.test
    def program() -> None:
        with _program_context(project_dir, cwd or project_dir):
            runpy.run_path(str(project_dir / "__main__.py"), run_name="__main__")

    try:
        program()
    finally:
        pulumi.runtime.set_all_config({}, [])
        _close(loop)
    plan.resources = mocks.resources
    return plan


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Close the engine's event loop now: left to the garbage collector at exit, it can print a traceback."""
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
    asyncio.set_event_loop(None)


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def object_key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    namespace = meta.get("namespace") or "_cluster"
    return f"{obj['kind'].lower()}_{namespace}_{meta.get('name', '')}"


def release_key(release: dict[str, Any]) -> str:
    return f"helm-release_{release.get('namespace', '_')}_{release.get('name', '')}"


def write_rendered(plan: Plan, out_dir: Path) -> list[Path]:
    """Write one YAML file per object (and per Helm release) into `out_dir`, replacing an earlier plan there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.yaml"):
        old.unlink()
    written = []
    for obj in plan.objects:
        written.append(_dump(out_dir / f"{object_key(obj)}.yaml", masked(obj)))
    for release in plan.releases:
        written.append(_dump(out_dir / f"{release_key(release)}.yaml", {"helmRelease": masked(release)}))
    for image in plan.images:
        name = image["imageName"].rsplit("/", 1)[-1].replace(":", "_")
        written.append(_dump(out_dir / f"docker-image_{name}.yaml", {"dockerImage": _portable(image)}))
    return written


SECRET_SIGNATURE = "4dabf18193072939515e22adb298388d"  # how Pulumi marks a secret value on the wire


def masked(value: Any) -> Any:
    """Secrets (e.g. Grafana's admin password in chart values) are written as `[secret]`, never their value."""
    if isinstance(value, dict):
        if SECRET_SIGNATURE in value:
            return "[secret]"
        return {k: masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def revealed(value: Any) -> Any:
    """The values inside secret envelopes (the placeholder, in a plan), to check an object's shape."""
    if isinstance(value, dict):
        if SECRET_SIGNATURE in value:
            return revealed(value.get("value"))
        return {k: revealed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [revealed(v) for v in value]
    return value


def _portable(image: dict[str, Any]) -> dict[str, Any]:
    """The image as declared, less the machine-specific context path (the tag already says what is in it)."""
    build = {k: v for k, v in image.get("build", {}).items() if k not in ("context", "dockerfile")}
    return {**{k: v for k, v in image.items() if k not in ("build", "registry")}, "build": build}


def _dump(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(canonical(document), sort_keys=False, default_flow_style=False))
    return path


def canonical(obj: dict[str, Any]) -> dict[str, Any]:
    """Keys in a stable order (apiVersion, kind, metadata first, then sorted), so plans diff line by line."""
    head = [k for k in ("apiVersion", "kind", "metadata") if k in obj]
    return {k: _sorted(obj[k]) for k in [*head, *sorted(k for k in obj if k not in head)]}


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def read_rendered(out_dir: Path) -> dict[str, str]:
    """A rendered plan as {file stem: YAML text}, the form the diff compares."""
    return {p.stem: p.read_text() for p in sorted(out_dir.glob("*.yaml"))}
