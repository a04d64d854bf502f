"""GPU node pools (Karpenter v1 NodePool + EC2NodeClass), the NVIDIA charts, and where each variant lands.

A GPU variant and the pool that hosts it are matched here, from the same settings, so a model that asks for a
GPU never sits Pending for want of a pool: the settings checks refuse such a stack before anything is declared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ml_serving import labels
from ml_serving.settings import Settings, Variant
from ml_serving.specs.platform import OPERATOR_UID, HelmChart, chart_resources, locked_down, runtime_default

NODEPOOL_API = "karpenter.sh/v1"
NODECLASS_API = "karpenter.k8s.aws/v1"
GPU_RESOURCE = "nvidia.com/gpu"
POOL_LABEL = "karpenter.sh/nodepool"
GPU_NAME_LABEL = "karpenter.k8s.aws/instance-gpu-name"
DEVICE_PLUGIN_CONFIG_LABEL = "nvidia.com/device-plugin.config"
GPU_OPERATOR_VERSION = "v24.9.2"


@dataclass(frozen=True)
class Placement:
    """Where one variant runs: a pool name (None: the cluster's general nodes), and its GPUs."""

    model: str
    variant: str
    pool: str | None
    gpus: int
    gpu_type: str | None


def placements(settings: Settings) -> list[Placement]:
    return [
        Placement(model_key, name, settings.pool_for(variant), variant.gpu, variant.gpu_type)
        for model_key, model in settings.models.items()
        for name, variant in model.variants.items()
    ]


def node_pool(settings: Settings, name: str) -> dict[str, Any]:
    pool = settings.node_pools[name]
    requirements = [
        {"key": "kubernetes.io/arch", "operator": "In", "values": [pool.architecture]},
        {"key": "karpenter.sh/capacity-type", "operator": "In", "values": list(pool.capacity_types)},
    ]
    if pool.instance_families:
        requirements.append(
            {"key": "karpenter.k8s.aws/instance-family", "operator": "In", "values": list(pool.instance_families)}
        )
    if pool.instance_categories:
        requirements.append(
            {"key": "karpenter.k8s.aws/instance-category", "operator": "In", "values": list(pool.instance_categories)}
        )
    node_labels = {labels.POOL: name, **pool.labels}
    taints = []
    limits: dict[str, Any] = {}
    if pool.gpu is not None:
        gpu = pool.gpu
        requirements.append({"key": GPU_NAME_LABEL, "operator": "In", "values": list(gpu.types)})
        requirements.append(
            {"key": "karpenter.k8s.aws/instance-gpu-count", "operator": "Gt", "values": [str(gpu.min_count - 1)]}
        )
        if gpu.min_memory_mib:
            requirements.append(
                {
                    "key": "karpenter.k8s.aws/instance-gpu-memory",
                    "operator": "Gt",
                    "values": [str(gpu.min_memory_mib - 1)],
                }
            )
        taints.append({"key": settings.gpu.taint_key, "value": "true", "effect": "NoSchedule"})
        limits[GPU_RESOURCE] = str(gpu.limit)
        if gpu.time_slicing is not None:
            node_labels[DEVICE_PLUGIN_CONFIG_LABEL] = name
    if pool.limits.cpu is not None:
        limits["cpu"] = pool.limits.cpu
    if pool.limits.memory is not None:
        limits["memory"] = pool.limits.memory
    disruption: dict[str, Any] = {
        "consolidationPolicy": pool.disruption.consolidation_policy,
        "consolidateAfter": pool.disruption.consolidate_after,
        "budgets": [
            {k: v for k, v in {"nodes": b.nodes, "schedule": b.schedule, "duration": b.duration}.items() if v}
            for b in pool.disruption.budgets
        ],
    }
    template_spec: dict[str, Any] = {
        "nodeClassRef": {"group": "karpenter.k8s.aws", "kind": "EC2NodeClass", "name": name},
        "requirements": requirements,
        "expireAfter": pool.expire_after,
    }
    if taints:
        template_spec["taints"] = taints
    return {
        "apiVersion": NODEPOOL_API,
        "kind": "NodePool",
        "metadata": {"name": name, "labels": labels.common("node-pool")},
        "spec": {
            "template": {"metadata": {"labels": node_labels}, "spec": template_spec},
            "limits": limits,
            "disruption": disruption,
        },
    }


def node_class(settings: Settings, name: str) -> dict[str, Any]:
    pool = settings.node_pools[name]
    node = pool.node_class
    return {
        "apiVersion": NODECLASS_API,
        "kind": "EC2NodeClass",
        "metadata": {"name": name, "labels": labels.common("node-pool")},
        "spec": {
            "role": node.role,
            # The alias picks the GPU-ready (NVIDIA driver) variant of the AMI for GPU instance types.
            "amiSelectorTerms": [{"alias": node.ami_alias}],
            "subnetSelectorTerms": [{"tags": dict(node.subnet_tags)}],
            "securityGroupSelectorTerms": [{"tags": dict(node.security_group_tags)}],
            "blockDeviceMappings": [
                {
                    "deviceName": "/dev/xvda",
                    "ebs": {
                        "volumeSize": node.volume_size,
                        "volumeType": "gp3",
                        "encrypted": True,
                        "deleteOnTermination": True,
                    },
                }
            ],
            "metadataOptions": {"httpTokens": "required", "httpPutResponseHopLimit": 1},
            "tags": {labels.POOL: name},
        },
    }


def time_slicing_config(replicas: int) -> str:
    return (
        "version: v1\nsharing:\n  timeSlicing:\n    resources:\n"
        f"      - name: {GPU_RESOURCE}\n        replicas: {replicas}\n"
    )


DEVICE_PLUGIN_CONFIG = "device-plugin-config"  # the ConfigMap the GPU Operator's chart creates from `data`


def time_slicing_configs(settings: Settings) -> dict[str, str]:
    """One device-plugin config per pool that time-slices (a GPU pool's nodes carry DEVICE_PLUGIN_CONFIG_LABEL = the
    pool's name, which picks its entry), plus `default` (no sharing) for every other GPU node; empty without any."""
    configs = {
        name: time_slicing_config(pool.gpu.time_slicing.replicas)
        for name, pool in settings.node_pools.items()
        if pool.gpu is not None and pool.gpu.time_slicing is not None
    }
    return {"default": "version: v1\n", **configs} if configs else {}


def device_plugin(settings: Settings) -> HelmChart:
    """NVIDIA's device plugin, on GPU nodes only, with one time-slicing config per pool that asks for it."""
    configs = time_slicing_configs(settings)
    values: dict[str, Any] = {
        "tolerations": _gpu_tolerations(settings),
        "nodeSelector": {},
        "affinity": _gpu_nodes_affinity(),
        # The plugin and its config-manager sidecar, as root (the kubelet's device-plugins folder is root's) but
        # with no capability: with a config map the chart adds SYS_ADMIN in case a config asks for MIG or
        # volume-mount device lists; ours (time_slicing_config) ask for neither. They write only to mounted
        # folders (device-plugins, /config, /var/run/cdi, /mps: k8s-device-plugin v0.17.0), so the root is read-only.
        "securityContext": locked_down(),
        "podSecurityContext": runtime_default(),
        "resources": chart_resources("50m", "64Mi", "500m", "256Mi"),
    }
    if configs:
        values["config"] = {"map": configs, "default": "default"}
    return HelmChart(
        release="nvidia-device-plugin",
        chart="nvidia-device-plugin",
        version="0.17.0",
        repository="https://nvidia.github.io/k8s-device-plugin",
        namespace="nvidia-device-plugin",
        values=values,
    )


def gpu_operator(settings: Settings) -> HelmChart:
    """The NVIDIA GPU Operator instead of the bare device plugin (drivers and toolkit from the AMI), with the same
    time-slicing configs as the bare plugin gets: the settings count a time-sliced pool's GPUs as shared."""
    values: dict[str, Any] = {
        "driver": {"enabled": False},
        "toolkit": {"enabled": False},
        "dcgmExporter": {"enabled": False},
        "daemonsets": {"tolerations": _gpu_tolerations(settings)},
        # These images' tags default to the chart's appVersion, which the chart's source tree says is `devel-ubi8`
        # (charts.develBuilds): pinned to the release, a folder holding the source at the tag runs the release.
        **{part: {"version": GPU_OPERATOR_VERSION} for part in ("operator", "validator", "nodeStatusExporter")},
        # Node Feature Discovery (the chart's dependency) runs as non-root already: a high UID, the runtime's
        # seccomp profile and CPU limits beside its own requests and memory limits. Its prune Job (a post-delete
        # hook) takes only the master's container context, so the UID goes there too.
        "node-feature-discovery": {
            part: {
                "podSecurityContext": {"runAsUser": OPERATOR_UID, "runAsGroup": OPERATOR_UID, **runtime_default()},
                "resources": chart_resources(*figures),
            }
            for part, figures in (
                ("master", ("100m", "128Mi", "1", "4Gi")),
                ("worker", ("5m", "64Mi", "200m", "512Mi")),
                ("gc", ("10m", "128Mi", "200m", "1Gi")),
            )
        },
    }
    values["node-feature-discovery"]["master"]["securityContext"] = {"runAsUser": OPERATOR_UID}
    configs = time_slicing_configs(settings)
    if configs:
        values["devicePlugin"] = {
            "config": {"create": True, "name": DEVICE_PLUGIN_CONFIG, "default": "default", "data": configs}
        }
    return HelmChart(
        release="gpu-operator",
        chart="gpu-operator",
        version=GPU_OPERATOR_VERSION,
        repository="https://helm.ngc.nvidia.com/nvidia",
        namespace="gpu-operator",
        values=values,
    )


def dcgm_exporter(settings: Settings) -> HelmChart:
    """GPU utilisation and memory per GPU, for Prometheus (scraped through its ServiceMonitor)."""
    return HelmChart(
        release="dcgm-exporter",
        chart="dcgm-exporter",
        version="4.1.1",
        repository="https://nvidia.github.io/dcgm-exporter/helm-charts",
        namespace="nvidia-dcgm-exporter",
        values={
            "tolerations": _gpu_tolerations(settings),
            "affinity": _gpu_nodes_affinity(),
            "serviceMonitor": dcgm_service_monitor(settings),
            # Root, to read the kubelet's pod-resources socket (which pod holds each GPU), and SYS_ADMIN for the
            # profiling metrics, as the chart has it; nothing else. The root stays writable: the image's entrypoint
            # runs `ldconfig` and `setcap` on its own binary under `set -e` (dcgm-exporter 4.2.3-4.1.1).
            "securityContext": {
                "runAsNonRoot": False,
                "runAsUser": 0,
                **locked_down(read_only=False),
                "capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]},
            },
            "podSecurityContext": runtime_default(),
            "resources": chart_resources("100m", "256Mi", "1", "1Gi"),
        },
    )


def dcgm_service_monitor(settings: Settings) -> dict[str, Any]:
    """The exporter's ServiceMonitor, labelled so the stack's Prometheus selects it (kube-prometheus-stack selects
    by its release label), with the exporter's `namespace`/`pod` labels kept: they name the pod using each GPU,
    which is how GPU utilisation joins the serving pods' labels. Scraped as often as the serving pods."""
    enabled = settings.gpu.dcgm_service_monitor
    if enabled is None:
        enabled = settings.monitoring is not None
    if not enabled:
        return {"enabled": False}
    if settings.monitoring is None:  # an existing Prometheus Operator; its selector labels are not known here
        return {"enabled": True, "honorLabels": True, "additionalLabels": {}}
    monitoring = settings.monitoring
    return {
        "enabled": True,
        "honorLabels": True,
        "additionalLabels": dict(monitoring.selector_labels),
        "interval": monitoring.scrape_interval,
    }


def _gpu_tolerations(settings: Settings) -> list[dict[str, Any]]:
    """Tolerate the GPU pools' taint: what lets a pod onto GPU nodes at all."""
    return [{"key": settings.gpu.taint_key, "operator": "Exists", "effect": "NoSchedule"}]


def _required_node_affinity(expressions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": expressions}]}
        }
    }


def _gpu_nodes_affinity() -> dict[str, Any]:
    """Any node with a GPU: where the NVIDIA daemon sets belong."""
    return _required_node_affinity([{"key": GPU_NAME_LABEL, "operator": "Exists"}])


def scheduling(settings: Settings, variant: Variant) -> dict[str, Any]:
    """Pod-spec fields that put a GPU variant on its pool; CPU variants get none (and so never tolerate GPUs)."""
    pool = settings.pool_for(variant)
    if pool is None:
        return {}
    expressions = [{"key": POOL_LABEL, "operator": "In", "values": [pool]}]
    if variant.gpu_type:
        expressions.append({"key": GPU_NAME_LABEL, "operator": "In", "values": [variant.gpu_type]})
    return {
        "tolerations": _gpu_tolerations(settings),
        "affinity": _required_node_affinity(expressions),
    }
