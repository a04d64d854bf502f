"""Turning spec dicts into pulumi-kubernetes resources, the one place that knows which class takes which dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from ml_serving.chartsource import ChartSource
from ml_serving.specs.charts import Release
from ml_serving.specs.platform import namespace_object


def custom_resource(name: str, obj: dict[str, Any], opts: pulumi.ResourceOptions) -> k8s.apiextensions.CustomResource:
    extra = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    return k8s.apiextensions.CustomResource(
        name, api_version=obj["apiVersion"], kind=obj["kind"], metadata=obj["metadata"], opts=opts, **extra
    )


def namespace(name: str, obj: dict[str, Any], opts: pulumi.ResourceOptions) -> k8s.core.v1.Namespace:
    return k8s.core.v1.Namespace(name, metadata=obj["metadata"], opts=opts)


def owned_namespace(release: Release, opts: pulumi.ResourceOptions) -> k8s.core.v1.Namespace | None:
    """The namespace a release owns, declared beside it so `destroy` removes it too (Helm never does)."""
    if not release.owns_namespace:
        return None
    chart = release.chart
    return namespace(f"{chart.release}-namespace", namespace_object(chart.namespace, chart.release), opts)


def helm_release(
    release: Release,
    sources: dict[str, ChartSource],
    wait: bool,
    opts: pulumi.ResourceOptions,
    namespaces: Sequence[pulumi.Resource] = (),
) -> k8s.helm.v3.Release:
    """One Helm release from `source` (a repository, a mirror or a folder), after `namespaces` (its own; for a
    release that serves an aggregated API, every namespace the stack owns: see `Release.serves_api`)."""
    chart, source = release.chart, sources[release.chart.release]
    return k8s.helm.v3.Release(
        chart.release,
        k8s.helm.v3.ReleaseArgs(
            name=chart.release,
            chart=source.chart,
            version=source.version,
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=source.repository) if source.repository else None,
            namespace=chart.namespace,
            create_namespace=not release.owns_namespace,
            values=chart.values,
            # Waiting (and rolling a failed install back) needs pods that can start; hook Jobs need them too. Unset
            # when waiting, so a stack that always waited sees no diff.
            atomic=wait,
            skip_await=None if wait else True,
            disable_webhooks=None if wait else True,
        ),
        opts=pulumi.ResourceOptions.merge(
            opts,
            pulumi.ResourceOptions(
                depends_on=list(namespaces), ignore_changes=[] if release.stable_output else ["checksum"]
            ),
        ),
    )


def resource(name: str, obj: dict[str, Any], opts: pulumi.ResourceOptions) -> pulumi.CustomResource:
    """A built-in kind by its own class (so the provider knows its schema), anything else as a custom resource."""
    if obj["kind"] == "PodDisruptionBudget":
        return k8s.policy.v1.PodDisruptionBudget(name, metadata=obj["metadata"], spec=obj["spec"], opts=opts)
    if obj["kind"] == "ServiceAccount":
        return k8s.core.v1.ServiceAccount(
            name,
            metadata=obj["metadata"],
            secrets=obj.get("secrets"),
            automount_service_account_token=obj.get("automountServiceAccountToken"),
            opts=opts,
        )
    return custom_resource(name, obj, opts)
