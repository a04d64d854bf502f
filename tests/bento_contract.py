"""What `ml_serving.server.bento_batching` relies on in BentoML's private CorkDispatcher, checked with the BentoML
virtualenv's Python (`tests/test_bentoml.py` runs this file there; BentoML's pins clash with the project's venv).
Each check prints one line; any failure exits non-zero with an AssertionError."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

from ml_serving.server.bento_batching import PINNED, RowBatcher, Shed

DEADLINE_SECONDS = 30


class Blocked:
    """A model whose call number `at` waits until released, so that requests pile up behind it as under load."""

    def __init__(self, at: int = 1) -> None:
        self.sizes: list[int] = []
        self.at = at
        self.release = threading.Event()

    def __call__(self, rows: list[dict]) -> list[int]:
        self.sizes.append(len(rows))
        if len(self.sizes) == self.at:
            self.release.wait(DEADLINE_SECONDS)
        return [row["x"] * 10 for row in rows]


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE_SECONDS} s: {what}"
        await asyncio.sleep(0.005)


async def batches_and_answers() -> None:
    warm = 15  # past the dispatcher's training (11 batches), whose waits it logs as 0
    model, observed = Blocked(at=warm + 1), []
    batcher = RowBatcher(model, max_batch_size=8, max_latency_ms=60_000, observe=observed.append)
    for i in range(warm):
        assert await batcher([{"x": i}]) == [i * 10]
    first = asyncio.create_task(batcher([{"x": 0}]))
    await until(lambda: len(model.sizes) > warm, "the blocked batch reached the model")
    others = [asyncio.create_task(batcher([{"x": i}, {"x": i + 100}])) for i in range(1, 7)]  # 12 rows > 8
    for _ in range(3):
        await asyncio.sleep(0)  # each request is queued
    model.release.set()
    answers = await asyncio.gather(first, *others)
    assert answers == [[0], *[[i * 10, (i + 100) * 10] for i in range(1, 7)]], answers
    burst = model.sizes[warm:]
    assert burst[0] == 1 and max(burst[1:]) > 1, f"queued requests were batched: {model.sizes}"
    assert max(model.sizes) <= 8 and observed == model.sizes, (model.sizes, observed)
    big = await batcher([{"x": i} for i in range(20)])  # split over batches, joined back in order
    assert big == [i * 10 for i in range(20)], big
    print("batches: queued requests share a batch, each gets its own rows' answers, in order")

    # BentoML's optimizer would hold a lone request for the mean of past waits; the burst above waited
    batcher.optimizer.trigger_refresh()
    assert batcher.optimizer.o_stat, "the optimizer logs each batch"
    assert any(wait > 0 for _, _, wait in batcher.optimizer.o_stat), "some batch waited (behind the blocked model)"
    assert batcher.optimizer.wait == 0, f"a lone request is not held back: wait {batcher.optimizer.wait}"
    print("no wait: the optimizer's mean wait stays 0 after requests waited")


async def sheds_past_the_budget() -> None:
    model = Blocked()
    batcher = RowBatcher(model, max_batch_size=8, max_latency_ms=1, observe=lambda size: None)
    first = asyncio.create_task(batcher([{"x": 0}]))
    await until(lambda: model.sizes, "the first batch reached the model")
    others = [asyncio.create_task(batcher([{"x": i}])) for i in range(1, 6)]
    await until(lambda: any(task.done() for task in others), "a request behind the blocked model was shed")
    model.release.set()
    results = await asyncio.gather(first, *others, return_exceptions=True)
    shed = [r for r in results if isinstance(r, Shed)]
    assert shed and all(isinstance(r, Shed) or r == [i * 10] for i, r in enumerate(results)), results
    print(f"sheds: {len(shed)} of {len(others)} queued past a 1 ms budget raised Shed, nothing else failed")


def refuses_another_version() -> None:
    probe = "import bentoml; bentoml.__version__ = '9.9.9'; import ml_serving.server.bento_batching"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert run.returncode != 0 and f"install bentoml=={PINNED}" in run.stderr, run.stderr[-500:]
    print("version: another BentoML is refused at import, naming the pin")


asyncio.run(batches_and_answers())
asyncio.run(sheds_past_the_budget())
refuses_another_version()
