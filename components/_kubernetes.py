"""Turning spec dicts into pulumi-kubernetes resources, the one place that knows which class takes which dict."""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from ml_serving.specs.platform import HelmChart


def custom_resource(name: str, obj: dict[str, Any], opts: pulumi.ResourceOptions) -> k8s.apiextensions.CustomResource:
    extra = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    return k8s.apiextensions.CustomResource(
        name, api_version=obj["apiVersion"], kind=obj["kind"], metadata=obj["metadata"], opts=opts, **extra
    )


def namespace(name: str, obj: dict[str, Any], opts: pulumi.ResourceOptions) -> k8s.core.v1.Namespace:
    return k8s.core.v1.Namespace(name, metadata=obj["metadata"], opts=opts)


def helm_release(chart: HelmChart, opts: pulumi.ResourceOptions) -> k8s.helm.v3.Release:
    return k8s.helm.v3.Release(
        chart.release,
        k8s.helm.v3.ReleaseArgs(
            name=chart.release,
            chart=chart.chart,
            version=chart.version,
            repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=chart.repository),
            namespace=chart.namespace,
            create_namespace=True,
            values=chart.values,
            atomic=True,
        ),
        opts=opts,
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
