"""Prometheus' HTTP API, as a rollout reads it: one number per variant, or a `MeasurementError` saying why not."""

from __future__ import annotations

import math

import requests

from ml_serving import metrics


class MeasurementError(RuntimeError):
    """A query could not be measured: Prometheus unreachable or rejecting it, or an answer of the wrong shape."""


class Prometheus:
    """Prometheus' HTTP API: one number per variant. NaN is no value; +Inf is kept (a histogram's top bucket)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def per_variant(self, promql: str) -> dict[str, float]:
        try:
            response = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise MeasurementError(f"Prometheus at {self.url} is unreachable ({type(exc).__name__})") from None
        try:
            answer = response.json()
        except ValueError:
            body = " ".join(response.text.split())[:120] or "an empty body"
            raise MeasurementError(
                f"Prometheus at {self.url} answered HTTP {response.status_code} with a body that is not JSON: {body}"
            ) from None
        if not isinstance(answer, dict):
            raise MeasurementError(f"Prometheus answered {type(answer).__name__}, not an object")
        if answer.get("status") != "success":
            raise MeasurementError(f"Prometheus rejected the query: {answer.get('error', answer)}")
        data = answer.get("data")
        if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
            kind = data.get("resultType") if isinstance(data, dict) else type(data).__name__
            raise MeasurementError(f"Prometheus answered a {kind!s} where a vector was expected")
        values = {}
        for item in data["result"]:
            try:
                variant, value = item["metric"].get(metrics.VARIANT, ""), float(item["value"][1])
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                raise MeasurementError(f"Prometheus answered a sample that is not a number: {item!r:.120}") from None
            if not math.isnan(value):
                values[variant] = value
        return values
