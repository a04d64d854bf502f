"""What the serving image runs: MLServer with the MLflow runtime, behind request validation.

Nothing here imports Pulumi: the image carries only this package's `server` part and the model's requirements.
"""

import gc

# The registry version the server answers as: the SeldonDeployment sets it per predictor (Seldon's own
# MLSERVER_MODEL_VERSION is always "v1"), `ml-serving serve` resolves it from the registry.
VERSION_ENV = "ML_SERVING_MODEL_VERSION"
MAX_LATENCY_ENV = "ML_SERVING_MAX_LATENCY_MS"  # the BentoML runtime's latency budget (serving.maxLatencyMs)

# Requests refused as the client's mistake, by `reason` (validation.Refusal: a bounded set, never request data).
# metrics.py reads the name from here for the dashboard.
REFUSALS_METRIC = "ml_serving_request_refusals_total"
# The BentoML runtime's histogram of batch sizes (the name BentoML gives its own), read by ml_serving.metrics.
BENTOML_BATCH_SIZE = "bentoml_service_adaptive_batch_size"

# The inference routes, as MLServer's REST app names them in its request metrics' `path` label (route templates):
# the validation layer records requests under them, and metrics.py's queries select them.
INFER_ROUTE = "/v2/models/{model_name}/infer"
VERSION_INFER_ROUTE = "/v2/models/{model_name}/versions/{model_version}/infer"
INVOCATIONS_ROUTE = "/invocations"
INFERENCE_ROUTES = (INFER_ROUTE, VERSION_INFER_ROUTE, INVOCATIONS_ROUTE)

# Request latency histogram bounds (seconds) of both runtimes, so that a p95 compared across them is read off the
# same bounds. histogram_quantile interpolates inside a bucket: from 10 ms to 1 s neighbouring bounds are at most
# 1.33x apart, finer than the rollout's default p95 gate (1.5x the champion's); prometheus_client's defaults are
# 2-2.5x apart there, so a few samples of a window crossing a bound could move a p95 by nearly what the gate allows.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125,
    0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# The collector's thresholds once the heap is frozen (Python's defaults: 700, 10, 10); see freeze_heap.
GC_THRESHOLDS = (50_000, 20, 100)


def freeze_heap() -> None:
    """Take everything alive now (the imports, the loaded model) out of the garbage collector's reach.

    A full collection otherwise walks the whole MLflow/pandas/scikit-learn heap, stalls every request in flight
    and frees nothing: it was the p99 tail at 32 connections (figures: README, "Benchmarks"). Called once the
    model is loaded, in every process that serves it. Then the collector runs less often (GC_THRESHOLDS): what it
    can still see are the objects of the requests in flight, which reference counting frees anyway.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
