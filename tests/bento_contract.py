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


class Busy:
    """A model whose call number `at` holds the event loop (`predict` runs in it) until `release` is set, so that
    requests sent meanwhile from another thread queue up behind it, as under load."""

    def __init__(self, at: int = 1) -> None:
        self.sizes: list[int] = []
        self.threads: set[int] = set()
        self.at = at
        self.busy, self.release = threading.Event(), threading.Event()

    def __call__(self, rows: list[dict]) -> list[int]:
        self.sizes.append(len(rows))
        self.threads.add(threading.get_ident())
        if len(self.sizes) == self.at:
            self.busy.set()
            assert self.release.wait(DEADLINE_SECONDS), "released"
        return [row["x"] * 10 for row in rows]


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"not within {DEADLINE_SECONDS} s: {what}"
        await asyncio.sleep(0.005)


def send_while_busy(model: Busy, loop: asyncio.AbstractEventLoop, calls: list) -> list:
    """From another thread: once `model` holds the loop, `calls` (coroutines) are handed to the loop; then release."""
    sent: list = []

    def sender() -> None:
        assert model.busy.wait(DEADLINE_SECONDS), "the busy call started"
        sent.extend(asyncio.run_coroutine_threadsafe(call, loop) for call in calls)
        model.release.set()

    threading.Thread(target=sender, daemon=True).start()
    return sent


async def batches_and_answers() -> None:
    warm = 15  # past the dispatcher's training (11 batches)
    model, observed = Busy(at=warm + 1), []
    batcher = RowBatcher(model, max_batch_size=8, max_latency_ms=60_000, observe=observed.append)
    for i in range(warm):
        assert await batcher([{"x": i}]) == [i * 10]
    sent = send_while_busy(
        model, asyncio.get_running_loop(), [batcher([{"x": i}, {"x": i + 100}]) for i in range(1, 7)]
    )
    assert await batcher([{"x": 0}]) == [0]
    await until(lambda: len(sent) == 6 and all(future.done() for future in sent), "the queued requests answered")
    answers = [future.result() for future in sent]
    assert answers == [[i * 10, (i + 100) * 10] for i in range(1, 7)], answers
    burst = model.sizes[warm:]
    assert burst[0] == 1 and max(burst[1:]) > 1, f"requests sent during a batch were batched: {model.sizes}"
    assert max(model.sizes) <= 8 and observed == model.sizes, (model.sizes, observed)
    big = await batcher([{"x": i} for i in range(20)])  # split over batches, joined back in order
    assert big == [i * 10 for i in range(20)], big
    assert model.threads == {threading.get_ident()}, "the model ran in the event loop's thread, no hop per batch"
    print(
        "batches: requests sent during a batch share the next, each gets its own rows' answers, in order, "
        "predicted in the event loop's thread"
    )

    # BentoML's optimizer would hold a lone request back for the mean of the waits it logged; ours never waits
    for _ in range(5):
        batcher.optimizer.log_outbound(n=1, wait=0.05, duration=0.001)
    batcher.optimizer.trigger_refresh()
    assert any(wait > 0 for _, _, wait in batcher.optimizer.o_stat), "the logged waits are in the statistics"
    assert batcher.optimizer.wait == 0, f"a lone request is not held back: wait {batcher.optimizer.wait}"
    print("no wait: the optimizer's mean wait stays 0 after requests waited")


async def sheds_past_the_budget() -> None:
    model = Busy()
    batcher = RowBatcher(model, max_batch_size=1, max_latency_ms=1, observe=lambda size: None)

    def release_later() -> None:  # the first batch holds the loop for 50 ms
        model.busy.wait(DEADLINE_SECONDS)
        time.sleep(0.05)
        model.release.set()

    threading.Thread(target=release_later, daemon=True).start()
    results = await asyncio.gather(*[batcher([{"x": i}]) for i in range(6)], return_exceptions=True)
    shed = [r for r in results if isinstance(r, Shed)]
    assert shed and all(isinstance(r, Shed) or r == [i * 10] for i, r in enumerate(results)), results
    print(f"sheds: {len(shed)} of 5 queued past a 1 ms budget behind a busy batch raised Shed, nothing else failed")


def refuses_another_version() -> None:
    probe = "import bentoml; bentoml.__version__ = '9.9.9'; import ml_serving.server.bento_batching"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert run.returncode != 0 and f"install bentoml=={PINNED}" in run.stderr, run.stderr[-500:]
    print("version: another BentoML is refused at import, naming the pin")


asyncio.run(batches_and_answers())
asyncio.run(sheds_past_the_budget())
refuses_another_version()
