"""What serving needs in the cluster: the namespace, Seldon Core v1, KEDA and the Istio gateway for traffic.

Helm charts are pinned by version here, so an upgrade is a reviewed diff like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ml_serving import labels
from ml_serving.settings import Settings

ISTIO_GATEWAY_API = "networking.istio.io/v1beta1"
ISTIO_INJECTION, ISTIO_REVISION = "istio-injection", "istio.io/rev"  # what istiod's injector selects namespaces by
POD_SECURITY = "pod-security.kubernetes.io"  # Pod Security admission's namespace labels: enforce, warn, audit
POD_SECURITY_LEVEL = "restricted"


@dataclass(frozen=True)
class HelmChart:
    """A chart pinned by repository and version, installed as one Helm release."""

    release: str
    chart: str
    version: str
    repository: str
    namespace: str
    values: dict[str, Any]


def namespace_object(name: str, component: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels.common(component)}}


def namespace(settings: Settings) -> dict[str, Any]:
    """The models namespace: sidecars injected where the mesh policies need them (STRICT mTLS, the access policy
    and the JWT rule are enforced by the sidecar, so without one they guard nothing), and Pod Security
    `restricted` enforced (and warned and audited, so a refused template is named on its Deployment too)."""
    found = namespace_object(settings.namespace, "serving")
    extra = {f"{POD_SECURITY}/{mode}": POD_SECURITY_LEVEL for mode in ("enforce", "warn", "audit")}
    if settings.security.mtls != "off":
        revision = settings.security.istio_revision
        extra.update({ISTIO_REVISION: revision} if revision else {ISTIO_INJECTION: "enabled"})
    found["metadata"]["labels"].update(extra)
    return found


# The user the operators' pods run as: above 9999, so it maps to no user of the node (checkov CKV_K8S_40); their
# images hold static binaries, which need no user of their own.
OPERATOR_UID = 65532


def chart_resources(cpu: str, memory: str, cpu_limit: str, memory_limit: str) -> dict[str, Any]:
    """Requests and limits for a chart's container: a platform pod is scheduled for what it needs and cannot starve
    the models on its node (checkov CKV_K8S_10 to 13)."""
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu_limit, "memory": memory_limit}}


def runtime_default() -> dict[str, Any]:
    """The container runtime's default seccomp profile, for a chart's pod securityContext (checkov CKV_K8S_31)."""
    return {"seccompProfile": {"type": "RuntimeDefault"}}


def locked_down(read_only: bool = True) -> dict[str, Any]:
    """A chart container's securityContext: no privilege escalation, every capability dropped, the runtime's seccomp
    profile, and a read-only root unless the image writes to it (checkov CKV_K8S_20, 22, 28, 37)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only,
        **runtime_default(),
    }


def seldon_operator(settings: Settings) -> HelmChart:
    """Seldon Core v1's operator, with KEDA autoscaling and Istio routing (weights, shadows) switched on."""
    return HelmChart(
        release="seldon-core",
        chart="seldon-core-operator",
        version="1.18.2",
        repository="https://storage.googleapis.com/seldon-charts",
        namespace="seldon-system",
        values={
            "istio": {"enabled": True, "gateway": settings.platform.gateway},
            "keda": {"enabled": settings.platform.autoscaler == "keda"},
            "usageMetrics": {"enabled": False},
            "managerUserID": OPERATOR_UID,  # the chart's only securityContext value
        },
    )


def keda(settings: Settings) -> HelmChart:
    return HelmChart(
        release="keda",
        chart="keda",
        version="2.16.1",
        repository="https://kedacore.github.io/charts",
        namespace="keda",
        # The chart's containers already drop every capability with a read-only root and RuntimeDefault seccomp.
        values={
            "podSecurityContext": {
                pod: {"runAsNonRoot": True, "runAsUser": OPERATOR_UID, "runAsGroup": OPERATOR_UID}
                for pod in ("operator", "metricServer", "webhooks")
            }
        },
    )


def istio_gateway(settings: Settings) -> dict[str, Any]:
    """The gateway Seldon's VirtualServices attach to; Istio itself (istiod, ingress) is a prerequisite.

    With `platform.tls`, HTTPS for the configured hosts and HTTP only to redirect there; without, plain HTTP for
    any host (a local sandbox).
    """
    gateway_namespace, gateway_name = settings.platform.gateway.split("/")
    tls = settings.platform.tls
    if tls is None:
        servers = [{"hosts": ["*"], "port": {"name": "http", "number": 80, "protocol": "HTTP"}}]
    else:
        hosts = list(tls.hosts)
        servers = [
            {
                "hosts": hosts,
                "port": {"name": "https", "number": 443, "protocol": "HTTPS"},
                "tls": {"mode": "SIMPLE", "credentialName": tls.credential_name, "minProtocolVersion": "TLSV1_2"},
            },
            {
                "hosts": hosts,
                "port": {"name": "http", "number": 80, "protocol": "HTTP"},
                "tls": {"httpsRedirect": True},
            },
        ]
    return {
        "apiVersion": ISTIO_GATEWAY_API,
        "kind": "Gateway",
        "metadata": {"name": gateway_name, "namespace": gateway_namespace, "labels": labels.common("ingress")},
        "spec": {"selector": {"istio": "ingressgateway"}, "servers": servers},
    }
