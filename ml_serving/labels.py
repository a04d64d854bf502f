"""The label and annotation keys that carry model, variant and version from config to pods to Prometheus."""

from __future__ import annotations

import re

DOMAIN = "ml-serving.io"
MODEL = f"{DOMAIN}/model"
VARIANT = f"{DOMAIN}/variant"
MODEL_VERSION = f"{DOMAIN}/model-version"
REGISTERED_MODEL = f"{DOMAIN}/registered-model"
POOL = f"{DOMAIN}/pool"
RUNTIME = f"{DOMAIN}/runtime"  # mlserver or bentoml: which server, so the PodMonitor scrapes the right port

RUN_ID = f"{DOMAIN}/run-id"
MODEL_URI = f"{DOMAIN}/model-uri"
RESOLVED_FROM = f"{DOMAIN}/resolved-from"

MANAGED = {"app.kubernetes.io/managed-by": "pulumi", "app.kubernetes.io/part-of": "ml-serving"}

_INVALID = re.compile(r"[^A-Za-z0-9_.-]+")


def label_value(text: str) -> str:
    """A registry name made safe for a label value (<= 63 chars, alphanumeric at both ends)."""
    return _INVALID.sub("-", text)[:63].strip("-_.")


def common(component: str) -> dict[str, str]:
    return {**MANAGED, "app.kubernetes.io/component": component}
