"""Who may reach the model pods: NetworkPolicies, Istio mTLS and access policy for the models namespace.

Every predictor is Seldon `no-engine`, so the operator's Services and VirtualService route straight to the
server's container: MLServer's http/grpc ports, BentoML's one port (which also serves its /metrics). What each
runtime opens is exactly that, per runtime present in the stack:
- NetworkPolicies (enforced by the cluster's CNI, switchable off where it does not): ingress is denied by default;
  the Istio ingress gateway's namespace may reach the serving ports, the monitoring namespace the scrape port.
- PeerAuthentication: mutual TLS inside the mesh (STRICT), with the scrape port PERMISSIVE for each model and
  runtime, since Prometheus scrapes without a sidecar.
- AuthorizationPolicy: only the ingress gateway's identity (and, with `security.jwt`, only requests carrying a
  valid token of that issuer, checked by a RequestAuthentication) reaches the serving ports; anyone the
  NetworkPolicy lets through reaches MLServer's metrics port and BentoML's GET /metrics.
"""

from __future__ import annotations

from typing import Any

from ml_serving import labels
from ml_serving.runtimes import Runtime
from ml_serving.settings import Settings
from ml_serving.specs.monitoring import BENTOML_METRICS_PATH
from ml_serving.specs.seldon import scrape_port, serving_ports

NETWORKING_API = "networking.k8s.io/v1"
SECURITY_API = "security.istio.io/v1"
NAMESPACE_NAME = "kubernetes.io/metadata.name"  # the label Kubernetes puts on every namespace
ISTIO_PROBE_PORT = 15020  # Istio rewrites HTTP probes to the sidecar's agent on this port
RUNTIMES = tuple(str(runtime) for runtime in Runtime)


def runtimes(settings: Settings) -> list[str]:
    """The runtimes the stack's variants use, in a fixed order."""
    used = {v.runtime for m in settings.models.values() for v in m.variants.values()}
    return [r for r in RUNTIMES if r in used]


def all_serving_ports(settings: Settings) -> tuple[int, ...]:
    return tuple(p for r in runtimes(settings) for p in serving_ports(r))


def _metadata(settings: Settings, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": settings.namespace, "labels": labels.common("security")}


def _runtime_pods(runtime: str) -> dict[str, Any]:
    return {"matchLabels": {labels.RUNTIME: runtime}}


def _tcp(ports: tuple[int, ...]) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def _from_namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME: name}}}


def network_policies(settings: Settings) -> list[dict[str, Any]]:
    """Deny all ingress in the models namespace, then allow per runtime what serving needs (nothing when off)."""
    if not settings.security.network_policies:
        return []
    deny = {
        "apiVersion": NETWORKING_API,
        "kind": "NetworkPolicy",
        "metadata": _metadata(settings, "ml-serving-default-deny-ingress"),
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    return [deny, *(_allow(settings, runtime) for runtime in runtimes(settings))]


def _allow(settings: Settings, runtime: str) -> dict[str, Any]:
    serving, scrape = serving_ports(runtime), scrape_port(runtime)
    ingress = [{"from": [_from_namespace(settings.platform.gateway_namespace)], "ports": _tcp(serving)}]
    if settings.monitoring is not None:
        ingress.append({"from": [_from_namespace(settings.monitoring.namespace)], "ports": _tcp((scrape,))})
    if settings.security.probe_cidrs:
        ingress.append(
            {
                "from": [{"ipBlock": {"cidr": cidr}} for cidr in settings.security.probe_cidrs],
                "ports": _tcp(tuple(dict.fromkeys((*serving, scrape, ISTIO_PROBE_PORT)))),
            }
        )
    return {
        "apiVersion": NETWORKING_API,
        "kind": "NetworkPolicy",
        "metadata": _metadata(
            settings, "ml-serving-allow-serving" if runtime == Runtime.MLSERVER else f"ml-serving-allow-{runtime}"
        ),
        "spec": {"podSelector": _runtime_pods(runtime), "policyTypes": ["Ingress"], "ingress": ingress},
    }


def peer_authentications(settings: Settings) -> list[dict[str, Any]]:
    """Mesh mTLS for the namespace; each model's scrape port, per runtime, stays reachable by a Prometheus without
    sidecar (BentoML's is its serving port: the AuthorizationPolicy lets plain requests reach only /metrics)."""
    mode = settings.security.mtls
    if mode == "off":
        return []
    namespace_wide = {
        "apiVersion": SECURITY_API,
        "kind": "PeerAuthentication",
        "metadata": _metadata(settings, "default"),
        "spec": {"mtls": {"mode": mode}},
    }
    scrape_ports = [
        {
            "apiVersion": SECURITY_API,
            "kind": "PeerAuthentication",
            "metadata": _metadata(
                settings, f"ml-serving-metrics-{key}" + ("" if runtime == Runtime.MLSERVER else f"-{runtime}")
            ),
            "spec": {
                "selector": {"matchLabels": {labels.MODEL: key, labels.RUNTIME: runtime}},
                "mtls": {"mode": mode},
                "portLevelMtls": {str(scrape_port(runtime)): {"mode": "PERMISSIVE"}},
            },
        }
        for key, model in settings.models.items()
        for runtime in RUNTIMES
        if any(v.runtime == runtime for v in model.variants.values())
    ]
    return [namespace_wide, *scrape_ports]


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
    the scrape endpoints answer anyone the NetworkPolicy lets through. Needs mTLS: identities come from it."""
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
                {
                    "from": [{"source": source}],
                    "to": [{"operation": {"ports": [str(p) for p in all_serving_ports(settings)]}}],
                },
                *(_scrape_rule(runtime) for runtime in runtimes(settings)),
            ],
        },
    }


def _scrape_rule(runtime: str) -> dict[str, Any]:
    operation: dict[str, Any] = {"ports": [str(scrape_port(runtime))]}
    if runtime == Runtime.BENTOML:  # its scrape port is its serving port: plain requests reach only the metrics
        operation.update(paths=[BENTOML_METRICS_PATH], methods=["GET"])
    return {"to": [{"operation": operation}]}


def objects(settings: Settings) -> list[dict[str, Any]]:
    """Every security object of the models namespace, in apply order."""
    found = [*network_policies(settings), *peer_authentications(settings)]
    found += [o for o in (request_authentication(settings), authorization_policy(settings)) if o is not None]
    return found
