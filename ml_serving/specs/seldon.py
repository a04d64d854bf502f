"""The SeldonDeployment of one model: one predictor per variant, weights from config, autoscaled by Seldon.

Seldon Core v1 (operator v1.18.2) facts this builder relies on:
- a graph node without `implementation` is a custom server: Seldon runs the container named like the node as it
  is, adds `http`/`grpc` ports and sets `MLSERVER_HTTP_PORT`/`MLSERVER_GRPC_PORT`/`MLSERVER_MODEL_NAME`, plus
  `MLSERVER_METRICS_PORT`/`MLSERVER_METRICS_ENDPOINT` for a port named `metrics`, all of which the serving
  image honours; it keeps our probes;
- with a `modelUri`, its storage initializer downloads the model to `/mnt/models` and sets `MLSERVER_MODEL_URI`;
  a baked-in model has no `modelUri`, so no initializer runs;
- the operator owns the replica count unless a componentSpec has `kedaSpec` or `hpaSpec`, so autoscaling goes
  there and never into a separate HPA;
- predictor labels are copied onto the Deployments and pods it generates;
- `traffic` and `shadow` take effect through the Istio VirtualService it writes for the gateway we annotate;
- it injects its executor only without `seldon.io/no-engine`, and its storage initializer only when the pod
  template has no init container of that name; neither injected container can be given `capabilities.drop`
  (chart and `seldon-config` set only the executor's user), so Pod Security `restricted` would refuse the pod.
  Every predictor is therefore `no-engine` (the server answers the Open Inference Protocol itself) and declares
  the initializer itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ml_serving import labels, metrics
from ml_serving.image import BAKED_MODEL_PATH, BENTOML_PORT, METRICS_PORT, SERVING_UID
from ml_serving.registry import ResolvedVersion
from ml_serving.runtimes import Runtime
from ml_serving.server import MAX_LATENCY_ENV, VERSION_ENV
from ml_serving.settings import Autoscaling, Model, Settings, Variant
from ml_serving.specs import gpu

API_VERSION = "machinelearning.seldon.io/v1"
TMP_VOLUME = "tmp"
# The MLServer container's ports (Seldon Core v1.18.2: constants.FirstHttpPortNumber / FirstGrpcPortNumber, which
# it gives a custom server's container); under no-engine the predictor's Service and VirtualService route to them.
MODEL_PORTS = (9000, 9500)
ARTIFACT_SECRET = "ml-serving-artifact-store"  # the Secret the stack creates from artifactStore.rclone
NO_ENGINE = "seldon.io/no-engine"
# The storage initializer, as the operator would inject it (model_initializer_injector.go): its name, volume and
# mount path are what the operator looks for (it then injects nothing and only mounts the volume read-only into
# the model's container); the image and resources are the chart's `storageInitializer` values.
STORAGE_INITIALIZER_IMAGE = "seldonio/rclone-storage-initializer:1.18.2"
STORAGE_INITIALIZER_RESOURCES = {
    "requests": {"cpu": "100m", "memory": "100Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}
MODEL_MOUNT_PATH = "/mnt/models"
# Istio's proxy UID: its iptables rules let this UID's traffic out unredirected, so the initializer reaches the
# artifact store before the sidecar runs (istio.io, "Application requirements": init containers).
ISTIO_PROXY_UID = 1337
# Storage the rclone initializer reaches only with credentials; its remote is the URI's scheme (s3://b/p → s3:b/p).
CREDENTIAL_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "wasb", "wasbs", "abfs", "abfss", "azure", "oss"})


class StorageAccessError(ValueError):
    """A model URI Seldon's storage initializer cannot download with the stack's artifactStore."""


def storage_scheme(uri: str) -> str | None:
    """The scheme of `uri` when downloading it needs credentials, else None (file paths, http, baked models)."""
    scheme = urlsplit(uri).scheme.lower()
    return scheme if scheme in CREDENTIAL_SCHEMES else None


def artifact_secret_name(settings: Settings) -> str | None:
    store = settings.artifact_store
    if store is None:
        return None
    return store.secret_name or (ARTIFACT_SECRET if store.rclone else None)


def artifact_secret(settings: Settings) -> dict[str, Any] | None:
    """The Secret of rclone variables the stack creates (its values go in as a Pulumi secret), or None."""
    store = settings.artifact_store
    if store is None or not store.rclone:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": ARTIFACT_SECRET, "namespace": settings.namespace, "labels": labels.common("serving")},
        "type": "Opaque",
        "stringData": dict(store.rclone),
    }


def storage_access(settings: Settings, model_uri: str) -> tuple[str | None, str | None]:
    """What hands the storage initializer its credentials: the env Secret's name and the pod's service account
    (which carries the IRSA / workload-identity role; the graph's own `serviceAccountName` reaches no pod)."""
    store = settings.artifact_store
    if store is None or storage_scheme(model_uri) is None:
        return None, None
    return artifact_secret_name(settings), store.service_account_name


def storage_initializer(settings: Settings, model_key: str, model_uri: str) -> dict[str, Any]:
    """Seldon's rclone initializer, declared so it can pass Pod Security `restricted` and reach the artifact store
    under an Istio sidecar: as the proxy's UID, whose traffic Istio never redirects (seldon-core#3330, #4450)."""
    secret, _ = storage_access(settings, model_uri)
    container: dict[str, Any] = {
        "name": initializer_name(model_key),
        "image": STORAGE_INITIALIZER_IMAGE,
        "args": [model_uri, MODEL_MOUNT_PATH],
        "resources": STORAGE_INITIALIZER_RESOURCES,
        "securityContext": {
            "runAsUser": ISTIO_PROXY_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "env": [{"name": "HOME", "value": "/tmp"}],
        "volumeMounts": [
            {"name": model_volume(model_key), "mountPath": MODEL_MOUNT_PATH},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ],
    }
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    return container


def initializer_name(model_key: str) -> str:
    return f"{model_key}-model-initializer"[:63].rstrip("-")


def model_volume(model_key: str) -> str:
    return f"{model_key}-provision-location"[:63].rstrip("-")


def check_storage_access(settings: Settings, resolved: Callable[[str, str], ResolvedVersion]) -> None:
    """Refuse, before anything is applied, a model URI whose storage needs credentials the stack does not give."""
    for model_key, model in settings.models.items():
        if model.serving.bake:
            continue  # the model is in the image: nothing is downloaded in the cluster
        for name in model.variants:
            uri = resolved(model_key, name).model_uri
            scheme = storage_scheme(uri)
            if scheme is None:
                continue
            where = f"ml-serving:models.{model_key}.variants.{name}"
            store = settings.artifact_store
            if store is None:
                raise StorageAccessError(
                    f"{where}: {uri} is downloaded by Seldon's storage initializer, which needs credentials for "
                    f"{scheme}://: set ml-serving:artifactStore (serviceAccountName for IRSA or workload identity, "
                    f"and rclone or secretName with RCLONE_CONFIG_{scheme.upper()}_* variables; README, "
                    "'Artifact store'), or bake the model into the image (serving.bake: true)"
                )
            remotes = store.remotes()
            if remotes is not None and scheme not in remotes:
                raise StorageAccessError(
                    f"ml-serving:artifactStore.rclone: defines no rclone remote '{scheme}' for {uri} ({where}): "
                    f"add RCLONE_CONFIG_{scheme.upper()}_TYPE and its options"
                )


def predictor_labels(model_key: str, model: Model, variant_name: str, resolved: ResolvedVersion) -> dict[str, str]:
    return {
        labels.MODEL: model_key,
        labels.VARIANT: variant_name,
        labels.MODEL_VERSION: labels.label_value(resolved.version),
        labels.REGISTERED_MODEL: labels.label_value(model.registered_model),
        labels.RUNTIME: str(model.variants[variant_name].runtime),
    }


def predictor_annotations(resolved: ResolvedVersion, variant: Variant) -> dict[str, str]:
    notes = {labels.MODEL_URI: resolved.model_uri, labels.RESOLVED_FROM: resolved.origin}
    if resolved.run_id:
        notes[labels.RUN_ID] = resolved.run_id
    # No Seldon executor in front of a one-model graph: both servers answer the Open Inference Protocol and export
    # the request metrics themselves, and the executor the operator injects could not pass Pod Security `restricted`.
    notes[NO_ENGINE] = "true"
    return notes


def serving_ports(runtime: str) -> tuple[int, ...]:
    """The container ports the operator's Services route to under no-engine: MLServer's http/grpc, BentoML's one."""
    return (BENTOML_PORT,) if runtime == Runtime.BENTOML else MODEL_PORTS


def scrape_port(runtime: str) -> int:
    """Where Prometheus scrapes a runtime's pods: MLServer's metrics port, BentoML's one port."""
    return BENTOML_PORT if runtime == Runtime.BENTOML else METRICS_PORT


def resources(model: Model, variant: Variant | None = None) -> dict[str, Any]:
    spec = model.resources
    requests: dict[str, Any] = {"cpu": spec.cpu, "memory": spec.memory}
    # A memory limit equal to the request keeps an over-eager model from starving its neighbours.
    limits: dict[str, Any] = {"cpu": spec.cpu_limit or spec.cpu, "memory": spec.memory_limit or spec.memory}
    if variant is not None and variant.gpu:
        requests[gpu.GPU_RESOURCE] = limits[gpu.GPU_RESOURCE] = variant.gpu
    return {"requests": requests, "limits": limits}


def serving_env(model: Model, version: str) -> list[dict[str, str]]:
    """Per-model overrides of serving_image/'s settings files (the image lets variables win over files), and the
    registry version the server answers as (Seldon's own MLSERVER_MODEL_VERSION is always "v1")."""
    serving = model.serving
    values = {
        VERSION_ENV: version,
        # The root filesystem is read-only: MLServer's metrics files and any cache go to the /tmp volume.
        "MLSERVER_METRICS_DIR": "/tmp/mlserver-metrics",
        "HOME": "/tmp",
        "MLSERVER_PARALLEL_WORKERS": serving.parallel_workers,
        "MLSERVER_MODEL_MAX_BATCH_SIZE": serving.max_batch_size,
        "MLSERVER_MODEL_MAX_BATCH_TIME": serving.max_batch_time_seconds,
        "ML_SERVING_MAX_BODY_BYTES": serving.max_body_bytes,
        MAX_LATENCY_ENV: serving.max_latency_ms,
        "MLSERVER_MODEL_URI": BAKED_MODEL_PATH if serving.bake else None,
    }
    return [{"name": name, "value": str(value)} for name, value in values.items() if value is not None]


def serving_container(model_key: str, model: Model, variant: Variant, image: str, version: str) -> dict[str, Any]:
    """The serving image's container, named like the graph node so Seldon runs it as the model.

    MLServer: Seldon adds its `http`/`grpc` ports and our `metrics` port gets the metrics. BentoML: one port named
    `http` on BentoML's (requests and /metrics), and httpGet probes on BentoML's /readyz and /livez (Seldon's
    defaults for a custom server are TCP probes, which pass before the model is loaded).
    """
    if variant.runtime == Runtime.BENTOML:
        ports = [{"name": "http", "containerPort": BENTOML_PORT, "protocol": "TCP"}]
        ready, live = "/readyz", "/livez"
    else:
        ports = [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
        ready, live = "/v2/health/ready", "/v2/health/live"
    return {
        "name": model_key,
        "image": image,
        "ports": ports,
        "resources": resources(model, variant),
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "readinessProbe": _probe(ready, period=5, failures=3, delay=5),
        "livenessProbe": _probe(live, period=10, failures=6, delay=30),
        # Loading a large model can take minutes: hold liveness off until the first success.
        "startupProbe": _probe(live, period=5, failures=60, delay=0),
        "env": serving_env(model, version),
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
    }


def _probe(path: str, period: int, failures: int, delay: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "initialDelaySeconds": delay,
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def pod_spec(
    settings: Settings, model_key: str, variant: Variant, image: str, version: str, model_uri: str | None = None
) -> dict[str, Any]:
    """The pod template; with `model_uri` (a model downloaded at start) the storage initializer and its volume,
    and the artifact store's service account on the pod, where IRSA's token reaches rclone."""
    model = settings.models[model_key]
    spec: dict[str, Any] = {
        **gpu.scheduling(settings, variant),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SERVING_UID,
            "runAsGroup": SERVING_UID,
            "fsGroup": SERVING_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # The model needs no Kubernetes API: no token in the pod (an IRSA token is projected apart from it).
        "automountServiceAccountToken": False,
        "containers": [serving_container(model_key, model, variant, image, version)],
        "volumes": [{"name": TMP_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "256Mi"}}],
    }
    if model_uri is not None:
        _, account = storage_access(settings, model_uri)
        if account:
            spec["serviceAccountName"] = account
        spec["initContainers"] = [storage_initializer(settings, model_key, model_uri)]
        spec["volumes"].append({"name": model_volume(model_key), "emptyDir": {}})
    return spec


def keda_spec(autoscaling: Autoscaling, requests_trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    """KEDA cpu/memory (and request-rate) triggers and HPA behaviour; Seldon creates the ScaledObject from it."""
    triggers = [{"type": "cpu", "metricType": "Utilization", "metadata": {"value": str(autoscaling.cpu_utilization)}}]
    if autoscaling.memory_utilization is not None:
        triggers.append(
            {"type": "memory", "metricType": "Utilization", "metadata": {"value": str(autoscaling.memory_utilization)}}
        )
    if requests_trigger is not None:
        triggers.append(requests_trigger)
    return {
        "minReplicaCount": autoscaling.min_replicas,
        "maxReplicaCount": autoscaling.max_replicas,
        "pollingInterval": 15,
        "triggers": triggers,
        "advanced": {"horizontalPodAutoscalerConfig": {"behavior": scaling_behavior(autoscaling)}},
    }


def scaling_behavior(autoscaling: Autoscaling) -> dict[str, Any]:
    up, down = autoscaling.scale_up, autoscaling.scale_down
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": up.stabilization_window_seconds,
            "policies": [{"type": "Pods", "value": up.max_pods_per_minute, "periodSeconds": 60}],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": down.stabilization_window_seconds,
            "policies": [{"type": "Percent", "value": down.max_percent_per_minute, "periodSeconds": 60}],
        },
    }


def hpa_spec(autoscaling: Autoscaling, with_adapter: bool = False) -> dict[str, Any]:
    """The fallback without KEDA. Seldon's hpaSpec has no `behavior`: scaling speed is the cluster default.

    The request rate comes from prometheus-adapter (installed with monitoring) as a per-pod custom metric.
    """
    rules = [_resource_metric("cpu", autoscaling.cpu_utilization)]
    if autoscaling.memory_utilization is not None:
        rules.append(_resource_metric("memory", autoscaling.memory_utilization))
    if with_adapter and autoscaling.requests_per_second_per_replica is not None:
        target = f"{autoscaling.requests_per_second_per_replica:g}"
        rules.append({"type": "Pods", "pods": {"metricName": metrics.ADAPTER_METRIC, "targetAverageValue": target}})
    return {"minReplicas": autoscaling.min_replicas, "maxReplicas": autoscaling.max_replicas, "metrics": rules}


def _resource_metric(name: str, utilization: int) -> dict[str, Any]:
    return {"type": "Resource", "resource": {"name": name, "targetAverageUtilization": utilization}}


def requests_trigger(settings: Settings, model_key: str, variant_name: str) -> dict[str, Any] | None:
    """KEDA's prometheus trigger on the variant's request rate, the query owned by the metrics module."""
    per_replica = settings.models[model_key].autoscaling.requests_per_second_per_replica
    if per_replica is None or settings.monitoring is None:
        return None
    return {
        "type": "prometheus",
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": settings.monitoring.prometheus_url,
            "query": metrics.scaling_request_rate(model_key, variant_name, namespace=settings.namespace),
            "threshold": f"{per_replica:g}",
        },
    }


def component_spec(
    settings: Settings, model_key: str, variant_name: str, image: str, version: str, model_uri: str | None = None
) -> dict[str, Any]:
    variant = settings.models[model_key].variants[variant_name]
    model = settings.models[model_key]
    spec: dict[str, Any] = {
        "spec": pod_spec(settings, model_key, variant, image, version, model_uri),
        "pdbSpec": {"maxUnavailable": model.disruption_budget.max_unavailable},
    }
    if settings.platform.autoscaler == "keda":
        spec["kedaSpec"] = keda_spec(model.autoscaling, requests_trigger(settings, model_key, variant_name))
    else:
        spec["hpaSpec"] = hpa_spec(model.autoscaling, settings.monitoring is not None)
    return spec


def predictor(
    settings: Settings, model_key: str, name: str, variant: Variant, resolved: ResolvedVersion, image: str
) -> dict[str, Any]:
    model = settings.models[model_key]
    graph: dict[str, Any] = {"name": model_key, "type": "MODEL", "children": []}
    downloaded = None if model.serving.bake else resolved.model_uri
    if downloaded is not None:
        graph["modelUri"] = downloaded  # the operator sets MLSERVER_MODEL_URI to the initializer's folder
    spec: dict[str, Any] = {
        "name": name,
        "labels": predictor_labels(model_key, model, name, resolved),
        "annotations": predictor_annotations(resolved, variant),
        "graph": graph,
        "componentSpecs": [component_spec(settings, model_key, name, image, resolved.version, downloaded)],
    }
    if variant.shadow:
        spec["shadow"] = True
    else:
        spec["traffic"] = variant.weight
    return spec


def seldon_deployment(
    settings: Settings, model_key: str, resolved: dict[str, ResolvedVersion], images: dict[str, str]
) -> dict[str, Any]:
    """The SeldonDeployment for `settings.models[model_key]`; `resolved` and `images` are keyed by variant."""
    model = settings.models[model_key]
    return {
        "apiVersion": API_VERSION,
        "kind": "SeldonDeployment",
        "metadata": {
            "name": model_key,
            "namespace": settings.namespace,
            "labels": {**labels.common("model"), labels.MODEL: model_key},
            "annotations": {"seldon.io/istio-gateway": settings.platform.gateway},
        },
        "spec": {
            "name": model_key,
            "protocol": "v2",
            "predictors": [
                predictor(settings, model_key, name, variant, resolved[name], images[name])
                for name, variant in model.variants.items()
            ],
        },
    }
