"""The Pulumi-facing edge of the program: config in, typed settings and resolved versions out.

Errors become `pulumi.RunError`, which the engine prints as one clean message instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pulumi.runtime import config as runtime_config
from pydantic import SecretStr

from ml_serving import PROJECT
from ml_serving.chartsource import ChartSource, ChartSourceError, sources
from ml_serving.image import (
    ImageError,
    ModelEnvironment,
    PreparedContext,
    build_context,
    model_environment,
    write_context,
)
from ml_serving.registry import RegistryError, Resolution, resolve
from ml_serving.settings import ConfigError, KubernetesTarget, Settings, parse_settings
from ml_serving.signatures import SignatureError, check_variants, unsigned
from ml_serving.specs import charts, kserve, seldon


def stack_config() -> dict[str, Any]:
    """Every config value the engine passed to this run (all namespaces)."""
    return {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}


def load_settings() -> Settings:
    source = f"Pulumi.{pulumi.get_stack()}.yaml"
    try:
        settings = parse_settings(stack_config(), source)
        charts.check_renderable(settings, source)
        return settings
    except ConfigError as exc:
        raise pulumi.RunError(str(exc)) from None


def resolve_versions(settings: Settings) -> Resolution:
    """Every variant's version, and whether the cluster can download it: both refused before anything applies."""
    try:
        versions = resolve(settings)
        if settings.platform.backend == "kserve":
            kserve.check(settings, versions.of)
        else:
            seldon.check_storage_access(settings, versions.of)
    except (RegistryError, seldon.StorageAccessError, kserve.KServeConfigError) as exc:
        raise pulumi.RunError(f"Pulumi.{pulumi.get_stack()}.yaml: {exc}") from None
    return versions


def chart_sources(settings: Settings) -> dict[str, ChartSource]:
    """Where each Helm release's chart comes from; a folder missing a chart, or holding another version, is refused
    here, before any resource is declared. A relative folder is relative to the project (Pulumi's working dir)."""
    try:
        return sources(settings, charts.charts(settings), Path.cwd())
    except ChartSourceError as exc:
        raise pulumi.RunError(f"Pulumi.{pulumi.get_stack()}.yaml: {exc}") from None


def build_contexts(settings: Settings, versions: Resolution, build_dir: Path) -> dict[str, dict[str, PreparedContext]]:
    """Each model's image contexts by variant, written under `build_dir`; a baked model is fetched only on `up`.

    Paths are relative to the project folder, where Pulumi (and `ml-serving plan`) run the program.
    """
    prepared: dict[str, dict[str, PreparedContext]] = {}
    environments: dict[tuple[str, str, str], ModelEnvironment] = {}  # variants sharing a version read it once
    written: set[Path] = set()  # ... and share one context folder
    try:
        for model_key, model in settings.models.items():
            prepared[model_key], signatures = {}, {}
            for variant in model.variants:
                resolved = versions.of(model_key, variant)
                key = (model.registered_model, resolved.version, resolved.model_uri)
                if key not in environments:
                    environments[key] = model_environment(*key, lock_dir=Path("model-lock"))
                inputs = environments[key].signature_inputs
                signatures[variant] = list(inputs) if inputs is not None else None
                if inputs is None:
                    where = f"Pulumi.{pulumi.get_stack()}.yaml: models.{model_key}.variants.{variant}"
                    pulumi.log.warn(unsigned(where, model.registered_model, resolved.version))
                bake_from = resolved.model_uri if model.serving.bake else None
                chosen = model.variants[variant]
                context = build_context(environments[key], bake_from, gpu=chosen.gpu > 0, runtime=chosen.runtime)
                path = build_dir / f"{model_key}-{context.tag}"
                if path not in written and (not path.exists() or not pulumi.runtime.is_dry_run()):
                    write_context(context, path, with_model=not pulumi.runtime.is_dry_run())
                written.add(path)
                prepared[model_key][variant] = PreparedContext(context, path)
            if not model.allow_breaking_signature:
                check_variants(f"models.{model_key}", signatures, model.champion)
    except (ImageError, SignatureError) as exc:
        raise pulumi.RunError(f"Pulumi.{pulumi.get_stack()}.yaml: {exc}") from None
    return prepared


def secret(value: SecretStr | None) -> pulumi.Output[str] | None:
    """A password from the stack config as a Pulumi secret, so it never shows in a diff or the state in plain text."""
    if value is None:
        return None
    return pulumi.Output.secret(value.get_secret_value())


def kubernetes_provider(target: KubernetesTarget) -> k8s.Provider:
    """The cluster of the current kube context, or a directory of YAML files when the stack renders only."""
    return k8s.Provider(
        f"{PROJECT}-k8s",
        render_yaml_to_directory=target.render_yaml_to_directory,
        context=target.context,
        enable_server_side_apply=True,
        # A dashboard edit updates its ConfigMap in place: nothing mounts it, so a replace (the provider's default,
        # delete then create under the same name) would only blink the dashboard out of Grafana.
        enable_config_map_mutable=True,
    )
