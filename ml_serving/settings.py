"""The stack config as one typed model: parsed once, validated whole, passed down as objects.

Every key under `ml-serving:` in `Pulumi.<stack>.yaml` maps to a field of `Settings`. Unknown keys,
impossible weights and bad names fail here, before any resource is declared, with an error that names
the stack file, the config path and the fix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    SecretStr,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from ml_serving import PROJECT
from ml_serving.configbase import (
    ConfigError,
    DnsLabel,
    ModelVersion,
    PathError,
    Quantity,
    decode,
    format_errors,
)
from ml_serving.configbase import (
    ConfigModel as _Config,
)
from ml_serving.poolsettings import GPU_TYPES, Gpu, GpuType, NodePool, PoolGpu, TimeSlicing  # noqa: F401
from ml_serving.runtimes import Runtime

Weight = Annotated[StrictInt, Field(ge=0, le=100)]


class Registry(_Config):
    tracking_uri: str = Field(min_length=1)


class Platform(_Config):
    """What the stack installs (`install`) and what the cluster already has (`existing`); `backend` is the
    operator that runs the model pods (README, 'Choosing a backend')."""

    backend: Literal["seldon", "kserve"] = "seldon"
    seldon: Literal["install", "existing"] = "install"
    keda: Literal["install", "existing"] = "install"
    istio_gateway: Literal["install", "existing"] = "install"
    autoscaler: Literal["keda", "hpa"] = "keda"
    gateway: str = Field(default="istio-system/seldon-gateway", pattern=r"^[a-z0-9-]+/[a-z0-9-]+$")
    tls: GatewayTls | None = None

    @property
    def gateway_namespace(self) -> str:
        """Where the gateway and Istio's ingress pods run: the first half of `gateway`."""
        return self.gateway.split("/")[0]


class GatewayTls(_Config):
    """HTTPS on the Istio gateway: a TLS Secret in the gateway's namespace (cert-manager's Certificate writes
    one), for these hosts; plain HTTP is redirected to HTTPS."""

    hosts: tuple[str, ...] = Field(min_length=1)
    credential_name: DnsLabel


class JwtIssuer(_Config):
    """The issuer whose JSON Web Tokens callers must present (Istio RequestAuthentication)."""

    issuer: str = Field(min_length=1)
    jwks_uri: str = Field(pattern=r"^https://")
    audiences: tuple[str, ...] = ()


class Security(_Config):
    """Who may reach the model pods: NetworkPolicies (where the CNI enforces them), mesh mTLS and access policy."""

    network_policies: StrictBool = True
    mtls: Literal["STRICT", "PERMISSIVE", "off"] = "STRICT"
    # The ingress gateway's service account, its mesh identity: istioctl's name by default; the Helm
    # `istio/gateway` chart names it after its release (e.g. `istio-ingressgateway`).
    gateway_service_account: DnsLabel = "istio-ingressgateway-service-account"
    trust_domain: str = "cluster.local"
    # Sidecar injection by revision (`istio.io/rev` on the namespace) instead of `istio-injection: enabled`.
    istio_revision: DnsLabel | None = None
    probe_cidrs: tuple[str, ...] = ()  # node ranges, for CNIs that do not exempt the kubelet's probes
    jwt: JwtIssuer | None = None


class KubernetesTarget(_Config):
    """Where the Kubernetes provider sends objects: the current kube context, or YAML files."""

    render_yaml_to_directory: str | None = None
    context: str | None = None


class ServingImage(_Config):
    """Where the per-model serving images go. Without `push`, images are built locally only.

    `build: false` is for teams whose CI builds images (`ml-serving image build`): the program computes the same
    content-addressed tag and expects the image to exist, so `pulumi up` needs no Docker engine.
    """

    repository: str = Field(default="ml-serving", pattern=r"^[a-z0-9]+([._/:-][a-z0-9]+)*$")
    build: StrictBool = True
    # pulumi-docker's provider, or the project's dynamic provider on the local engine (no plugin needed).
    builder: Literal["pulumi-docker", "dynamic"] = "pulumi-docker"
    push: StrictBool = False
    registry_server: str | None = None
    registry_username: str | None = None
    platform: str = "linux/amd64"


RCLONE_KEY = re.compile(r"^RCLONE_CONFIG_([A-Z0-9]+)_[A-Z0-9_]+$")


class ArtifactStore(_Config):
    """How Seldon's storage initializer (rclone) reaches the artifact store behind `s3://`, `gs://`, `wasbs://`
    model URIs: rclone's `RCLONE_CONFIG_<REMOTE>_*` variables from a Secret (an existing one, or one the stack
    creates from `rclone`), and/or a service account for IRSA / workload identity."""

    secret_name: DnsLabel | None = None
    rclone: dict[str, str] = {}
    service_account_name: DnsLabel | None = None

    @field_validator("rclone")
    @classmethod
    def _rclone_keys(cls, values: dict[str, str]) -> dict[str, str]:
        for key in values:
            if not RCLONE_KEY.match(key):
                raise ValueError(
                    f"{key!r} is not an rclone variable: use RCLONE_CONFIG_<REMOTE>_<OPTION>, e.g. "
                    "RCLONE_CONFIG_S3_TYPE"
                )
        return values

    @model_validator(mode="after")
    def _one_secret(self) -> ArtifactStore:
        if self.secret_name and self.rclone:
            raise ValueError("set secretName (an existing Secret) or rclone (the stack creates it), not both")
        if not (self.secret_name or self.rclone or self.service_account_name):
            raise ValueError("set secretName, rclone or serviceAccountName: how the models' storage is reached")
        return self

    def remotes(self) -> set[str] | None:
        """The rclone remotes the stack's own Secret defines (lowercase); None when the Secret is not ours."""
        if not self.rclone:
            return None
        return {match.group(1).lower() for match in map(RCLONE_KEY.match, self.rclone) if match}


class Serving(_Config):
    """Per-model overrides of the server settings files in serving_image/ (set as container env vars)."""

    bake: StrictBool = False
    parallel_workers: Annotated[StrictInt, Field(ge=0, le=64)] | None = None
    max_batch_size: Annotated[StrictInt, Field(ge=1, le=4096)] | None = None
    max_batch_time_seconds: Annotated[float, Field(ge=0, le=10)] | None = None
    max_body_bytes: Annotated[StrictInt, Field(ge=1024)] | None = None
    # BentoML only: a request's whole budget (queue + predict) before BentoML sheds it with 503 + Retry-After;
    # unset, BentoML's own default (60 s, its request timeout). Not MLServer's batch window (maxBatchTimeSeconds).
    max_latency_ms: Annotated[StrictInt, Field(ge=10, le=60_000)] | None = None


class Resources(_Config):
    cpu: Quantity = "250m"
    memory: Quantity = "512Mi"
    cpu_limit: Quantity | None = None
    memory_limit: Quantity | None = None


class ScaleUp(_Config):
    stabilization_window_seconds: Annotated[StrictInt, Field(ge=0, le=3600)] = 0
    max_pods_per_minute: Annotated[StrictInt, Field(ge=1)] = 4


class ScaleDown(_Config):
    stabilization_window_seconds: Annotated[StrictInt, Field(ge=0, le=3600)] = 300
    max_percent_per_minute: Annotated[StrictInt, Field(ge=1, le=100)] = 50


class Autoscaling(_Config):
    min_replicas: Annotated[StrictInt, Field(ge=1)] = 1
    max_replicas: Annotated[StrictInt, Field(ge=1)] = 3
    cpu_utilization: Annotated[StrictInt, Field(ge=1, le=100)] = 70
    memory_utilization: Annotated[StrictInt, Field(ge=1, le=100)] | None = None
    requests_per_second_per_replica: Annotated[float, Field(gt=0)] | None = None
    scale_up: ScaleUp = ScaleUp()
    scale_down: ScaleDown = ScaleDown()

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) is greater than maxReplicas ({self.max_replicas}): "
                "raise maxReplicas or lower minReplicas"
            )
        return self


class DisruptionBudget(_Config):
    max_unavailable: Annotated[StrictInt, Field(ge=0)] = 1


Duration = Annotated[str, Field(pattern=r"^([0-9]+(ms|s|m|h|d|w|y))+$")]


class AlertThresholds(_Config):
    """When the alerts fire; every alert waits `for` before firing, so a blip does not page anyone."""

    error_ratio: Annotated[float, Field(gt=0, le=1)] = 0.05
    latency_p95_seconds: Annotated[float, Field(gt=0)] = 0.5
    challenger_error_factor: Annotated[float, Field(ge=1)] = 2.0
    challenger_latency_factor: Annotated[float, Field(ge=1)] = 1.5
    for_: Duration = Field(default="5m", alias="for")
    window: Duration = "5m"


class Monitoring(_Config):
    """kube-prometheus-stack (or an existing Prometheus and Grafana), scraping, alerts and dashboards."""

    stack: Literal["install", "existing"] = "install"
    namespace: DnsLabel = "monitoring"
    prometheus_url: str = "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
    # The labels this Prometheus selects monitors and rules by (kube-prometheus-stack: its release name).
    selector_labels: dict[str, str] = {"release": "kube-prometheus-stack"}

    @field_validator("prometheus_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http:// or https:// URL, e.g. http://prometheus.monitoring.svc:9090")
        return url.rstrip("/")

    retention: Duration = "15d"
    storage_size: Quantity = "50Gi"
    scrape_interval: Duration = "30s"
    resources: Resources = Resources(cpu="500m", memory="2Gi")
    alerts: AlertThresholds = AlertThresholds()


def _devel_version(value: str) -> str:
    """A semver pre-release (`v1.0.0-devel`): a released version is never accepted in place of the pinned one."""
    if not re.fullmatch(r"v?[0-9]+\.[0-9]+\.[0-9]+-[0-9A-Za-z.-]+", value):
        raise ValueError(
            f"{value!r} is not a development version: develBuilds accepts only the pre-release version a chart's "
            "Chart.yaml says (e.g. v1.0.0-devel); a released chart must be the pinned version"
        )
    return value


DevelVersion = Annotated[str, AfterValidator(_devel_version)]


class Charts(_Config):
    """Where every Helm release's chart comes from, at the versions the stack pins: the public repositories (the
    default), a folder of unpacked charts (air-gapped clusters: `<folder>/<chart>-<version>/` or `<folder>/<chart>/`,
    each `Chart.yaml` at the pinned version), or a mirror the team runs (`oci://host/path` or an `https://` chart
    repository holding every chart)."""

    folder: str | None = Field(default=None, min_length=1)
    mirror: str | None = Field(default=None, pattern=r"^(oci|https?)://[^\s]+$")
    # false: create the charts' objects without waiting for their pods or running their hook Jobs (a cluster that
    # cannot run pods yet, like the engine tests' API server); true waits, and rolls a failed release back.
    wait: StrictBool = True
    # A folder chart taken from its source at the pinned tag, whose Chart.yaml says a development version (NVIDIA's
    # gpu-operator says v1.0.0-devel): chart name -> that exact version, accepted instead of the pin.
    devel_builds: dict[str, DevelVersion] = {}

    @model_validator(mode="after")
    def _one_source(self) -> Charts:
        if self.folder and self.mirror:
            raise ValueError("set folder (unpacked charts) or mirror (a chart repository), not both")
        if self.devel_builds and not self.folder:
            raise ValueError("develBuilds accepts charts of a folder: set folder too, or remove develBuilds")
        return self


class Variant(_Config):
    """One predictor: a model version picked by registry alias, or pinned, and its share of traffic."""

    alias: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    version: ModelVersion | None = None
    model_uri: str | None = Field(default=None, min_length=1)
    run_id: str | None = None
    pinned_from: str | None = None
    weight: Weight | None = None
    shadow: StrictBool = False
    gpu: Annotated[StrictInt, Field(ge=0, le=16)] = 0
    gpu_type: GpuType | None = None
    pool: str | None = None
    # The server: MLServer (the default) or BentoML; canary a runtime change like a model change.
    runtime: Runtime = Runtime.MLSERVER

    @model_validator(mode="after")
    def _choice(self) -> Variant:
        if (self.alias is None) == (self.version is None):
            raise ValueError(
                "set exactly one of 'alias' (e.g. alias: champion) or 'version' (e.g. version: \"3\")"
                + (", not both" if self.alias else "")
            )
        if self.alias is not None:
            for key in ("model_uri", "run_id", "pinned_from"):
                if getattr(self, key) is not None:
                    raise ValueError(f"'{to_camel(key)}' goes with a pinned 'version', not with 'alias'")
        if self.shadow and self.weight:
            raise ValueError("a shadow variant gets a mirror of all traffic: remove 'weight' or set shadow: false")
        if self.gpu_type and not self.gpu:
            raise ValueError(f"gpuType {self.gpu_type!r} needs 'gpu' (the number of GPUs, e.g. gpu: 1)")
        if self.runtime == Runtime.BENTOML and self.gpu:
            raise ValueError("the BentoML runtime has no CUDA image yet: use runtime: mlserver for GPU variants")
        if not self.shadow and self.weight is None:
            raise ValueError("set 'weight' (0-100; weights of non-shadow variants add up to 100) or shadow: true")
        return self

    @property
    def needs_registry(self) -> bool:
        return self.alias is not None or self.model_uri is None


class Rollout(_Config):
    """How `ml-serving rollout` moves traffic to a challenger, and what it takes to go on (Flagger-like gates)."""

    champion: DnsLabel = "champion"
    challenger: DnsLabel = "challenger"
    stages: tuple[Annotated[StrictInt, Field(ge=1, le=100)], ...] = (5, 10, 25, 50, 100)
    interval_seconds: Annotated[float, Field(gt=0)] = 60
    min_requests: Annotated[StrictInt, Field(ge=1)] = 50
    max_error_ratio: Annotated[float, Field(ge=0, le=1)] = 0.02
    max_p95_seconds: Annotated[float, Field(gt=0)] = 0.5
    max_error_ratio_vs_champion: Annotated[float, Field(ge=1)] = 2.0
    max_p95_vs_champion: Annotated[float, Field(ge=1)] = 1.5
    # A challenger answering 4xx to what the champion accepts (e.g. a signature needing a new column) shows no
    # server errors: its share of refused requests may exceed the champion's by at most this much.
    max_rejected_increase: Annotated[float, Field(ge=0, le=1)] = 0.02
    failure_threshold: Annotated[StrictInt, Field(ge=1)] = 1
    inconclusive_threshold: Annotated[StrictInt, Field(ge=1)] = 3
    on_inconclusive: Literal["rollback", "pause"] = "rollback"
    promote: Literal["config", "alias"] = "config"

    @field_validator("stages")
    @classmethod
    def _increasing(cls, stages: tuple[int, ...]) -> tuple[int, ...]:
        if not stages or list(stages) != sorted(set(stages)) or stages[-1] != 100:
            raise ValueError("stages must rise strictly and end at 100, e.g. [5, 10, 25, 50, 100]")
        return stages


class Model(_Config):
    registered_model: str = Field(min_length=1)
    resources: Resources = Resources()
    autoscaling: Autoscaling = Autoscaling()
    disruption_budget: DisruptionBudget = DisruptionBudget()
    serving: Serving = Serving()
    rollout: Rollout | None = None
    # Variants whose signatures refuse what the champion accepts are an error, unless this says it is deliberate.
    allow_breaking_signature: StrictBool = False
    variants: dict[DnsLabel, Variant] = Field(min_length=1)

    @field_validator("variants")
    @classmethod
    def _traffic(cls, variants: dict[str, Variant]) -> dict[str, Variant]:
        served = {name: v.weight or 0 for name, v in variants.items() if not v.shadow}
        if not served:
            raise ValueError("every variant is a shadow: give at least one variant a weight")
        total = sum(served.values())
        if total != 100:
            shares = ", ".join(f"{name}={w}" for name, w in served.items())
            raise ValueError(
                f"weights of non-shadow variants add up to {total}, not 100 ({shares}): change them to sum to 100"
            )
        return variants

    @model_validator(mode="after")
    def _rollout_variants(self) -> Model:
        if self.rollout is not None:
            for role in ("champion", "challenger"):
                name = getattr(self.rollout, role)
                if name not in self.variants or self.variants[name].shadow:
                    raise PathError(
                        f"rollout.{role}", f"{name!r} is not a weighted variant of this model: name one of its variants"
                    )
            if self.rollout.champion == self.rollout.challenger:
                raise PathError("rollout.challenger", "the challenger must differ from the champion")
        return self

    @property
    def champion(self) -> str:
        """The variant others are compared with: the rollout's champion, else the one serving most traffic."""
        if self.rollout is not None:
            return self.rollout.champion
        served = [(v.weight or 0, name) for name, v in self.variants.items() if not v.shadow]
        return max(served, key=lambda item: item[0])[1]

    def traffic_fingerprint(self) -> str:
        """A short hash of every variant's weight and shadow flag: exported by the program as a stack output, so
        the rollout can tell which weights the stack's last update deployed."""
        traffic = sorted((name, v.weight or 0, v.shadow) for name, v in self.variants.items())
        return hashlib.sha256(json.dumps(traffic).encode()).hexdigest()[:16]


class Settings(_Config):
    """The whole stack: `ml-serving:<key>` in `Pulumi.<stack>.yaml` for each field."""

    namespace: DnsLabel = "models"
    registry: Registry | None = None
    platform: Platform = Platform()
    kubernetes: KubernetesTarget = KubernetesTarget()
    serving_image: ServingImage = ServingImage()
    registry_password: SecretStr | None = None
    artifact_store: ArtifactStore | None = None
    security: Security = Security()
    gpu: Gpu = Gpu()
    charts: Charts = Charts()
    node_pools: dict[DnsLabel, NodePool] = {}
    monitoring: Monitoring | None = None
    grafana_admin_password: SecretStr | None = None
    models: dict[DnsLabel, Model] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.registry is None:
            for m, model in self.models.items():
                for v, variant in model.variants.items():
                    if variant.needs_registry:
                        raise PathError(
                            f"models.{m}.variants.{v}",
                            "needs the MLflow registry to find its version: set ml-serving:registry.trackingUri, "
                            "or pin 'version' and 'modelUri' (ml-serving pin STACK does it for you)",
                        )
        self._check_gpus()
        if self.monitoring and self.monitoring.stack == "install" and self.grafana_admin_password is None:
            raise PathError(
                "grafanaAdminPassword",
                "installing Grafana needs an admin password: "
                "pulumi config set --secret ml-serving:grafanaAdminPassword",
            )
        for name, model in self.models.items():
            if model.autoscaling.requests_per_second_per_replica and self.monitoring is None:
                raise PathError(
                    f"models.{name}.autoscaling.requestsPerSecondPerReplica",
                    "scaling on requests needs Prometheus: add ml-serving:monitoring",
                )
        # A provider that renders YAML cannot install the stack's charts: specs/charts.check_renderable refuses it.
        image = self.serving_image
        if image.push and image.registry_server and not (image.registry_username and self.registry_password):
            raise PathError(
                "servingImage.registryUsername",
                "pushing to servingImage.registryServer needs registryUsername and the secret "
                "ml-serving:registryPassword (pulumi config set --secret ml-serving:registryPassword ...)",
            )
        if self.platform.backend == "kserve":
            self._check_kserve()
        if self.platform.autoscaler == "hpa":
            hpa = "Seldon's hpaSpec" if self.platform.backend == "seldon" else "KServe's HPA (v0.20)"
            for name, model in self.models.items():
                for key in sorted({"scale_up", "scale_down"} & model.autoscaling.model_fields_set):
                    raise PathError(
                        f"models.{name}.autoscaling.{to_camel(key)}",
                        f"{hpa} has no scaling behaviour: remove it, or use platform.autoscaler: keda",
                    )
        return self

    def _check_kserve(self) -> None:
        """What the kserve backend cannot do with this stack file, refused before anything is planned."""
        if "seldon" in self.platform.model_fields_set:
            raise PathError("platform.seldon", "the kserve backend runs no Seldon operator: remove platform.seldon")
        if self.platform.autoscaler == "hpa":
            for name, model in self.models.items():
                if model.autoscaling.requests_per_second_per_replica is not None:
                    raise PathError(
                        f"models.{name}.autoscaling.requestsPerSecondPerReplica",
                        "KServe's HPA scales on cpu and memory only: remove it, or use platform.autoscaler: keda",
                    )

    def pool_for(self, variant: Variant) -> str | None:
        """The pool a GPU variant lands on: the one it names, else the first GPU pool offering its GPU type."""
        if not variant.gpu:
            return None
        if variant.pool:
            return variant.pool
        for name, pool in self.node_pools.items():
            if pool.gpu is not None and (variant.gpu_type is None or variant.gpu_type in pool.gpu.types):
                return name
        return None

    def _check_gpus(self) -> None:
        """Every GPU variant has a pool that can host it, at its full scale; pools taint the key variants tolerate."""
        for name, pool in self.node_pools.items():
            if pool.gpu is not None and pool.taint_key not in (None, self.gpu.taint_key):
                raise PathError(
                    f"nodePools.{name}.taintKey",
                    f"{pool.taint_key!r} does not match gpu.taintKey {self.gpu.taint_key!r}, the key GPU variants "
                    "tolerate and the device plugin runs under: remove taintKey or make the two equal",
                )
        for m, model in self.models.items():
            for v, variant in model.variants.items():
                where = f"models.{m}.variants.{v}"
                pool = self.node_pools.get(variant.pool) if variant.pool else None
                if variant.pool and pool is None:
                    known = ", ".join(self.node_pools) or "none"
                    raise PathError(f"{where}.pool", f"no node pool {variant.pool!r} (pools: {known})")
                if not variant.gpu:
                    if pool is not None and pool.gpu is not None:
                        raise PathError(f"{where}.pool", f"{variant.pool!r} is a GPU pool: set gpu, or pick a CPU pool")
                    continue
                if pool is None:
                    pool_name = self.pool_for(variant)  # the one pool selection, as the specs place the variant
                    if pool_name is None:
                        wanted = f" with gpu.types including {variant.gpu_type!r}" if variant.gpu_type else ""
                        raise PathError(
                            f"{where}.gpu",
                            f"no GPU node pool can host this variant: add one under ml-serving:nodePools{wanted}",
                        )
                    pool = self.node_pools[pool_name]
                else:
                    pool_name = str(variant.pool)
                    if pool.gpu is None:
                        raise PathError(f"{where}.pool", f"{pool_name!r} has no GPUs: pick a GPU pool")
                    if variant.gpu_type and variant.gpu_type not in pool.gpu.types:
                        raise PathError(
                            f"{where}.gpuType",
                            f"pool {pool_name!r} offers {', '.join(pool.gpu.types)}, not {variant.gpu_type!r}",
                        )
                assert pool.gpu is not None
                needed = model.autoscaling.max_replicas * variant.gpu
                if needed > pool.gpu.schedulable:
                    raise PathError(
                        f"nodePools.{pool_name}.gpu.limit",
                        f"{pool.gpu.limit} GPUs{' (time-sliced)' if pool.gpu.time_slicing else ''} cannot hold "
                        f"{where} at maxReplicas {model.autoscaling.max_replicas} x gpu {variant.gpu} = {needed}: "
                        "raise the limit or lower maxReplicas",
                    )


def parse_settings(config: Mapping[str, Any], source: str) -> Settings:
    """Build `Settings` from `ml-serving:*` config values (objects may arrive as JSON strings).

    `source` names the stack file in errors. Keys of other namespaces (e.g. `kubernetes:context`) are ignored.
    """
    raw: dict[str, Any] = {}
    prefix = f"{PROJECT}:"
    for key, value in config.items():
        if not key.startswith(prefix):
            continue
        raw[key[len(prefix) :]] = decode(value)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source, Settings)) from None
