"""ServingPlatform: the namespace and what Seldon needs to serve and split traffic (each part switchable off)."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components import _kubernetes
from ml_serving.settings import Settings
from ml_serving.specs import gpu
from ml_serving.specs import platform as specs


@dataclass
class ServingPlatformArgs:
    settings: Settings


class ServingPlatform(pulumi.ComponentResource):
    """Namespace, Seldon Core v1 operator, KEDA, the Istio gateway and GPU support, as the stack asks."""

    def __init__(self, name: str, args: ServingPlatformArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ml-serving:platform:ServingPlatform", name, None, opts)
        settings, child = args.settings, pulumi.ResourceOptions(parent=self)
        releases = []
        if settings.platform.keda == "install":
            releases.append(_kubernetes.helm_release(specs.keda(settings), child))
        if settings.platform.seldon == "install":
            # The operator's webhook reads KEDA's CRDs, so KEDA goes first.
            seldon_opts = pulumi.ResourceOptions.merge(child, pulumi.ResourceOptions(depends_on=releases))
            releases.append(_kubernetes.helm_release(specs.seldon_operator(settings), seldon_opts))
        if any(pool.gpu for pool in settings.node_pools.values()):
            # nvidia.com/gpu is schedulable only once the device plugin (or the GPU Operator) runs on GPU nodes.
            if settings.gpu.device_plugin == "device-plugin":
                releases.append(_kubernetes.helm_release(gpu.device_plugin(settings), child))
            elif settings.gpu.device_plugin == "gpu-operator":
                releases.append(_kubernetes.helm_release(gpu.gpu_operator(settings), child))
            if settings.gpu.dcgm_exporter == "install":
                releases.append(_kubernetes.helm_release(gpu.dcgm_exporter(settings), child))
        self.namespace = _kubernetes.namespace(settings.namespace, specs.namespace(settings), child)
        self.gateway = None
        if settings.platform.istio_gateway == "install":
            self.gateway = _kubernetes.custom_resource("istio-gateway", specs.istio_gateway(settings), child)
        self.ready = [self.namespace, *releases, *([self.gateway] if self.gateway else [])]
        self.register_outputs({"namespace": self.namespace.metadata["name"]})
