"""gunicorn's gthread workers hold many slow upstream calls at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from .conftest import T2V, Gateway, Keys, submit

CONCURRENT = 12  # below the fixture's 2 workers x 8 threads
UPSTREAM_SECONDS = 1.0


def test_slow_submits_are_served_in_parallel(gateway: Gateway, keys: Keys) -> None:
    prompt = f"[sleep={UPSTREAM_SECONDS}] one of many"
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(
            pool.map(lambda _: submit(gateway, keys.alice, T2V, prompt), range(CONCURRENT))
        )
    elapsed = time.monotonic() - started

    assert [a.status_code for a in answers] == [200] * CONCURRENT, [a.text for a in answers]
    assert len({a.json()["output"]["task_id"] for a in answers}) == CONCURRENT
    # One after another would take 12 s; two rounds at worst when one worker takes them all.
    assert elapsed < 4 * UPSTREAM_SECONDS, elapsed
