"""Monitoring on real pods (marker `pods`, issue 25 item 5): prometheus-operator turns the dev stack's PodMonitor and
PrometheusRule into Prometheus's configuration, Prometheus runs as the StatefulSet the operator generates on the
node, scrapes the operator's dev model pods once each with their model/variant/version labels, and evaluates the
stack's alert rules on those pods' series."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests

from ml_serving import labels, metrics
from ml_serving.localnode import LocalNode
from ml_serving.metrics import Scope
from ml_serving.plan import revealed
from tests.monitoring_fixtures import RunningPrometheus, operator_prometheus
from tests.node_fixtures import crd_node  # noqa: F401  (the module's node, with the CRDs)
from tests.test_node import poll
from tests.test_pods_serving import (  # noqa: F401  (module fixtures: the operator, the S3 store, dev `up`)
    DevStack,
    dev_stack,
    docker_engine,
    operator,
    operator_pods,
    stack_ready_pods,
    store,
)
from tests.test_serving import ROWS

pytestmark = pytest.mark.pods

SCRAPE_INTERVAL = "2s"  # dev's scrape interval here, so a rate has two samples within seconds


@pytest.fixture(scope="module")
def dev_change() -> Callable[[dict[str, Any]], None]:
    """dev scraped every 2 s here: `dev_stack` (what `ml-serving cluster --node --up` does, a real `up` that makes
    the stack's PodMonitor and PrometheusRule) takes this change before its `up`."""
    return lambda config: config["ml-serving:monitoring"].update(scrapeInterval=SCRAPE_INTERVAL)


@pytest.fixture(scope="module")
def prometheus(crd_node: LocalNode, dev_stack: DevStack) -> Any:  # noqa: F811
    with operator_prometheus(crd_node, dev_stack.settings) as running:
        print(f"Prometheus object -> its pod Ready: {time.monotonic() - running.created:.1f} s")
        yield running


def pod_monitor(stack: DevStack) -> dict[str, Any]:
    (monitor,) = [revealed(o) for o in stack.plan.find("PodMonitor")]
    return monitor


def rule_groups(stack: DevStack) -> list[dict[str, Any]]:
    (rule,) = [revealed(o) for o in stack.plan.find("PrometheusRule")]
    return rule["spec"]["groups"]


def job_prefix(monitor: dict[str, Any]) -> str:
    """How prometheus-operator names a PodMonitor's scrape jobs: podMonitor/<namespace>/<name>/<endpoint index>."""
    return f"podMonitor/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/"


def test_the_operator_writes_one_scrape_job_per_pod_monitor_endpoint_and_the_stack_rules(
    prometheus: RunningPrometheus,
    dev_stack: DevStack,  # noqa: F811
) -> None:
    monitor = pod_monitor(dev_stack)
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    expected = [f"{job_prefix(monitor)}{i}" for i in range(len(endpoints))]
    config = prometheus.generated_config()
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert sorted(jobs) == sorted(expected)
    for job, endpoint in zip(sorted(config["scrape_configs"], key=lambda j: j["job_name"]), endpoints, strict=True):
        (discovery,) = job["kubernetes_sd_configs"]
        assert discovery["role"] == "pod"
        assert discovery["namespaces"]["names"] == [dev_stack.namespace]
        assert job["metrics_path"] == endpoint["path"]
    # the rule files hold the stack's groups, one per model
    files = prometheus.rule_files()
    assert sorted(g["name"] for f in files.values() for g in f["groups"]) == sorted(
        g["name"] for g in rule_groups(dev_stack)
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
    prometheus: RunningPrometheus,
    dev_stack: DevStack,  # noqa: F811
) -> None:
    groups = rule_groups(dev_stack)
    found = poll(lambda: evaluated_rules(prometheus, groups), "every stack rule evaluated once", seconds=90)
    for group in groups:
        reported = found[group["name"]]
        assert [r["name"] for r in reported] == [r["alert"] for r in group["rules"]]
        for rule in reported:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule


# --- on the operator's dev model pods ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_pods(crd_node: LocalNode, dev_stack: DevStack) -> list:  # noqa: F811
    """The operator's dev model pods, once each has a pod IP."""

    def with_ip() -> list:
        pods = operator_pods(crd_node, dev_stack.namespace, dev_stack.name)
        live = [p for p in pods if p.metadata.deletion_timestamp is None]
        return live if live and all(p.status.pod_ip for p in live) else []

    return poll(with_ip, "the dev model's pods with an IP", seconds=240)


def model_targets(prometheus: RunningPrometheus, stack: DevStack) -> list[dict[str, Any]]:
    prefix = job_prefix(pod_monitor(stack))
    return [t for t in prometheus.api("targets", state="active")["activeTargets"] if t["scrapePool"].startswith(prefix)]


def test_each_dev_model_pod_is_one_target_with_its_model_variant_and_version(
    crd_node: LocalNode,  # noqa: F811
    prometheus: RunningPrometheus,
    dev_stack: DevStack,  # noqa: F811
    model_pods: list,
) -> None:
    names = {p.metadata.name for p in model_pods}

    def all_discovered() -> list[dict[str, Any]]:
        targets = model_targets(prometheus, dev_stack)
        return targets if {t["labels"].get("pod") for t in targets} >= names else []

    targets = poll(all_discovered, f"a target for each of {sorted(names)}", seconds=60)
    per_pod = Counter(t["labels"]["pod"] for t in targets)
    assert all(per_pod[name] == 1 for name in names), per_pod
    settings = dev_stack.settings
    for pod in model_pods:
        (target,) = [t for t in targets if t["labels"]["pod"] == pod.metadata.name]
        variant = pod.metadata.labels[labels.VARIANT]
        assert target["labels"][metrics.MODEL] == dev_stack.model_key
        assert variant in settings.models[dev_stack.model_key].variants
        assert target["labels"][metrics.VARIANT] == variant
        assert target["labels"][metrics.MODEL_VERSION] == pod.metadata.labels[labels.MODEL_VERSION]
        assert target["labels"][metrics.MODEL_VERSION] == str(
            settings.models[dev_stack.model_key].variants[variant].version
        )
        assert target["discoveredLabels"]["__meta_kubernetes_pod_container_name"] == dev_stack.model_key


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
    dev_stack: DevStack,  # noqa: F811
    model_pods: list,
) -> None:
    ready = poll(lambda: stack_ready_pods(crd_node, dev_stack), "a Ready dev model pod", seconds=600)
    key, namespace = dev_stack.model_key, dev_stack.namespace
    (variant,) = dev_stack.settings.models[key].variants
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
        for target in model_targets(prometheus, dev_stack):
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
        groups = evaluated_rules(prometheus, rule_groups(dev_stack))
        rules = {(r["name"], r["labels"].get(metrics.VARIANT, "")): r for rs in groups.values() for r in rs}
        below = rules.get(("ModelReplicasBelowMinimum", variant))
        idle = rules.get(("ModelVariantNoTraffic", variant))
        return rules if below and idle and below["state"] == idle["state"] == "inactive" else {}

    rules = poll(settled, "replicas-below-minimum and no-traffic inactive on the pods' series", seconds=120)
    for rule in rules.values():
        assert rule["health"] == "ok" and not rule.get("lastError"), rule
    memory = crd_node.pod_memory(prometheus.namespace, prometheus.pod)
    print(f"the operator's Prometheus pod working set (kubelet): {memory / 2**20:.0f} MiB")
