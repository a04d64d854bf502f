"""What the serving image runs: MLServer with the MLflow runtime, behind request validation.

Nothing here imports Pulumi: the image carries only this package's `server` part and the model's requirements.
"""

# The registry version the server answers as: the SeldonDeployment sets it per predictor (Seldon's own
# MLSERVER_MODEL_VERSION is always "v1"), `ml-serving serve` resolves it from the registry.
VERSION_ENV = "ML_SERVING_MODEL_VERSION"

# Requests refused as the client's mistake, by `reason` (validation.Refusal: a bounded set, never request data).
# metrics.py reads the name from here for the dashboard.
REFUSALS_METRIC = "ml_serving_request_refusals_total"
