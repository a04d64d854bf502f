"""The real Seldon operator beside the local API server, and a stack's objects as it reconciles them.

A stack is planned under the mock engine (the real program, its real specs) and its namespace, Secret and
SeldonDeployments are applied to the API server; the operator makes its Deployments, Services, PDBs and
ScaledObjects. With no kubelet nothing becomes available, so `mark_available` patches each Deployment's status
as envtest-style tests do; the operator then writes the VirtualService and DestinationRules.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ml_serving.localoperator import LocalOperator, operator_ready, wait_for
from ml_serving.localprometheus import apply_object
from ml_serving.plan import Plan, revealed, run_program
from ml_serving.settings import Settings
from ml_serving.specs import platform
from ml_serving.stackfile import parse_settings
from tests.conftest import PROJECT_DIR, stack_config

SELDON_ID = "seldon-deployment-id"  # the label the operator puts on everything it makes for one SeldonDeployment
APPLIED_KINDS = ("Namespace", "ServiceAccount", "Secret", "SeldonDeployment")


@contextlib.contextmanager
def seldon_operator_beside(tools: Path, cluster: Any) -> Iterator[LocalOperator]:
    """The operator built by `./run tools`, set up by prod's chart values, against `cluster`; stopped by its PID."""
    problem = operator_ready(tools / "bin")
    if problem:
        if os.environ.get("ML_SERVING_REQUIRE_ENGINE"):
            pytest.fail(f"ML_SERVING_REQUIRE_ENGINE is set but {problem}")
        pytest.skip(problem)
    settings = parse_settings(stack_config("prod"), "Pulumi.prod.yaml")
    operator = LocalOperator(tools / "bin", cluster.kubeconfig, platform.seldon_operator(settings), root=cluster.root)
    operator.start(cluster.api_client())
    try:
        yield operator
    finally:
        operator.stop()


@pytest.fixture(scope="session")
def seldon_operator(tools: Path, cluster) -> Iterator[LocalOperator]:  # type: ignore[no-untyped-def]
    """The operator built by `./run tools`, set up by the chart with prod's values (Istio, KEDA, the gateway)."""
    with seldon_operator_beside(tools, cluster) as operator:
        yield operator


@dataclass
class Reconciled:
    """A stack's plan applied to the API server, and what the operator made of it, read back live."""

    cluster: Any
    operator: LocalOperator
    config: dict[str, Any]
    stack: str = "prod"
    plan: Plan = field(init=False)
    settings: Settings = field(init=False)

    def __post_init__(self) -> None:
        self.apply(self.config)

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    def apply(self, config: dict[str, Any]) -> None:
        """Plan `config` and create or replace its namespace, Secret and SeldonDeployments."""
        self.config = copy.deepcopy(config)
        self.settings = parse_settings(self.config, f"Pulumi.{self.stack}.yaml")
        self.plan = run_program(PROJECT_DIR, self.stack, config=self.config)
        objects = [revealed(o) for kind in APPLIED_KINDS for o in self.plan.find(kind)]
        for obj in objects:
            _apply(self.cluster, obj)

    def resource(self, api_version: str, kind: str) -> Any:
        from kubernetes.dynamic import DynamicClient

        return DynamicClient(self.cluster.api_client()).resources.get(api_version=api_version, kind=kind)

    def items(self, api_version: str, kind: str, sdep: str | None = None) -> list[dict[str, Any]]:
        selector = f"{SELDON_ID}={sdep}" if sdep else None
        found = self.resource(api_version, kind).get(namespace=self.namespace, label_selector=selector)
        return [i.to_dict() for i in found.items]

    def deployments(self) -> list[dict[str, Any]]:
        return self.items("apps/v1", "Deployment")

    def wait_for_deployments(self) -> list[dict[str, Any]]:
        """One Deployment per predictor of every SeldonDeployment, as the operator writes them."""
        wanted = sum(len(s["spec"]["predictors"]) for s in self.plan.find("SeldonDeployment"))
        return wait_for(
            lambda: (found := self.deployments()) and len(found) >= wanted and found,
            f"{wanted} Deployments in {self.namespace}",
            log=self.operator.log,
        )

    def mark_available(self) -> None:
        """What a kubelet and the Deployment controller would report once every pod is ready."""
        from kubernetes import client

        apps = client.AppsV1Api(self.cluster.api_client())
        for deployment in self.wait_for_deployments():
            meta = deployment["metadata"]
            replicas = deployment["spec"].get("replicas") or 1
            status = {
                "observedGeneration": meta["generation"],
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
                ],
            }
            apps.patch_namespaced_deployment_status(meta["name"], self.namespace, {"status": status})

    def virtual_service(self, sdep: str, wanted: Any = None) -> dict[str, Any]:
        """The operator's VirtualService for `sdep`, once it exists (and, given `wanted`, once `wanted(vs)`)."""

        def found() -> dict[str, Any] | None:
            for vs in self.items("networking.istio.io/v1beta1", "VirtualService"):
                if vs["metadata"]["name"] == sdep and (wanted is None or wanted(vs)):
                    return vs
            return None

        return wait_for(found, f"VirtualService {self.namespace}/{sdep}", log=self.operator.log)


def _apply(cluster: Any, obj: dict[str, Any]) -> None:
    apply_object(cluster.api_client(), obj)


def reconciled(
    cluster: Any, operator: LocalOperator, namespace: str, stack_name: str = "prod", registry: Any = None
) -> Reconciled:
    """A stack's config in namespace `namespace` (its aliases resolved in `registry`), applied and reconciled to
    the point where the operator has written the VirtualService of every SeldonDeployment."""
    config = copy.deepcopy(stack_config(stack_name))
    config["ml-serving:namespace"] = namespace
    if registry is not None:
        config["ml-serving:registry"] = {"trackingUri": registry.tracking_uri}
    stack = Reconciled(cluster, operator, config, stack_name)
    stack.mark_available()
    for sdep in stack.plan.find("SeldonDeployment"):
        stack.virtual_service(sdep["metadata"]["name"])
    return stack


@pytest.fixture(scope="session")
def prod_reconciled(cluster, seldon_operator: LocalOperator) -> Reconciled:  # type: ignore[no-untyped-def]
    """Prod's models (MLServer and BentoML, s3:// and baked, GPU, a shadow), as the operator reconciles them."""
    return reconciled(
        cluster, seldon_operator, "models-operator"
    )  # not the stacks' own: engine tests share the cluster
