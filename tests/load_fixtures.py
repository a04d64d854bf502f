"""Concurrent clients for the load tests: each connection a thread with its own keep-alive session, sending for a
bounded time, every answer kept (status, Retry-After, predictions) so a test can check all of them."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import requests


@dataclass
class Answer:
    row: int
    status: int
    retry_after: str | None
    predictions: list | None


@dataclass
class Load:
    answers: list[Answer] = field(default_factory=list)

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for answer in self.answers:
            counts[answer.status] = counts.get(answer.status, 0) + 1
        return counts


def send(url: str, bodies: list[dict], connections: int, seconds: float, timeout: float = 120) -> Load:
    """`connections` clients post `bodies` in turn to `url` for `seconds`; each request's answer is recorded."""
    load, lock, deadline = Load(), threading.Lock(), time.monotonic() + seconds

    def client(offset: int) -> None:
        session, sent = requests.Session(), offset
        while time.monotonic() < deadline:
            row = sent % len(bodies)
            response = session.post(url, json=bodies[row], timeout=timeout)
            predictions = response.json().get("predictions") if response.status_code == 200 else None
            with lock:
                load.answers.append(Answer(row, response.status_code, response.headers.get("Retry-After"), predictions))
            sent += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + timeout + 10)
    return load
