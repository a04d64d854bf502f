"""Who may reach the model pods: NetworkPolicies, Istio mTLS and access policy for the models namespace.

- NetworkPolicies (enforced by the cluster's CNI, switchable off where it does not): ingress is denied by default;
  the Istio ingress gateway's namespace may reach the serving ports, the monitoring namespace the metrics port.
- PeerAuthentication: mutual TLS inside the mesh (STRICT), with the metrics port PERMISSIVE for each model, since
  Prometheus scrapes without a sidecar.
- AuthorizationPolicy: only the ingress gateway's identity (and, with `security.jwt`, only requests carrying a
  valid token of that issuer, checked by a RequestAuthentication) reaches the serving ports.
"""

from __future__ import annotations

from typing import Any

from ml_serving import labels
from ml_serving.image import METRICS_PORT
from ml_serving.settings import Settings
from ml_serving.specs.seldon import EXECUTOR_PORTS, MODEL_PORTS

NETWORKING_API = "networking.k8s.io/v1"
SECURITY_API = "security.istio.io/v1"
NAMESPACE_NAME = "kubernetes.io/metadata.name"  # the label Kubernetes puts on every namespace
SERVING_PORTS = (*EXECUTOR_PORTS, *MODEL_PORTS)
ISTIO_PROBE_PORT = 15020  # Istio rewrites HTTP probes to the sidecar's agent on this port


def _metadata(settings: Settings, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": settings.namespace, "labels": labels.common("security")}


def _model_pods() -> dict[str, Any]:
    return {"matchExpressions": [{"key": labels.MODEL, "operator": "Exists"}]}


def _tcp(ports: tuple[int, ...]) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def _from_namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: name}}}


def network_policies(settings: Settings) -> list[dict[str, Any]]:
    """Deny all ingress in the models namespace, then allow what serving needs (nothing when switched off)."""
    if not settings.security.network_policies:
        return []
    deny = {
        "apiVersion": NETWORKING_API,
        "kind": "NetworkPolicy",
        "metadata": _metadata(settings, "ml-serving-default-deny-ingress"),
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    ingress = [{"from": [_from_namespace(settings.platform.gateway_namespace)], "ports": _tcp(SERVING_PORTS)}]
    if settings.monitoring is not None:
        ingress.append({"from": [_from_namespace(settings.monitoring.namespace)], "ports": _tcp((METRICS_PORT,))})
    if settings.security.probe_cidrs:
        ingress.append(
            {
                "from": [{"ipBlock": {"cidr": cidr}} for cidr in settings.security.probe_cidrs],
                "ports": _tcp((*SERVING_PORTS, METRICS_PORT, ISTIO_PROBE_PORT)),
            }
        )
    allow = {
        "apiVersion": NETWORKING_API,
        "kind": "NetworkPolicy",
        "metadata": _metadata(settings, "ml-serving-allow-serving"),
        "spec": {"podSelector": _model_pods(), "policyTypes": ["Ingress"], "ingress": ingress},
    }
    return [deny, allow]


def peer_authentications(settings: Settings) -> list[dict[str, Any]]:
    """Mesh mTLS for the namespace; each model's metrics port stays reachable by a Prometheus without sidecar."""
    mode = settings.security.mtls
    if mode == "off":
        return []
    namespace_wide = {
        "apiVersion": SECURITY_API,
        "kind": "PeerAuthentication",
        "metadata": _metadata(settings, "default"),
        "spec": {"mtls": {"mode": mode}},
    }
    metrics_ports = [
        {
            "apiVersion": SECURITY_API,
            "kind": "PeerAuthentication",
            "metadata": _metadata(settings, f"ml-serving-metrics-{key}"),
            "spec": {
                "selector": {"matchLabels": {labels.MODEL: key}},
                "mtls": {"mode": mode},
                "portLevelMtls": {str(METRICS_PORT): {"mode": "PERMISSIVE"}},
            },
        }
        for key in settings.models
    ]
    return [namespace_wide, *metrics_ports]


def gateway_principal(settings: Settings) -> str:
    """The mesh identity of Istio's ingress gateway (its service account, in SPIFFE form without the scheme)."""
    security = settings.security
    return f"{security.trust_domain}/ns/{settings.platform.gateway_namespace}/sa/{security.gateway_service_account}"


def request_authentication(settings: Settings) -> dict[str, Any] | None:
    jwt = settings.security.jwt
    if jwt is None:
        return None
    rule: dict[str, Any] = {"issuer": jwt.issuer, "jwksUri": jwt.jwks_uri}
    if jwt.audiences:
        rule["audiences"] = list(jwt.audiences)
    return {
        "apiVersion": SECURITY_API,
        "kind": "RequestAuthentication",
        "metadata": _metadata(settings, "ml-serving-callers"),
        "spec": {"jwtRules": [rule]},
    }


def authorization_policy(settings: Settings) -> dict[str, Any] | None:
    """Only the ingress gateway (and with `jwt`, only a caller with a valid token) reaches the serving ports;
    the metrics port answers anyone the NetworkPolicy lets through. Needs mTLS: identities come from it."""
    if settings.security.mtls == "off":
        return None
    source: dict[str, Any] = {"principals": [gateway_principal(settings)]}
    if settings.security.jwt is not None:
        source["requestPrincipals"] = [f"{settings.security.jwt.issuer}/*"]
    return {
        "apiVersion": SECURITY_API,
        "kind": "AuthorizationPolicy",
        "metadata": _metadata(settings, "ml-serving-callers"),
        "spec": {
            "action": "ALLOW",
            "rules": [
                {"from": [{"source": source}], "to": [{"operation": {"ports": [str(p) for p in SERVING_PORTS]}}]},
                {"to": [{"operation": {"ports": [str(METRICS_PORT)]}}]},
            ],
        },
    }


def objects(settings: Settings) -> list[dict[str, Any]]:
    """Every security object of the models namespace, in apply order."""
    found = [*network_policies(settings), *peer_authentications(settings)]
    found += [o for o in (request_authentication(settings), authorization_policy(settings)) if o is not None]
    return found
