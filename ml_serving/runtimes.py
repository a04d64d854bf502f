"""The servers a variant can run on: the one owner of their names (stack file, CLI, image, specs, labels)."""

from enum import StrEnum


class Runtime(StrEnum):
    MLSERVER = "mlserver"  # MLServer with the MLflow runtime, behind the validation layer (the default)
    BENTOML = "bentoml"  # BentoML, same validation, REST and metrics on one port
