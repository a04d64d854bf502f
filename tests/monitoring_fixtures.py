"""Fixtures for the `pods` monitoring tests: prometheus-operator beside a node's API server, and the Prometheus it
generates running as a pod on that node (ml_serving/localprometheus.py), read through its HTTP API."""

from __future__ import annotations

import base64
import gzip
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
import yaml

from ml_serving.localnode import LocalNode
from ml_serving.localprometheus import PROMETHEUS_NAME, NodePrometheus, monitoring_missing
from ml_serving.settings import Settings
from tests.container_fixtures import missing


class RunningPrometheus(NodePrometheus):
    """The operator's Prometheus on the node, with what the tests read: its API, its generated configuration."""

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path> and return `data` (fails on an error status)."""
        answer = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        return self.api("query", query=promql)["result"]

    def generated_config(self) -> dict[str, Any]:
        """The configuration the operator wrote (Secret `prometheus-<name>`, key `prometheus.yaml.gz`)."""
        from kubernetes import client

        core = client.CoreV1Api(self.node.cluster.api_client())
        secret = core.read_namespaced_secret(f"prometheus-{PROMETHEUS_NAME}", self.namespace)
        return yaml.safe_load(gzip.decompress(base64.b64decode(secret.data["prometheus.yaml.gz"])))

    def rule_files(self) -> dict[str, Any]:
        """The rule files the operator wrote (ConfigMaps `prometheus-<name>-rulefiles-N`), parsed, by file name."""
        from kubernetes import client

        core = client.CoreV1Api(self.node.cluster.api_client())
        found = {}
        for config_map in core.list_namespaced_config_map(self.namespace).items:
            if config_map.metadata.name.startswith(f"prometheus-{PROMETHEUS_NAME}-rulefiles-"):
                found.update({name: yaml.safe_load(text) for name, text in (config_map.data or {}).items()})
        return found


@contextmanager
def operator_prometheus(node: LocalNode, settings: Settings) -> Iterator[RunningPrometheus]:
    """The operator's Prometheus for `settings`' monitoring stack on `node`; fails under ML_SERVING_REQUIRE_ENGINE
    (else skips) when the operator, its reloader, Prometheus or socat is missing."""
    problems = monitoring_missing(node.bin_dir)
    if problems:
        missing("the operator's Prometheus cannot run here:\n  " + "\n  ".join(problems))
    running = RunningPrometheus(node, settings).start()
    try:
        yield running
    finally:
        running.stop()
