"""Validate emitted objects the way a strict API server would: built-in kinds and the upstream CRDs."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from ml_serving import localcluster
from ml_serving.plan import revealed

KUBERNETES_VERSION = "1.31.0"
CRD_DIR = Path(__file__).resolve().parents[2] / "shared" / "crds"  # and the project's own crds/


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → openAPIV3Schema for every CRD version in ../shared/crds/."""
    schemas = {}
    for path in localcluster.crd_files(CRD_DIR):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Unknown fields in a custom resource are silently pruned by the API server: treat them as errors here."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                node.get("type") == "object"
                and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    # The API server always accepts these at the root (some CRDs leave them out) and checks metadata itself.
    root = schema.setdefault("properties", {})
    root.setdefault("apiVersion", {"type": "string"})
    root.setdefault("kind", {"type": "string"})
    root["metadata"] = {"type": "object"}
    return schema


def is_custom(obj: dict[str, Any]) -> bool:
    group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
    return "." in group and not group.endswith(".k8s.io")


def validate(obj: dict[str, Any]) -> None:
    """Raise if `obj` is not valid for its kind; custom kinds need their CRD in ../shared/crds/."""
    obj = revealed(obj)
    if is_custom(obj):
        schema = crd_schemas().get((obj["apiVersion"], obj["kind"]))
        if schema is None:
            raise AssertionError(f"no CRD schema for {obj['apiVersion']} {obj['kind']} in {CRD_DIR}")
        jsonschema.Draft7Validator(schema).validate(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
