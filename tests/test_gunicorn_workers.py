"""The worker's thread pool: a steady load stays on the same thread; a burst is served in full."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from gunicorn_workers import LifoThreadPool

WAIT = 10  # seconds: a bound for a test that fails, never reached by one that passes


@pytest.fixture
def pool() -> Iterator[LifoThreadPool]:
    """A pool of four threads, shut down after the test."""
    pool = LifoThreadPool(4)
    yield pool
    pool.shutdown(wait=True, cancel_futures=True)


class Burst:
    """Calls that block until `finish` is called, each noting the thread it runs on."""

    def __init__(self, pool: LifoThreadPool, calls: int) -> None:
        self.release = threading.Event()
        self.threads: list[int] = []
        self.futures = [pool.submit(self._blocked) for _ in range(calls)]

    def _blocked(self) -> None:
        self.threads.append(threading.get_ident())
        assert self.release.wait(WAIT)

    def finish(self) -> None:
        """Let the calls return, and wait for all of them."""
        self.release.set()
        for future in self.futures:
            future.result(WAIT)


def pool_threads() -> list[threading.Thread]:
    """Return the live threads of LifoThreadPools."""
    return [thread for thread in threading.enumerate() if thread.name.startswith("LifoThreadPool")]


def test_results_and_exceptions_reach_the_futures(pool: LifoThreadPool) -> None:
    assert pool.submit(pow, 2, 10).result(WAIT) == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(divmod, 1, 0).result(WAIT)


def test_after_a_burst_a_steady_load_stays_on_the_last_idle_thread(pool: LifoThreadPool) -> None:
    burst = Burst(pool, 4)
    burst.finish()
    assert len(set(burst.threads)) == 4
    # One call at a time, as from a steady light load: the thread that went idle last takes
    # each, where ThreadPoolExecutor would pass them round all four.
    steady = {pool.submit(threading.get_ident).result(WAIT) for _ in range(20)}
    assert len(steady) == 1


def test_a_burst_beyond_the_threads_waits_and_runs_in_order(pool: LifoThreadPool) -> None:
    burst = Burst(pool, 4)
    order: list[int] = []
    queued = [pool.submit(order.append, n) for n in range(6)]
    assert not any(future.done() for future in queued)
    burst.finish()
    for future in queued:
        future.result(WAIT)
    assert order == list(range(6))
    assert len(pool_threads()) == 4  # never more threads than the pool's size


def test_shutdown_refuses_new_calls_and_stops_the_threads(pool: LifoThreadPool) -> None:
    Burst(pool, 4).finish()
    threads = pool_threads()
    assert len(threads) == 4
    pool.shutdown(wait=True)
    assert not any(thread.is_alive() for thread in threads)
    with pytest.raises(RuntimeError):
        pool.submit(threading.get_ident)


def test_shutdown_can_cancel_what_waits_for_a_thread(pool: LifoThreadPool) -> None:
    burst = Burst(pool, 4)
    queued = [pool.submit(threading.get_ident) for _ in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    assert all(future.cancelled() for future in queued)
    # The calls already running finish, and then their threads stop.
    threads = pool_threads()
    burst.finish()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)


def test_shutdown_lets_the_threads_finish_what_waits_for_them(pool: LifoThreadPool) -> None:
    burst = Burst(pool, 4)
    queued = [pool.submit(pow, 2, n) for n in range(3)]
    pool.shutdown(wait=False)
    burst.finish()
    assert [future.result(WAIT) for future in queued] == [1, 2, 4]


def test_calls_submitted_from_many_threads_each_run_once(pool: LifoThreadPool) -> None:
    seen: list[int] = []

    def submit_many(start: int) -> None:
        for n in range(start, start + 500):
            pool.submit(seen.append, n).result(WAIT)

    submitters = [threading.Thread(target=submit_many, args=(k * 500,)) for k in range(4)]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join(WAIT)
    assert sorted(seen) == list(range(2000))
    assert len(pool_threads()) <= 4
