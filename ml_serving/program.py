"""The Pulumi-facing edge of the program: config in, typed settings and resolved versions out.

Errors become `pulumi.RunError`, which the engine prints as one clean message instead of a traceback.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pulumi.runtime import config as runtime_config

from ml_serving import PROJECT
from ml_serving.registry import RegistryError, Resolution, resolve
from ml_serving.settings import ConfigError, KubernetesTarget, Settings, parse_settings


def stack_config() -> dict[str, Any]:
    """Every config value the engine passed to this run (all namespaces)."""
    return {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}


def load_settings() -> Settings:
    try:
        return parse_settings(stack_config(), f"Pulumi.{pulumi.get_stack()}.yaml")
    except ConfigError as exc:
        raise pulumi.RunError(str(exc)) from None


def resolve_versions(settings: Settings) -> Resolution:
    try:
        return resolve(settings)
    except RegistryError as exc:
        raise pulumi.RunError(f"Pulumi.{pulumi.get_stack()}.yaml: {exc}") from None


def kubernetes_provider(target: KubernetesTarget) -> k8s.Provider:
    """The cluster of the current kube context, or a directory of YAML files when the stack renders only."""
    return k8s.Provider(
        f"{PROJECT}-k8s",
        render_yaml_to_directory=target.render_yaml_to_directory,
        context=target.context,
        enable_server_side_apply=True,
    )
