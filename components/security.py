"""ModelsSecurity: NetworkPolicies, mesh mTLS and access policy for the models namespace."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from components import _kubernetes
from ml_serving.settings import Settings
from ml_serving.specs import security as specs


@dataclass
class ModelsSecurityArgs:
    settings: Settings


class ModelsSecurity(pulumi.ComponentResource):
    """Who may reach the model pods; each part follows `security` in the stack config (README, 'Security')."""

    def __init__(self, name: str, args: ModelsSecurityArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("ml-serving:security:ModelsSecurity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.objects: list[pulumi.Resource] = []
        for obj in specs.objects(args.settings):
            resource_name = f"{obj['kind'].lower()}-{obj['metadata']['name']}"
            if obj["kind"] == "NetworkPolicy":
                self.objects.append(
                    k8s.networking.v1.NetworkPolicy(
                        resource_name, metadata=obj["metadata"], spec=obj["spec"], opts=child
                    )
                )
            else:
                self.objects.append(_kubernetes.custom_resource(resource_name, obj, child))
        self.register_outputs(
            {"objects": [f"{o['kind']}/{o['metadata']['name']}" for o in specs.objects(args.settings)]}
        )
