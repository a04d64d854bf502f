"""The KServe backend (`platform.backend: kserve`): per model, one InferenceService per variant in Standard mode,
one Istio VirtualService owning the weights and the shadow mirror, the project's own KEDA ScaledObjects and PDBs.

KServe v0.20.0 facts this builder relies on (read in `pkg/controller/v1beta1/inferenceservice/` and
`pkg/constants/constants.go` at tag v0.20.0; README, 'Choosing a backend'):
- a predictor with `containers` is a custom predictor: the container must be named `kserve-container`; its env
  `STORAGE_URI` makes the pod webhook add the storage initializer, which downloads to `/mnt/models` with the
  credentials of the predictor's service account (`serving.kserve.io/s3-*` annotations, its listed Secrets);
- in Standard mode it makes a Deployment and a Service both named `<isvc>-predictor`; the Service maps port 80 to
  the container's first port and keeps the others; pods carry the isvc's and the predictor's labels, plus
  `app: isvc.<isvc>-predictor`;
- its KEDA reconciler copies only the stabilization windows of `autoScaling.behavior` (not the policies), so
  autoscaling uses `autoscalerClass: external` and the ScaledObject Seldon would have made from the same block;
  with `external` it leaves the Deployment's replicas alone; it makes no PodDisruptionBudget;
- `networking.kserve.io/visibility: cluster-local` stops it making an Ingress of its own: the VirtualService is
  the only way in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ml_serving import labels
from ml_serving.image import BAKED_MODEL_PATH, METRICS_PORT
from ml_serving.registry import ResolvedVersion
from ml_serving.runtimes import Runtime
from ml_serving.settings import Settings
from ml_serving.specs import seldon
from ml_serving.specs.platform import ISTIO_GATEWAY_API

API_VERSION = "serving.kserve.io/v1beta1"
KEDA_API = "keda.sh/v1alpha1"
CONTAINER = "kserve-container"  # constants.InferenceServiceContainerName
STORAGE_URI_ENV = "STORAGE_URI"  # constants.CustomSpecStorageUriEnvVarKey
MODEL_DIR = "/mnt/models"  # constants.DefaultModelLocalMountPath
SERVICE_PORT = 80  # constants.CommonDefaultHttpPort: the predictor Service's port for the first container port
PREDICTOR_SUFFIX = "-predictor"  # constants.PredictorServiceName: Deployment and Service `<isvc>-predictor`
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
AUTOSCALER_CLASS = "serving.kserve.io/autoscalerClass"
VISIBILITY = "networking.kserve.io/visibility"
S3_ANNOTATION = "serving.kserve.io/s3-"  # + endpoint, region, usehttps, verifyssl (pkg/credentials/s3)
# The path MLServer serves metrics on: what Seldon sets MLSERVER_METRICS_ENDPOINT to, and the PodMonitor scrapes.
METRICS_PATH = "/prometheus"
# The same model container ports as under Seldon, so NetworkPolicies and AuthorizationPolicies fit both backends.
HTTP_PORT, GRPC_PORT = seldon.MODEL_PORTS
SERVICE_ACCOUNT = "ml-serving-artifact-store"
S3_SECRET = "ml-serving-kserve-s3"
# rclone's s3 options → KServe's: the service account's annotations, and the Secret keys its credential builder reads.
S3_OPTIONS = {"REGION": "region", "ENDPOINT": "endpoint"}
S3_KEYS = {"ACCESS_KEY_ID": "awsAccessKeyID", "SECRET_ACCESS_KEY": "awsSecretAccessKey"}
KUBE_NAME_MAX = 63


class KServeConfigError(ValueError):
    """A stack the kserve backend cannot serve as written."""


def isvc_name(model_key: str, variant: str) -> str:
    return f"{model_key}-{variant}"


def predictor_name(model_key: str, variant: str) -> str:
    """The Deployment and Service KServe makes for the variant."""
    return isvc_name(model_key, variant) + PREDICTOR_SUFFIX


def predictor_host(settings: Settings, model_key: str, variant: str) -> str:
    return f"{predictor_name(model_key, variant)}.{settings.namespace}.svc.cluster.local"


def route_prefix(settings: Settings, model_key: str) -> str:
    """The same external path as under Seldon, so callers keep their URLs when the backend changes."""
    return f"/seldon/{settings.namespace}/{model_key}/"


def check(settings: Settings, resolved: Callable[[str, str], ResolvedVersion]) -> None:
    """Refuse names KServe would cut and model URIs its storage initializer cannot reach, before anything applies."""
    for model_key, model in settings.models.items():
        for name in model.variants:
            if len(predictor_name(model_key, name)) > KUBE_NAME_MAX:
                raise KServeConfigError(
                    f"ml-serving:models.{model_key}.variants.{name}: KServe names the variant's Service "
                    f"'{predictor_name(model_key, name)}', longer than {KUBE_NAME_MAX} characters: shorten the model "
                    "key or the variant name"
                )
            if model.serving.bake:
                continue
            uri = resolved(model_key, name).model_uri
            scheme = seldon.storage_scheme(uri)
            if scheme is not None and settings.artifact_store is None:
                raise KServeConfigError(
                    f"ml-serving:models.{model_key}.variants.{name}: {uri} is downloaded by KServe's storage "
                    f"initializer, which needs credentials for {scheme}://: set ml-serving:artifactStore (README, "
                    "'Artifact store'), or bake the model into the image (serving.bake: true)"
                )


# -- the artifact store: a service account (and Secret) in KServe's format ------------------------------------------


def _s3_options(settings: Settings) -> dict[str, str]:
    store = settings.artifact_store
    prefix = "RCLONE_CONFIG_S3_"
    if store is None:
        return {}
    return {key.removeprefix(prefix): value for key, value in store.rclone.items() if key.startswith(prefix)}


def s3_secret(settings: Settings) -> dict[str, Any] | None:
    """Access keys from artifactStore.rclone, under the keys KServe's credential builder reads; None without keys."""
    options = _s3_options(settings)
    data = {key: options[option] for option, key in S3_KEYS.items() if option in options}
    if not data:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": S3_SECRET, "namespace": settings.namespace, "labels": labels.common("serving")},
        "type": "Opaque",
        "stringData": data,
    }


def service_account_name(settings: Settings) -> str | None:
    """The account the predictors run under: the team's (IRSA, workload identity) or the stack's own."""
    store = settings.artifact_store
    if store is None:
        return None
    return store.service_account_name or SERVICE_ACCOUNT


def service_account(settings: Settings) -> dict[str, Any] | None:
    """The stack's account for the storage initializer: `serving.kserve.io/s3-*` annotations from rclone's s3
    options, the credentials Secret listed. None when the team names its own account (it carries them itself)."""
    store = settings.artifact_store
    if store is None or store.service_account_name:
        return None
    options = _s3_options(settings)
    notes = {S3_ANNOTATION + name: options[option] for option, name in S3_OPTIONS.items() if option in options}
    endpoint = options.get("ENDPOINT", "")
    if endpoint.startswith(("http://", "https://")):
        notes[S3_ANNOTATION + "endpoint"] = endpoint.split("://", 1)[1]
        notes[S3_ANNOTATION + "usehttps"] = "1" if endpoint.startswith("https://") else "0"
    secrets = [name for name in (store.secret_name, S3_SECRET if s3_secret(settings) else None) if name]
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": SERVICE_ACCOUNT,
            "namespace": settings.namespace,
            "labels": labels.common("serving"),
            "annotations": notes,
        },
        "secrets": [{"name": name} for name in secrets],
        "automountServiceAccountToken": False,
    }


# -- one InferenceService per variant -----------------------------------------------------------------------------


def serving_container(
    settings: Settings, model_key: str, variant_name: str, resolved: ResolvedVersion, image: str
) -> dict[str, Any]:
    """Seldon's serving container (image, env, probes, resources, security context), told by env what the Seldon
    operator would have told it, with its ports declared: `http` first, since KServe's Service maps 80 to it."""
    model = settings.models[model_key]
    variant = model.variants[variant_name]
    container = seldon.serving_container(model_key, model, variant, image, resolved.version)
    env = {
        "MLSERVER_MODEL_NAME": model_key,
        "MLSERVER_HTTP_PORT": str(HTTP_PORT),
        "MLSERVER_GRPC_PORT": str(GRPC_PORT),
        "MLSERVER_METRICS_PORT": str(METRICS_PORT),
        "MLSERVER_METRICS_ENDPOINT": METRICS_PATH,
        "MLSERVER_MODEL_URI": BAKED_MODEL_PATH if model.serving.bake else MODEL_DIR,
        "PROTOCOL": "v2",
    }
    if not model.serving.bake:
        env[STORAGE_URI_ENV] = resolved.model_uri
    own = [item for item in container["env"] if item["name"] not in env]
    if variant.runtime == Runtime.BENTOML:
        ports = container["ports"]
    else:
        ports = [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            *container["ports"],  # `metrics`
        ]
    return {
        **container,
        "name": CONTAINER,
        "ports": ports,
        "env": own + [{"name": name, "value": value} for name, value in env.items()],
    }


def inference_service(
    settings: Settings, model_key: str, variant_name: str, resolved: ResolvedVersion, image: str
) -> dict[str, Any]:
    """The variant's InferenceService: no weight or shadow in it, so a weight edit never touches it."""
    model = settings.models[model_key]
    variant = model.variants[variant_name]
    pod = seldon.pod_spec(settings, model_key, variant, image, resolved.version)
    pod["containers"] = [serving_container(settings, model_key, variant_name, resolved, image)]
    account = service_account_name(settings)
    if account and not model.serving.bake:
        pod["serviceAccountName"] = account
    pod_labels = seldon.predictor_labels(model_key, model, variant_name, resolved)
    keda = settings.platform.autoscaler == "keda"
    predictor: dict[str, Any] = {
        **pod,
        "labels": pod_labels,
        "minReplicas": model.autoscaling.min_replicas,
        "maxReplicas": model.autoscaling.max_replicas,
    }
    if not keda:
        predictor["autoScaling"] = {"metrics": _hpa_metrics(settings, model_key)}
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {
            "name": isvc_name(model_key, variant_name),
            "namespace": settings.namespace,
            "labels": {**labels.common("model"), **pod_labels, VISIBILITY: "cluster-local"},
            "annotations": {
                **seldon.predictor_annotations(resolved, variant),
                DEPLOYMENT_MODE: "Standard",
                AUTOSCALER_CLASS: "external" if keda else "hpa",
            },
        },
        "spec": {"predictor": predictor},
    }


def _hpa_metrics(settings: Settings, model_key: str) -> list[dict[str, Any]]:
    scaling = settings.models[model_key].autoscaling
    targets = [("cpu", scaling.cpu_utilization), ("memory", scaling.memory_utilization)]
    return [
        {"type": "Resource", "resource": {"name": name, "target": {"type": "Utilization", "averageUtilization": v}}}
        for name, v in targets
        if v is not None
    ]


def scaled_object(settings: Settings, model_key: str, variant_name: str) -> dict[str, Any]:
    """The ScaledObject Seldon makes from its kedaSpec (the same triggers and HPA behaviour), on KServe's Deployment."""
    model = settings.models[model_key]
    keda = seldon.keda_spec(model.autoscaling, seldon.requests_trigger(settings, model_key, variant_name))
    target = predictor_name(model_key, variant_name)
    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": {"name": target, "namespace": settings.namespace, "labels": _owned(model_key, variant_name)},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}, **keda},
    }


def disruption_budget(settings: Settings, model_key: str, variant_name: str) -> dict[str, Any]:
    model = settings.models[model_key]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": predictor_name(model_key, variant_name),
            "namespace": settings.namespace,
            "labels": _owned(model_key, variant_name),
        },
        "spec": {
            "maxUnavailable": model.disruption_budget.max_unavailable,
            "selector": {"matchLabels": {labels.MODEL: model_key, labels.VARIANT: variant_name}},
        },
    }


def _owned(model_key: str, variant_name: str) -> dict[str, str]:
    return {**labels.common("model"), labels.MODEL: model_key, labels.VARIANT: variant_name}


# -- the routing object: weights and shadows ----------------------------------------------------------------------


def virtual_service(settings: Settings, model_key: str) -> dict[str, Any]:
    """Istio routes across the variants' predictor Services with the stack's weights (0 included, so a weight
    edit changes numbers only), and mirrors every request to each shadow."""
    model = settings.models[model_key]
    tls = settings.platform.tls
    route: dict[str, Any] = {
        "match": [{"uri": {"prefix": route_prefix(settings, model_key)}}],
        "rewrite": {"uri": "/"},
        "route": [
            {"destination": _destination(settings, model_key, name), "weight": variant.weight or 0}
            for name, variant in sorted(model.variants.items())  # by name: the engine hands config maps sorted
            if not variant.shadow
        ],
    }
    shadows = sorted(name for name, variant in model.variants.items() if variant.shadow)
    if shadows:
        route["mirrors"] = [
            {"destination": _destination(settings, model_key, name), "percentage": {"value": 100.0}} for name in shadows
        ]
    return {
        "apiVersion": ISTIO_GATEWAY_API,
        "kind": "VirtualService",
        "metadata": {
            "name": model_key,
            "namespace": settings.namespace,
            "labels": {**labels.common("model"), labels.MODEL: model_key},
        },
        "spec": {
            "hosts": list(tls.hosts) if tls else ["*"],
            "gateways": [settings.platform.gateway],
            "http": [route],
        },
    }


def _destination(settings: Settings, model_key: str, variant: str) -> dict[str, Any]:
    return {"host": predictor_host(settings, model_key, variant), "port": {"number": SERVICE_PORT}}


def traffic(virtual_service_obj: dict[str, Any]) -> dict[str, int]:
    """The weights a VirtualService holds, by variant (the inverse of `virtual_service`, for tests and tools)."""
    split: dict[str, int] = {}
    for destination in virtual_service_obj["spec"]["http"][0]["route"]:
        host = destination["destination"]["host"].split(".", 1)[0].removesuffix(PREDICTOR_SUFFIX)
        model_key = virtual_service_obj["metadata"]["name"]
        split[host.removeprefix(model_key + "-")] = int(destination.get("weight", 0))
    return split


def model_objects(
    settings: Settings, model_key: str, resolved: dict[str, ResolvedVersion], images: dict[str, str]
) -> list[dict[str, Any]]:
    """Every object the model needs under KServe: InferenceServices, ScaledObjects, PDBs, then the VirtualService."""
    model = settings.models[model_key]
    objects: list[dict[str, Any]] = []
    for name in model.variants:
        objects.append(inference_service(settings, model_key, name, resolved[name], images[name]))
        if settings.platform.autoscaler == "keda":
            objects.append(scaled_object(settings, model_key, name))
        objects.append(disruption_budget(settings, model_key, name))
    objects.append(virtual_service(settings, model_key))
    return objects
