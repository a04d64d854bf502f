"""The local Prometheus's objects and images (ml_serving/localprometheus.py), without a node: fast."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from ml_serving import localprometheus
from ml_serving.plan import Plan
from ml_serving.stackfile import parse_settings
from tests.conftest import stack_config


def matches(selector: dict, obj_labels: dict) -> bool:
    return all(obj_labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_the_prometheus_selects_the_stack_monitors_and_rules_by_its_selector_labels(prod: Plan) -> None:
    settings = parse_settings(stack_config("prod"), "Pulumi.prod.yaml")
    spec = localprometheus.prometheus_object(settings, "img", "v2.42.0", "https://10.244.1.1:6443")["spec"]
    monitors, rules = prod.find("PodMonitor"), prod.find("PrometheusRule")
    assert monitors and rules
    assert all(matches(spec["podMonitorSelector"], m["metadata"]["labels"]) for m in monitors)
    assert all(matches(spec["ruleSelector"], r["metadata"]["labels"]) for r in rules)
    assert spec["podMonitorSelector"]["matchLabels"] == settings.monitoring.selector_labels
    assert spec["podMonitorNamespaceSelector"] == spec["ruleNamespaceSelector"] == {}  # every namespace
    token = spec["apiserverConfig"]["authorization"]["credentialsFile"]
    assert token == f"{localprometheus.SECRETS_DIR}/{localprometheus.TOKEN_SECRET}/token"
    assert spec["secrets"] == [localprometheus.TOKEN_SECRET]


def test_prometheus_may_only_read_what_discovery_needs() -> None:
    (role,) = [o for o in localprometheus.discovery_access("monitoring") if o["kind"] == "ClusterRole"]
    verbs = {verb for rule in role["rules"] for verb in rule["verbs"]}
    assert verbs == {"get", "list", "watch"}
    assert {r for rule in role["rules"] for r in rule["resources"]} == {
        "pods",
        "services",
        "endpoints",
        "endpointslices",
    }


def test_the_prometheus_image_carries_the_binary_and_the_libraries_it_links(tmp_path: Path) -> None:
    binary = Path("/bin/ls")  # a dynamically linked binary: its libraries must come along
    archive = localprometheus.prometheus_image(tmp_path, "localhost/ml-serving/prometheus:v3", binary)
    with tarfile.open(archive) as outer:
        index = json.load(outer.extractfile("index.json"))
        manifest_digest = index["manifests"][0]["digest"].split(":")[1]
        manifest = json.load(outer.extractfile(f"blobs/sha256/{manifest_digest}"))
        layer = outer.extractfile(f"blobs/sha256/{manifest['layers'][0]['digest'].split(':')[1]}")
        with tarfile.open(fileobj=layer) as files:
            names = set(files.getnames())
    libraries = {str(p).lstrip("/") for p in localprometheus.linked_libraries(binary)}
    assert libraries and {"bin/prometheus", *libraries} <= names
    # every folder is in the layer too (a runtime need not invent parents)
    assert {parent for name in libraries for parent in map(str, Path(name).parents)} - {"."} <= names
