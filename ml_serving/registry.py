"""Resolve each variant to a concrete model version and artifact URI, asking the MLflow registry once per key.

A variant names its model version by alias (`@champion`) or pins it. Aliases are resolved at plan time, so
moving an alias in MLflow is a visible change in the next plan. A pinned version with its `modelUri` needs no
registry at all, which is how `prod` plans without network access.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ml_serving.settings import Model, Settings, Variant


class RegistryError(RuntimeError):
    """The registry could not answer: the message names the model, the alias or version, and the tracking URI."""


@dataclass(frozen=True)
class ResolvedVersion:
    version: str
    model_uri: str
    run_id: str | None
    alias: str | None
    pinned: bool = False

    @property
    def origin(self) -> str:
        """How the version was chosen, as a reader of the plan wants to see it."""
        if self.pinned:
            return f"pinned from @{self.alias}" if self.alias else "pinned"
        return f"@{self.alias}" if self.alias else "version"


@dataclass
class RegistryResolver:
    """Looks versions up in one MLflow registry, remembering every answer for the life of one plan."""

    tracking_uri: str
    _client: Any = None
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def client(self) -> Any:
        if self._client is None:
            # An unreachable registry should fail a plan in seconds, not after minutes of retries.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def by_alias(self, model: str, alias: str) -> ResolvedVersion:
        key = (model, f"@{alias}")
        if key not in self._cache:
            version = self._call(model, f"alias '{alias}'", self.client.get_model_version_by_alias, model, alias)
            self._cache[key] = ResolvedVersion(
                version=str(version.version),
                model_uri=self._download_uri(model, str(version.version)),
                run_id=version.run_id or None,
                alias=alias,
            )
        return self._cache[key]

    def by_version(self, model: str, version: str) -> ResolvedVersion:
        key = (model, version)
        if key not in self._cache:
            found = self._call(model, f"version {version}", self.client.get_model_version, model, version)
            self._cache[key] = ResolvedVersion(
                version=version,
                model_uri=self._download_uri(model, version),
                run_id=found.run_id or None,
                alias=None,
                pinned=True,
            )
        return self._cache[key]

    def _download_uri(self, model: str, version: str) -> str:
        """The storage URI Seldon's initializer can fetch (MLflow 3's `source` is a `models:/m-…` reference)."""
        return self._call(model, f"version {version}", self.client.get_model_version_download_uri, model, version)

    def _call(self, model: str, what: str, method: Any, *args: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return method(*args)
        except MlflowException as exc:
            if isinstance(exc.__context__, OSError):  # requests' ConnectionError and timeouts are OSErrors
                raise RegistryError(self._unreachable(model, what, exc.__context__)) from None
            raise RegistryError(self._explain(model, what, exc)) from None
        except OSError as exc:
            raise RegistryError(self._unreachable(model, what, exc)) from None

    def _unreachable(self, model: str, what: str, exc: Exception) -> str:
        reason = str(exc).split(" (Caused by ")[0]
        return (
            f"registered model '{model}' {what}: the MLflow registry at {self.tracking_uri} is unreachable "
            f"({type(exc).__name__}: {reason}); check ml-serving:registry.trackingUri, or pin the version"
        )

    def _explain(self, model: str, what: str, exc: Exception) -> str:
        where = f"in the MLflow registry at {self.tracking_uri}"
        code = getattr(exc, "error_code", "")
        if code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return f"registered model '{model}' {what}: the registry at {self.tracking_uri} failed: {exc.message}"
        try:
            registered = self.client.get_registered_model(model)
        except Exception:
            return f"no registered model '{model}' {where}: check models.*.registeredModel"
        aliases = ", ".join(f"@{a}→v{v}" for a, v in sorted((registered.aliases or {}).items())) or "none"
        return f"registered model '{model}' has no {what} {where} (its aliases: {aliases})"


@dataclass(frozen=True)
class Resolution:
    """The concrete version of every variant of every model, keyed by (model key, variant name)."""

    versions: dict[tuple[str, str], ResolvedVersion]

    def of(self, model: str, variant: str) -> ResolvedVersion:
        return self.versions[(model, variant)]


def pinned(variant: Variant) -> ResolvedVersion | None:
    if variant.version is not None and variant.model_uri is not None:
        return ResolvedVersion(variant.version, variant.model_uri, variant.run_id, variant.pinned_from, pinned=True)
    return None


def resolve(settings: Settings, resolver: RegistryResolver | None = None) -> Resolution:
    """Resolve every variant; the registry is only contacted for variants that are not fully pinned."""
    if resolver is None and settings.registry is not None:
        resolver = RegistryResolver(settings.registry.tracking_uri)
    return Resolution(
        {
            (model_key, name): found
            for model_key, model in settings.models.items()
            for name, found in resolve_model(model_key, model, resolver).items()
        }
    )


def resolve_model(model_key: str, model: Model, resolver: RegistryResolver | None) -> dict[str, ResolvedVersion]:
    """One model's variants by name (what `pin` and `rollout` compare, without resolving every other model)."""
    versions: dict[str, ResolvedVersion] = {}
    for name, variant in model.variants.items():
        found = pinned(variant)
        if found is None:
            assert resolver is not None, "settings validation guarantees a registry for unpinned variants"
            key = "alias" if variant.alias is not None else "version"
            try:
                if variant.alias is not None:
                    found = resolver.by_alias(model.registered_model, variant.alias)
                else:
                    found = resolver.by_version(model.registered_model, str(variant.version))
            except RegistryError as exc:  # say which line of the stack file asked for it
                raise RegistryError(f"ml-serving:models.{model_key}.variants.{name}.{key}: {exc}") from None
        versions[name] = found
    return versions
