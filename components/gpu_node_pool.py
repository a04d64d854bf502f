"""GpuNodePool: a Karpenter NodePool and the EC2NodeClass it launches from, for one pool of the stack."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components import _kubernetes
from ml_serving.settings import Settings
from ml_serving.specs import gpu


@dataclass
class GpuNodePoolArgs:
    settings: Settings
    pool: str


class GpuNodePool(pulumi.ComponentResource):
    """Nodes for the variants that land on this pool: instance requirements, GPU taint, limits, disruption."""

    def __init__(self, name: str, args: GpuNodePoolArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ml-serving:gpu:GpuNodePool", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.node_class = _kubernetes.custom_resource(
            f"{name}-nodeclass", gpu.node_class(args.settings, args.pool), child
        )
        self.node_pool = _kubernetes.custom_resource(
            f"{name}-nodepool",
            gpu.node_pool(args.settings, args.pool),
            pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=[self.node_class])),
        )
        self.register_outputs({"nodePool": self.node_pool.metadata["name"]})
