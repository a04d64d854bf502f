"""What the serving image runs: MLServer with the MLflow runtime, behind request validation.

Nothing here imports Pulumi: the image carries only this package's `server` part and the model's requirements.
"""

# The registry version the server answers as: the SeldonDeployment sets it per predictor (Seldon's own
# MLSERVER_MODEL_VERSION is always "v1"), `ml-serving serve` resolves it from the registry.
VERSION_ENV = "ML_SERVING_MODEL_VERSION"
