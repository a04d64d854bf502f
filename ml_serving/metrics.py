"""Every metric name the serving image emits and every PromQL query the product uses: the only place with PromQL.

Alert rules, dashboards, the KEDA request-rate trigger and the rollout analysis all take their queries from here.
Names were read off a real scrape of the serving image's server (MLServer 1.7.1), not from docs. Two traps seen
there, and how this module avoids them:
- stock MLServer serves `/invocations` outside the `model_infer_*` counters; the serving image routes it through
  MLServer's data plane, but request rates are still built on `rest_server_requests_total`, which counts every
  request, valid or not, on both paths;
- a request for an unknown model name creates new `model=` series; the serving image answers those before
  MLServer, and no query groups by a label that request data can set: model, variant and version come from pod
  labels, relabelled by the PodMonitor into `ml_model`, `ml_variant`, `ml_model_version`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ml_serving.server import BENTOML_BATCH_SIZE, INFERENCE_ROUTES, REFUSALS_METRIC

# Prometheus labels carrying the stack file's names (from the pods' ml-serving.io/* labels).
MODEL = "ml_model"
VARIANT = "ml_variant"
MODEL_VERSION = "ml_model_version"
BY_VARIANT = f"{MODEL}, {VARIANT}"

# What the serving image exposes (MLServer 1.7.1 names, seen on its /metrics).
REQUESTS = "rest_server_requests_total"  # {method, path, status_code}
REQUEST_DURATION = "rest_server_request_duration_seconds"  # histogram {method, path, status_code}
IN_PROGRESS = "rest_server_requests_in_progress"  # gauge {method}
INFER_SUCCESS = "model_infer_request_success_total"  # {model, version}
INFER_FAILURE = "model_infer_request_failure_total"
BATCH_QUEUE = "batch_request_queue"  # histogram of the adaptive batcher's queue size
PARALLEL_QUEUE = "parallel_request_queue"  # histogram of the queue to the parallel workers
GRPC_HANDLED = "grpc_server_handled_total"
DCGM_GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"  # from NVIDIA's DCGM exporter, percent per GPU
REFUSALS = REFUSALS_METRIC  # the serving image's own counter {model, reason}
REASON = "reason"

INFERENCE_PATHS = "|".join(INFERENCE_ROUTES)
# A shed (503 + Retry-After, refusal reason `overloaded`): the server declined work over its latency budget. No
# inference route answers 503 otherwise, so the status alone tells a shed from a failure. Sheds are refusals, not
# server errors: the error ratio leaves them out, the refused share counts them.
SERVER_ERROR_STATUS = "5(0[0-24-9]|[1-9][0-9])"  # every 5xx but 503
REFUSED_STATUS = "4..|503"
DEFAULT_WINDOW = "1m"


@dataclass(frozen=True)
class Scope:
    """Which series a query looks at: all models, one model, or one variant of one model."""

    model: str | None = None
    variant: str | None = None
    namespace: str | None = None

    def matchers(self, *extra: str) -> str:
        parts = [f'{MODEL}!=""']
        if self.namespace:
            parts.append(f'namespace="{self.namespace}"')
        if self.model:
            parts.append(f'{MODEL}="{self.model}"')
        if self.variant:
            parts.append(f'{VARIANT}="{self.variant}"')
        return "{" + ", ".join([*parts, *extra]) + "}"


@dataclass(frozen=True)
class Server:
    """One runtime's names for the same facts: the request counter, latency histogram and in-flight gauge, the
    label carrying the route and the one carrying the HTTP status, and its inference routes."""

    requests: str
    duration: str
    in_progress: str
    route: str
    status: str
    inference_paths: str

    def inference(self, scope: Scope, status: str | None = None) -> str:
        extra = [f'{self.status}=~"{status}"'] if status else []
        return scope.matchers(f'{self.route}=~"{self.inference_paths}"', *extra)


MLSERVER = Server(REQUESTS, REQUEST_DURATION, IN_PROGRESS, "path", "status_code", INFERENCE_PATHS)
# BentoML 1.4 (read off a real /metrics of the BentoML image): the route is the request's own path.
BENTOML = Server(
    "bentoml_service_request_total",
    "bentoml_service_request_duration_seconds",
    "bentoml_service_request_in_progress",
    "endpoint",
    "http_response_code",
    "/v2/models/[^/]+/infer|/v2/models/[^/]+/versions/[^/]+/infer|/invocations",
)
SERVERS = (MLSERVER, BENTOML)


def _per_variant(series: Callable[[Server], str], by: str = BY_VARIANT, servers: tuple[Server, ...] = SERVERS) -> str:
    """`sum by (by) (series(server))` for every runtime, joined with `or`: each variant runs one runtime, so
    exactly one side has its series, and every query answers per variant whatever the runtime."""
    return "(" + " or ".join(f"sum by ({by}) ({series(server)})" for server in servers) + ")"


def request_rate(scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    """Inference requests per second (V2 and /invocations, any status), per variant."""
    return _per_variant(lambda s: f"rate({s.requests}{s.inference(scope)}[{window}])")


def requests_in_window(scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    """How many inference requests each variant got in `window`: enough to judge it, or not yet."""
    return _per_variant(lambda s: f"increase({s.requests}{s.inference(scope)}[{window}])")


def predictions_rate(scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    """Successful predictions per second, per variant (requests that reached the model, on any protocol)."""
    mlserver = f"sum by ({BY_VARIANT}) (rate({INFER_SUCCESS}{scope.matchers()}[{window}]))"
    bentoml = f"sum by ({BY_VARIANT}) (rate({BENTOML.requests}{BENTOML.inference(scope, '2..')}[{window}]))"
    return f"({mlserver} or {bentoml})"


def _status_rate(scope: Scope, window: str, status: str) -> str:
    return _per_variant(lambda s: f"rate({s.requests}{s.inference(scope, status)}[{window}])")


def server_errors_rate(scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    """Inference requests per second the server failed (5xx but a shed's 503); 0, not nothing, while there is
    traffic but no error."""
    return f"({_status_rate(scope, window, SERVER_ERROR_STATUS)} or {request_rate(scope, window)} * 0)"


def error_ratio(scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    """Share of inference requests the server failed: a client's 4xx is not the server's error. NaN without traffic."""
    return f"{server_errors_rate(scope, window)} / {request_rate(scope, window)}"


def rejected_ratio(scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    """Share of inference requests refused (4xx: the client's mistake; 503: shed over the latency budget): a
    challenger whose signature refuses what the champion accepts, or that sheds what the champion serves, shows
    here, not in the error ratio."""
    refused = _status_rate(scope, window, REFUSED_STATUS)
    return f"({refused} or {request_rate(scope, window)} * 0) / {request_rate(scope, window)}"


def refusals_by_reason(scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    """Requests refused as the client's mistake per second, by the check that refused them (missing column, wrong
    type, body too large…): a client integration that breaks after a release shows here by name."""
    return f"sum by ({BY_VARIANT}, {REASON}) (rate({REFUSALS}{scope.matchers()}[{window}]))"


def no_traffic(scope: Scope, window: str = DEFAULT_WINDOW) -> str:
    """True while the variant gets no requests, including while its request series do not exist at all."""
    rate = request_rate(scope, window)
    return f"({rate} == 0) or (absent({rate}))"


def replicas_below(scope: Scope, minimum: int) -> str:
    """True while fewer than `minimum` pods of the variant are scraped, including none at all."""
    return f"({replicas(scope)} < {minimum}) or (absent({replicas(scope)}))"


def label_values(label: str) -> str:
    """Grafana's template-variable query: every value of `label` on the serving pods' scrape targets."""
    return f'label_values(up{{{MODEL}!=""}}, {label})'


def legend(label: str = VARIANT, *more: str) -> str:
    """Grafana's legend template naming each series by its labels."""
    return " ".join("{{" + name + "}}" for name in (label, *more))


def alert_label(label: str) -> str:
    """An alert annotation's reference to one of the series' labels."""
    return "{{ $labels." + label + " }}"


def latency_quantile(quantile: float, scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    """Request latency in seconds at `quantile`, per variant."""
    buckets = _per_variant(lambda s: f"rate({s.duration}_bucket{s.inference(scope)}[{window}])", f"{BY_VARIANT}, le")
    return f"histogram_quantile({quantile}, {buckets})"


def latency_p95(scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    return latency_quantile(0.95, scope, window)


def in_flight(scope: Scope = Scope()) -> str:
    """Requests being served right now, per variant."""
    mlserver = f"sum by ({BY_VARIANT}) ({IN_PROGRESS}{scope.matchers()})"
    bentoml = f"sum by ({BY_VARIANT}) ({BENTOML.in_progress}{BENTOML.inference(scope)})"
    return f"({mlserver} or {bentoml})"


def batch_queue(scope: Scope = Scope(), window: str = DEFAULT_WINDOW) -> str:
    """Mean size of the adaptive batcher's queue (MLServer) or of the batches it formed (BentoML), per variant."""

    def mean(histogram: str) -> str:
        sum_ = f"rate({histogram}_sum{scope.matchers()}[{window}])"
        count = f"rate({histogram}_count{scope.matchers()}[{window}])"
        return f"sum by ({BY_VARIANT}) ({sum_}) / sum by ({BY_VARIANT}) ({count})"

    return f"({mean(BATCH_QUEUE)} or {mean(BENTOML_BATCH_SIZE)})"


def replicas(scope: Scope = Scope()) -> str:
    """Serving pods whose every scrape target is up, per variant: counted by pod, so a second target in a pod
    (Seldon's executor also names a port `metrics`) can never make one pod count twice."""
    pods = f"min by ({BY_VARIANT}, namespace, pod) (up{scope.matchers()})"
    return f"count by ({BY_VARIANT}) ({pods} == 1)"


def restarts(scope: Scope = Scope(), window: str = "15m") -> str:
    """Serving processes that restarted within `window`: a restart resets the request counters."""
    return _per_variant(lambda s: f"resets({s.requests}{scope.matchers()}[{window}])")


def observed_share(model: str, served: list[str], window: str = DEFAULT_WINDOW) -> str:
    """Each served variant's share of the model's traffic, in percent (shadows, which get copies, left out); the
    total sums the variants, whatever runtime each one runs."""
    served_matcher = f'{VARIANT}=~"{"|".join(served)}"'
    rates = _per_variant(
        lambda s: f"rate({s.requests}{s.inference(Scope(model=model)).rstrip('}')}, {served_matcher}}}[{window}])"
    )
    return f"100 * {rates} / ignoring({VARIANT}) group_left sum by ({MODEL}) ({rates})"


def configured_value(model: str, variant: str, value: float) -> str:
    """A configured number (weight, replica bound) as a series, to draw next to what is observed."""
    return (
        f'label_replace(label_replace(vector({value}), "{MODEL}", "{model}", "", ""), "{VARIANT}", "{variant}", "", "")'
    )


def relative_to(
    query_of: Callable[[Scope, str], str], model: str, challenger: str, champion: str, window: str = DEFAULT_WINDOW
) -> str:
    """`query_of(challenger) / query_of(champion)`, matched on the model: how much worse the challenger is."""
    challenger_q = query_of(Scope(model=model, variant=challenger), window)
    champion_q = query_of(Scope(model=model, variant=champion), window)
    return f"({challenger_q}) / ignoring({VARIANT}) ({champion_q})"


def gpu_utilization(scope: Scope = Scope()) -> str:
    """Mean GPU utilisation (percent) per variant: DCGM's per-pod series joined to the serving pods' labels.

    Needs the DCGM exporter's ServiceMonitor with `honorLabels: true`, so its `namespace`/`pod` name the GPU's pod.
    """
    pods = f"max by (namespace, pod, {BY_VARIANT}) (up{scope.matchers()})"
    return f"avg by ({BY_VARIANT}) ({DCGM_GPU_UTIL} * on (namespace, pod) group_left({BY_VARIANT}) {pods})"


def scaling_request_rate(model: str, variant: str, window: str = DEFAULT_WINDOW, namespace: str | None = None) -> str:
    """One number for KEDA's prometheus trigger: the variant's inference requests per second across its pods, in
    its own namespace only (two stacks sharing a Prometheus must not scale on each other's traffic)."""
    return f"sum({request_rate(Scope(model=model, variant=variant, namespace=namespace), window)})"


ADAPTER_METRIC = "ml_serving_requests_per_second"


def adapter_rule(window: str = DEFAULT_WINDOW) -> dict[str, object]:
    """prometheus-adapter's rule exposing the per-pod request rate as a custom metric (for Seldon's hpaSpec).

    The same series, paths and window as `scaling_request_rate`, in the adapter's template language.
    """
    return {
        "seriesQuery": f'{REQUESTS}{{{MODEL}!="",namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{REQUESTS}$", "as": ADAPTER_METRIC},
        "metricsQuery": (
            f'sum by (<<.GroupBy>>) (rate(<<.Series>>{{<<.LabelMatchers>>, path=~"{INFERENCE_PATHS}"}}[{window}]))'
        ),
    }


def catalogue(model: str, champion: str, challengers: list[str], window: str = DEFAULT_WINDOW) -> dict[str, str]:
    """Every query the product runs for one model, by name: what a live check must see answered."""
    scope = Scope(model=model)
    queries = {
        "request_rate": request_rate(scope, window),
        "requests_in_window": requests_in_window(scope, window),
        "predictions_rate": predictions_rate(scope, window),
        "server_errors_rate": server_errors_rate(scope, window),
        "error_ratio": error_ratio(scope, window),
        "rejected_ratio": rejected_ratio(scope, window),
        "latency_p50": latency_quantile(0.5, scope, window),
        "latency_p95": latency_p95(scope, window),
        "latency_p99": latency_quantile(0.99, scope, window),
        "in_flight": in_flight(scope),
        "batch_queue": batch_queue(scope, window),
        "replicas": replicas(scope),
        "restarts": restarts(scope),
        "observed_share": observed_share(model, [champion, *challengers], window),
        "gpu_utilization": gpu_utilization(scope),
        "refusals_by_reason": refusals_by_reason(scope, window),
    }
    for challenger in challengers:
        queries[f"scaling_request_rate:{challenger}"] = scaling_request_rate(model, challenger, window)
        queries[f"error_ratio_vs_champion:{challenger}"] = relative_to(error_ratio, model, challenger, champion, window)
        queries[f"latency_p95_vs_champion:{challenger}"] = relative_to(latency_p95, model, challenger, champion, window)
    queries[f"scaling_request_rate:{champion}"] = scaling_request_rate(model, champion, window)
    return queries
