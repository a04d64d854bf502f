"""One ComponentResource per concern; each builds its objects with `ml_serving.specs` and only wires them."""

from components.gpu_node_pool import GpuNodePool, GpuNodePoolArgs
from components.model_deployment import ModelDeployment, ModelDeploymentArgs
from components.monitoring import MonitoringStack, MonitoringStackArgs
from components.platform import ServingPlatform, ServingPlatformArgs
from components.security import ModelsSecurity, ModelsSecurityArgs
from components.serving_image import ServingImage, ServingImageArgs

__all__ = [
    "GpuNodePool",
    "GpuNodePoolArgs",
    "ModelDeployment",
    "ModelDeploymentArgs",
    "ModelsSecurity",
    "ModelsSecurityArgs",
    "MonitoringStack",
    "MonitoringStackArgs",
    "ServingImage",
    "ServingImageArgs",
    "ServingPlatform",
    "ServingPlatformArgs",
]
