"""Monitoring on real pods (marker `pods`, issue 25 item 5): prometheus-operator turns the dev stack's PodMonitor and
PrometheusRule into Prometheus's configuration, Prometheus runs as the StatefulSet the operator generates on the
node, scrapes the operator's dev model pods once each with their model/variant/version labels, and evaluates the
stack's alert rules on those pods' series."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from ml_serving import labels, metrics
from ml_serving.devserve import load_serving_image
from ml_serving.localnode import LocalNode
from ml_serving.localoperator import LocalOperator
from ml_serving.localprometheus import apply_object
from ml_serving.metrics import Scope
from ml_serving.nodeimages import initializer_image, seldon_images
from ml_serving.plan import revealed, run_program
from tests.conftest import PROJECT_DIR, LocalRegistry
from tests.monitoring_fixtures import RunningPrometheus, operator_prometheus
from tests.node_fixtures import crd_node  # noqa: F401  (the module's node, with the CRDs)
from tests.operator_fixtures import Reconciled
from tests.test_node import poll
from tests.test_pods_serving import (  # noqa: F401  (module fixtures: the Seldon operator and the S3 store)
    champion,
    dev_on_store,
    docker_engine,
    operator,
    operator_pods,
    serving_container,
    stack_ready_pods,
    store,
)
from tests.test_serving import ROWS

pytestmark = pytest.mark.pods

SCRAPE_INTERVAL = "2s"  # dev's scrape interval here, so a rate has two samples within seconds


@dataclass
class MonitoredDev:
    """dev's plan applied to the node's API server (its monitors and rules too), as the operator reconciled it."""

    stack: Reconciled
    sdep: dict[str, Any]
    model_key: str
    folder: Path  # the model's artifacts in the registry (what the store serves)

    @property
    def name(self) -> str:
        return self.sdep["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.stack.namespace


@pytest.fixture(scope="module")
def monitored_dev(
    crd_node: LocalNode,  # noqa: F811
    operator: LocalOperator,  # noqa: F811
    store: Any,  # noqa: F811
    registry: LocalRegistry,
    docker_engine: Any,  # noqa: F811
) -> MonitoredDev:
    """dev on the node (model on the S3 store) with its PodMonitor and PrometheusRule applied, as `up dev` makes
    them; scraped every 2 s. The images are in the node before any pod asks for them: a pod that found its image
    missing waits out the kubelet's pull back-off (up to 5 min) after the image arrives."""
    config = dev_on_store(registry, store)
    config["ml-serving:monitoring"] = {**config["ml-serving:monitoring"], "scrapeInterval": SCRAPE_INTERVAL}
    images = seldon_images(operator.env, operator.config_map)
    crd_node.import_image(initializer_image(crd_node.bin_dir, crd_node.root / "images", images.initializer))
    (planned,) = [revealed(s) for s in run_program(PROJECT_DIR, "dev", config=config).find("SeldonDeployment")]
    started = time.monotonic()
    load_serving_image(crd_node, serving_container(planned)["image"], champion(registry)[1])
    print(f"serving image built (cached) and loaded into the node: {time.monotonic() - started:.0f} s")
    stack = Reconciled(crd_node.cluster, operator, config, "dev")
    for kind in ("PodMonitor", "PrometheusRule"):
        for obj in stack.plan.find(kind):
            apply_object(crd_node.cluster.api_client(), revealed(obj))
    (sdep,) = [revealed(s) for s in stack.plan.find("SeldonDeployment")]
    (model_key,) = stack.settings.models
    return MonitoredDev(stack, sdep, model_key, champion(registry)[1])


@pytest.fixture(scope="module")
def prometheus(crd_node: LocalNode, monitored_dev: MonitoredDev) -> Any:  # noqa: F811
    with operator_prometheus(crd_node, monitored_dev.stack.settings) as running:
        print(f"Prometheus object -> its pod Ready: {time.monotonic() - running.created:.1f} s")
        yield running


def pod_monitor(stack: MonitoredDev) -> dict[str, Any]:
    (monitor,) = [revealed(o) for o in stack.stack.plan.find("PodMonitor")]
    return monitor


def rule_groups(stack: MonitoredDev) -> list[dict[str, Any]]:
    (rule,) = [revealed(o) for o in stack.stack.plan.find("PrometheusRule")]
    return rule["spec"]["groups"]


def job_prefix(monitor: dict[str, Any]) -> str:
    """How prometheus-operator names a PodMonitor's scrape jobs: podMonitor/<namespace>/<name>/<endpoint index>."""
    return f"podMonitor/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/"


def test_the_operator_writes_one_scrape_job_per_pod_monitor_endpoint_and_the_stack_rules(
    prometheus: RunningPrometheus, monitored_dev: MonitoredDev
) -> None:
    monitor = pod_monitor(monitored_dev)
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    expected = [f"{job_prefix(monitor)}{i}" for i in range(len(endpoints))]
    config = prometheus.generated_config()
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert sorted(jobs) == sorted(expected)
    for job, endpoint in zip(sorted(config["scrape_configs"], key=lambda j: j["job_name"]), endpoints, strict=True):
        (discovery,) = job["kubernetes_sd_configs"]
        assert discovery["role"] == "pod"
        assert discovery["namespaces"]["names"] == [monitored_dev.stack.namespace]
        assert job["metrics_path"] == endpoint["path"]
    # the rule files hold the stack's groups, one per model
    files = prometheus.rule_files()
    assert sorted(g["name"] for f in files.values() for g in f["groups"]) == sorted(
        g["name"] for g in rule_groups(monitored_dev)
    )

    # and the Prometheus in the pod runs exactly that configuration (the config reloader put it there)
    def loaded() -> list[str]:
        import yaml

        live = yaml.safe_load(prometheus.api("status/config")["yaml"])
        names = sorted(j["job_name"] for j in live.get("scrape_configs") or [])
        return names if names == sorted(expected) else []

    poll(loaded, "the generated scrape jobs in the running Prometheus", seconds=60)


def evaluated_rules(prometheus: RunningPrometheus, groups: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The stack's rule groups as Prometheus reports them, once each rule has been evaluated at least once."""
    wanted = {g["name"] for g in groups}
    found = {g["name"]: g["rules"] for g in prometheus.api("rules")["groups"] if g["name"] in wanted}
    if set(found) != wanted:
        return {}
    if any(r.get("lastEvaluation", "0001").startswith("0001") for rules in found.values() for r in rules):
        return {}
    return found


def test_the_stack_alert_rules_evaluate_without_error_in_the_operator_prometheus(
    prometheus: RunningPrometheus, monitored_dev: MonitoredDev
) -> None:
    groups = rule_groups(monitored_dev)
    found = poll(lambda: evaluated_rules(prometheus, groups), "every stack rule evaluated once", seconds=90)
    for group in groups:
        reported = found[group["name"]]
        assert [r["name"] for r in reported] == [r["alert"] for r in group["rules"]]
        for rule in reported:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule


# --- on the operator's dev model pods ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_pods(crd_node: LocalNode, monitored_dev: MonitoredDev) -> list:  # noqa: F811
    """The operator's dev model pods, once each has a pod IP."""

    def with_ip() -> list:
        pods = operator_pods(crd_node, monitored_dev.stack.namespace, monitored_dev.name)
        live = [p for p in pods if p.metadata.deletion_timestamp is None]
        return live if live and all(p.status.pod_ip for p in live) else []

    return poll(with_ip, "the dev model's pods with an IP", seconds=240)


def model_targets(prometheus: RunningPrometheus, monitored_dev: MonitoredDev) -> list[dict[str, Any]]:
    prefix = job_prefix(pod_monitor(monitored_dev))
    return [t for t in prometheus.api("targets", state="active")["activeTargets"] if t["scrapePool"].startswith(prefix)]


def test_each_dev_model_pod_is_one_target_with_its_model_variant_and_version(
    crd_node: LocalNode,  # noqa: F811
    prometheus: RunningPrometheus,
    monitored_dev: MonitoredDev,
    model_pods: list,
) -> None:
    names = {p.metadata.name for p in model_pods}

    def all_discovered() -> list[dict[str, Any]]:
        targets = model_targets(prometheus, monitored_dev)
        return targets if {t["labels"].get("pod") for t in targets} >= names else []

    targets = poll(all_discovered, f"a target for each of {sorted(names)}", seconds=60)
    per_pod = Counter(t["labels"]["pod"] for t in targets)
    assert all(per_pod[name] == 1 for name in names), per_pod
    settings = monitored_dev.stack.settings
    for pod in model_pods:
        (target,) = [t for t in targets if t["labels"]["pod"] == pod.metadata.name]
        variant = pod.metadata.labels[labels.VARIANT]
        assert target["labels"][metrics.MODEL] == monitored_dev.model_key
        assert variant in settings.models[monitored_dev.model_key].variants
        assert target["labels"][metrics.VARIANT] == variant
        assert target["labels"][metrics.MODEL_VERSION] == pod.metadata.labels[labels.MODEL_VERSION]
        assert target["labels"][metrics.MODEL_VERSION] == str(
            settings.models[monitored_dev.model_key].variants[variant].version
        )
        assert target["discoveredLabels"]["__meta_kubernetes_pod_container_name"] == monitored_dev.model_key


def send_traffic(pod: Any, count: int = 20) -> None:
    port = next(p.container_port for c in pod.spec.containers for p in (c.ports or []) if p.name == "http")
    for _ in range(count):
        answer = requests.post(
            f"http://{pod.status.pod_ip}:{port}/invocations", json={"dataframe_records": ROWS}, timeout=10
        )
        assert answer.status_code == 200, answer.text


def test_the_alert_rules_evaluate_on_the_model_pods_real_series(
    crd_node: LocalNode,  # noqa: F811
    prometheus: RunningPrometheus,
    monitored_dev: MonitoredDev,
    model_pods: list,
) -> None:
    ready = poll(lambda: stack_ready_pods(crd_node, monitored_dev), "a Ready dev model pod", seconds=600)
    key, namespace = monitored_dev.model_key, monitored_dev.stack.namespace
    (variant,) = monitored_dev.stack.settings.models[key].variants
    scope = Scope(model=key, variant=variant, namespace=namespace)

    def scraped() -> bool:
        for pod in ready:  # a steady trickle: a counter first scraped at its final value has no rate
            send_traffic(pod, 3)
        replicas = prometheus.query(metrics.replicas(scope))
        rate = prometheus.query(metrics.request_rate(scope))
        return bool(replicas and rate and float(rate[0]["value"][1]) > 0) and replicas

    try:
        replicas = poll(scraped, "the model pods' series (up, request rate) in Prometheus", seconds=120)
    except BaseException:
        for target in model_targets(prometheus, monitored_dev):
            url = target["scrapeUrl"]
            try:
                direct = requests.get(url, timeout=5)
                seen = f"{direct.status_code} {direct.headers.get('content-type')} {direct.text[:200]!r}"
            except requests.RequestException as exc:
                seen = str(exc)
            print(f"target {url}: {target['health']} {target.get('lastError')!r}; from this host: {seen}")
        raise
    assert float(replicas[0]["value"][1]) == len(ready)

    def settled() -> dict[str, dict[str, Any]]:
        groups = evaluated_rules(prometheus, rule_groups(monitored_dev))
        rules = {(r["name"], r["labels"].get(metrics.VARIANT, "")): r for rs in groups.values() for r in rs}
        below = rules.get(("ModelReplicasBelowMinimum", variant))
        idle = rules.get(("ModelVariantNoTraffic", variant))
        return rules if below and idle and below["state"] == idle["state"] == "inactive" else {}

    rules = poll(settled, "replicas-below-minimum and no-traffic inactive on the pods' series", seconds=120)
    for rule in rules.values():
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    memory = crd_node.pod_memory(prometheus.namespace, prometheus.pod)
    print(f"the operator's Prometheus pod working set (kubelet): {memory / 2**20:.0f} MiB")
