"""The gunicorn worker: its thread pool, and the thread that keeps serving a busy connection.

The pool: a steady load stays on the same thread; a burst is served in full. The worker: a
connection whose next request follows at once is served by the thread that answered it, over
a real TCP connection, through gunicorn's own parser and WSGI layer.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger
from gunicorn.workers.gthread import TConn

from gunicorn_workers import LifoThreadPool, LifoThreadWorker, write_json_error

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


# ------------------------------------------------------------------------------ the worker


class PathApp:
    """A WSGI app that answers each request's path and runs the action set for that path."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.actions: dict[str, Callable[[], object]] = {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ["PATH_INFO"]
        self.paths.append(path)
        if path in self.actions:
            self.actions[path]()
        start_response("200 OK", [("Content-Length", str(len(path)))])
        return [path.encode()]


class Connection:
    """A worker, a client socket, and the worker's end of the same TCP connection."""

    def __init__(self, threads: int, all_threads_busy: bool = False) -> None:
        cfg = Config()
        cfg.set("threads", threads)
        cfg.set("keepalive", 5)
        self.app = PathApp()
        self.worker = LifoThreadWorker(1, os.getpid(), [], None, 30, cfg, Logger(cfg))
        self.worker.wsgi = self.app
        self.worker.tpool = self.worker.get_thread_pool()
        # Calls that hold every pool thread until close(), as other connections' requests would.
        self.burst = Burst(self.worker.tpool, threads) if all_threads_busy else None
        with socket.create_server(("127.0.0.1", 0)) as listener:
            self.client = socket.create_connection(listener.getsockname(), timeout=WAIT)
            accepted, address = listener.accept()
            self.served = TConn(cfg, accepted, address, listener.getsockname())
        self.answers = self.client.makefile("rb")

    def send(self, *paths: str) -> None:
        """Send GET requests for the paths, in one write."""
        self.client.sendall(
            b"".join(f"GET {p} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for p in paths)
        )

    def handle(self) -> object:
        """Run the worker's handling of the connection, as a pool thread does."""
        return self.worker.handle(self.served)

    def read_answer(self) -> bytes:
        """Return the body of the next answer on the connection."""
        assert self.answers.readline().startswith(b"HTTP/1.1 200")
        length = 0
        while (line := self.answers.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return self.answers.read(length)

    def close(self) -> None:
        """Close both ends, the pool and the worker's heartbeat file."""
        self.answers.close()
        self.client.close()
        self.served.close()
        if self.burst is not None:
            self.burst.finish()
        self.worker.tpool.shutdown(wait=True, cancel_futures=True)
        self.worker.tmp.close()


@pytest.fixture
def make_connection() -> Iterator[Callable[..., Connection]]:
    """Make connections to workers of so many threads; close them after the test."""
    made: list[Connection] = []

    def make(threads: int, all_threads_busy: bool = False) -> Connection:
        made.append(Connection(threads, all_threads_busy))
        return made[-1]

    yield make
    for connection in made:
        connection.close()


def test_a_request_that_follows_at_once_is_served_by_the_same_thread(make_connection):
    connection = make_connection(4)
    # The client sends its next request while the first is being answered.
    connection.app.actions["/first"] = lambda: connection.send("/second")
    connection.send("/first")
    # gthread's handle returns after each request and leaves the next to its main thread.
    assert connection.handle() is True  # kept alive, back to the poller once nothing follows
    assert connection.app.paths == ["/first", "/second"]
    assert [connection.read_answer(), connection.read_answer()] == [b"/first", b"/second"]


def test_with_no_thread_to_spare_the_connection_goes_back_to_the_poller(make_connection):
    connection = make_connection(1, all_threads_busy=True)
    connection.app.actions["/first"] = lambda: connection.send("/second")
    connection.send("/first")
    assert connection.handle() is True
    # The thread did not wait for this connection: another may need it more.
    assert connection.app.paths == ["/first"]


def test_pipelined_requests_are_served_even_with_no_thread_to_spare(make_connection):
    connection = make_connection(1, all_threads_busy=True)
    connection.send("/first", "/second")  # read from the socket together with the first
    assert connection.handle() is True
    assert connection.app.paths == ["/first", "/second"]
    assert [connection.read_answer(), connection.read_answer()] == [b"/first", b"/second"]


def test_a_stopping_worker_does_not_wait_for_the_next_request(make_connection):
    connection = make_connection(4)

    def stop_and_send() -> None:
        connection.worker.alive = False  # as on SIGTERM
        connection.send("/second")

    connection.app.actions["/first"] = stop_and_send
    connection.send("/first")
    # gthread keeps the connection a moment and answers what comes with "Connection: close".
    assert connection.handle() is True
    assert connection.app.paths == ["/first"]


def test_a_connection_the_client_closes_while_waited_on_ends(make_connection):
    connection = make_connection(4)
    connection.app.actions["/first"] = lambda: connection.client.shutdown(socket.SHUT_WR)
    connection.send("/first")
    assert connection.handle() is False  # closed, not handed back to the poller
    assert connection.app.paths == ["/first"]
    assert connection.read_answer() == b"/first"


# ------------------------------------------------- slow clients: the head, the drain, the errors


def test_a_head_the_main_thread_read_is_served_from_its_bytes(make_connection):
    connection = make_connection(4)
    # As on_pending_socket_readable leaves it: the head read off the socket, nothing left there.
    connection.worker._heads[connection.served] = bytearray(
        b"GET /read HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    connection.served.data_ready = True
    assert connection.handle() is True
    assert connection.app.paths == ["/read"]
    assert connection.read_answer() == b"/read"


def test_part_of_a_pipelined_head_waits_on_the_main_thread_not_on_this_one(make_connection):
    connection = make_connection(4)
    # The start of a second request comes with the first, and the rest never does.
    connection.client.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\nGET /sec")
    started = time.monotonic()
    assert connection.handle() is True  # kept alive: the poller waits for the rest
    assert time.monotonic() - started < 1
    assert connection.app.paths == ["/first"]
    assert connection.worker._heads[connection.served] == bytearray(b"GET /sec")


def test_the_start_of_a_next_head_is_left_to_the_main_thread(make_connection):
    connection = make_connection(4)
    connection.app.actions["/first"] = lambda: connection.client.sendall(b"GET /sec")
    connection.send("/first")
    started = time.monotonic()
    assert connection.handle() is True
    assert time.monotonic() - started < 1
    assert connection.app.paths == ["/first"]


def test_an_unread_body_still_arriving_ends_the_connection_without_waiting_for_it(
    make_connection,
):
    connection = make_connection(4)
    # The app answers without reading the body (as a 401 does); the client sends 3 bytes of 100.
    connection.client.sendall(b"POST /first HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
    started = time.monotonic()
    # gthread would drain for 5 s (and longer for a client sending a byte now and then), then
    # linger 2 s more on the main thread; here the body is not waited for, and the linger
    # after the answer (the client neither sends nor closes) is this thread's.
    assert connection.handle() is False
    assert time.monotonic() - started < 4
    assert connection.read_answer() == b"/first"


def test_an_unread_body_already_arrived_is_drained_and_the_connection_kept(make_connection):
    connection = make_connection(4)
    connection.client.sendall(
        b"POST /first HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /second HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    assert connection.handle() is True
    assert connection.app.paths == ["/first", "/second"]


def test_gunicorn_refusals_are_dashscope_json() -> None:
    left, right = socket.socketpair()
    with left, right:
        write_json_error(left, 431, "Request Header Fields Too Large", "quoting 'the client'")
        left.shutdown(socket.SHUT_WR)
        answer = right.makefile("rb").read()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"Content-Type: application/json" in head
    envelope = json.loads(body)
    assert envelope["code"] == "InvalidParameter"
    assert f"X-Request-Id: {envelope['request_id']}".encode() in head
    assert b"client" not in body  # gunicorn's message quotes the client's bytes: not repeated
