"""What the serving image runs: MLServer with the MLflow runtime, behind request validation.

Nothing here imports Pulumi: the image carries only this package's `server` part and the model's requirements.
"""
