"""`ml-serving pin STACK`: write the registry's current answer for every alias into the stack file.

A pinned stack plans without the registry and every version change is a reviewable line in a pull request.
The alias each pin came from stays in the file as `pinnedFrom`, so the next `pin` refreshes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_serving.image import download_environment, download_optional, lock_path
from ml_serving.registry import RegistryResolver, ResolvedVersion, resolve_model
from ml_serving.settings import ConfigError, Settings
from ml_serving.signatures import SignatureError, check_model
from ml_serving.stackfile import edit, load_settings, stack_file, variants_of


@dataclass(frozen=True)
class Pin:
    model: str
    variant: str
    alias: str
    before: str | None
    after: ResolvedVersion

    @property
    def changed(self) -> bool:
        return self.before != self.after.version


def plan_pins(settings: Settings, resolver: RegistryResolver) -> list[Pin]:
    """Resolve every alias (`alias:` or `pinnedFrom:`) of every variant; nothing is written here."""
    pins = []
    for model_key, model in settings.models.items():
        for name, variant in model.variants.items():
            alias = variant.alias or variant.pinned_from
            if alias is None:
                continue
            resolved = resolver.by_alias(model.registered_model, alias)
            pins.append(Pin(model_key, name, alias, variant.version, resolved))
    return pins


def apply_pins(document: Any, pins: list[Pin]) -> None:
    """Rewrite each variant in place: alias → version, modelUri, runId, pinnedFrom; other keys untouched."""
    for pin in pins:
        variant = variants_of(document, pin.model)[pin.variant]
        position = list(variant).index("alias") if "alias" in variant else 0
        variant.pop("alias", None)
        values = {"version": pin.after.version, "modelUri": pin.after.model_uri}
        if pin.after.run_id:
            values["runId"] = pin.after.run_id
        values["pinnedFrom"] = pin.alias
        for offset, (key, value) in enumerate(values.items()):
            variant.pop(key, None)
            variant.insert(position + offset, key, value)
        if hasattr(variant, "fa"):
            variant.fa.set_block_style()


def pin_stack(
    project_dir: Path, stack: str, tracking_uri: str | None = None, warn: Callable[[str], None] | None = None
) -> tuple[list[Pin], str]:
    """Resolve and write the pins of `stack`; returns the pins and the new file text. `warn` hears of versions
    logged without a signature."""
    settings = load_settings(project_dir, stack)
    path = stack_file(project_dir, stack)
    uri = tracking_uri or (settings.registry.tracking_uri if settings.registry else None)
    if uri is None:
        raise ConfigError(f"{path.name}: ml-serving:registry.trackingUri is not set: set it or pass --tracking-uri")
    resolver = RegistryResolver(uri)
    pins = plan_pins(settings, resolver)
    registered = {m: model.registered_model for m, model in settings.models.items()}
    for pin in pins:
        lock_environment(registered[pin.model], pin.after, project_dir / "model-lock")
    for model_key, model in settings.models.items():
        pinned_now = {p.variant: p.after for p in pins if p.model == model_key}
        versions = {**resolve_model(model_key, model, resolver), **pinned_now}  # the resolver caches each answer
        try:
            check_model(f"models.{model_key}", model, versions, project_dir / "model-lock", warn)
        except SignatureError as exc:
            raise ConfigError(f"{path.name}: {exc}") from None
    text = edit(path, lambda document: apply_pins(document, pins)) if pins else path.read_text()
    return pins, text


def lock_environment(registered_model: str, resolved: ResolvedVersion, lock_dir: Path) -> Path:
    """Keep the version's requirements under model-lock/, so its image builds (and plans) from the repository."""
    target = lock_path(registered_model, resolved.version, lock_dir)
    if not (target / "requirements.txt").exists():
        download_environment(resolved.model_uri, target)
    elif not (target / "MLmodel").exists():  # locked before MLmodel (the signature) was kept
        download_optional(resolved.model_uri, "MLmodel", target)
    return target
