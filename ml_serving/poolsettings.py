"""The stack config's node pools and cluster-wide GPU support: part of the one settings model (`settings.py`
imports these), kept apart so neither module grows past a reader's patience."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StrictBool, StrictInt

from ml_serving.configbase import ConfigModel as _Config
from ml_serving.configbase import Quantity

GPU_TYPES = ("t4", "t4g", "a10g", "l4", "l40s", "v100", "a100", "h100", "h200", "b200")


def _gpu_type(value: str) -> str:
    if value not in GPU_TYPES:
        raise ValueError(f"{value!r} is not a known GPU type: use one of {', '.join(GPU_TYPES)}")
    return value


GpuType = Annotated[str, AfterValidator(_gpu_type)]


class TimeSlicing(_Config):
    """Several pods share one GPU (NVIDIA device plugin time-slicing): each GPU is offered `replicas` times."""

    replicas: Annotated[StrictInt, Field(ge=1, le=64)]


class PoolGpu(_Config):
    types: tuple[GpuType, ...] = Field(min_length=1)
    min_count: Annotated[StrictInt, Field(ge=1)] = 1
    min_memory_mib: Annotated[StrictInt, Field(ge=1)] | None = None
    limit: Annotated[StrictInt, Field(ge=1)]
    time_slicing: TimeSlicing | None = None

    @property
    def schedulable(self) -> int:
        """`nvidia.com/gpu` units the pool can offer at its limit."""
        return self.limit * (self.time_slicing.replicas if self.time_slicing else 1)


class PoolLimits(_Config):
    cpu: Quantity | None = None
    memory: Quantity | None = None


class Budget(_Config):
    nodes: str = Field(default="10%", pattern=r"^((100|[0-9]{1,2})%|[0-9]+)$")
    schedule: str | None = None
    duration: str | None = Field(default=None, pattern=r"^([0-9]+h)?([0-9]+m)?$")


class PoolDisruption(_Config):
    consolidation_policy: Literal["WhenEmpty", "WhenEmptyOrUnderutilized"] = "WhenEmpty"
    consolidate_after: str = Field(default="10m", pattern=r"^(([0-9]+(s|m|h))+|Never)$")
    budgets: tuple[Budget, ...] = (Budget(),)


class NodeClass(_Config):
    role: str = Field(min_length=1)
    ami_alias: str = Field(default="al2023@latest", pattern=r"^(al2|al2023|bottlerocket|windows2019|windows2022)@.+$")
    subnet_tags: dict[str, str] = Field(min_length=1)
    security_group_tags: dict[str, str] = Field(min_length=1)
    volume_size: Quantity = "200Gi"


class NodePool(_Config):
    """A Karpenter NodePool and its EC2NodeClass; with `gpu`, a GPU pool tainted so only GPU variants land."""

    gpu: PoolGpu | None = None
    instance_families: tuple[str, ...] = ()
    instance_categories: tuple[str, ...] = ()
    architecture: Literal["amd64", "arm64"] = "amd64"
    capacity_types: tuple[Literal["on-demand", "spot"], ...] = ("on-demand",)
    limits: PoolLimits = PoolLimits()
    disruption: PoolDisruption = PoolDisruption()
    labels: dict[str, str] = {}
    taint_key: str | None = None
    expire_after: str = "720h"
    node_class: NodeClass


class Gpu(_Config):
    """Cluster-wide GPU support: how `nvidia.com/gpu` becomes schedulable, and GPU metrics."""

    device_plugin: Literal["device-plugin", "gpu-operator", "existing"] = "device-plugin"
    dcgm_exporter: Literal["install", "existing"] = "install"
    # The exporter's ServiceMonitor, labelled for the Prometheus of `monitoring`; default: on with monitoring.
    dcgm_service_monitor: StrictBool | None = None
    taint_key: str = "nvidia.com/gpu"
