"""ml-serving: MLflow Model Registry to Seldon Core on Kubernetes, as a Pulumi program."""

PROJECT = "ml-serving"
