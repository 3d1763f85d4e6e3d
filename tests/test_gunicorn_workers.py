"""The gunicorn worker: its thread pool, and the thread that keeps serving a busy connection.

The pool: a steady load stays on the same thread; a burst is served in full. The worker: a
connection whose next request follows at once is served by the thread that answered it, over
a real TCP connection, through gunicorn's own parser and WSGI layer; a stopping worker, as a
real gunicorn process, answers every request that reached it, as stock gthread does.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
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
        # What gthread's init_process sets up for its main thread (enqueue_req, finish_request).
        self.worker.poller = selectors.DefaultSelector()
        self.worker.method_queue.init()
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

    def finish(self, result: object) -> None:
        """Hand a pool thread's result to the worker's main thread, as its future does."""
        done: futures.Future[Any] = futures.Future()
        done.set_result(result)
        self.worker.finish_request(self.served, done)

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
        self.worker.poller.close()
        self.worker.method_queue.close()
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
    # The start of a second request comes with the first, and the rest only later.
    connection.client.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\nGET /sec")
    started = time.monotonic()
    result = connection.handle()
    assert result is True  # kept alive: the main thread waits for the rest
    assert time.monotonic() - started < 1
    assert connection.app.paths == ["/first"]
    connection.finish(result)
    # Waited for as a head (until the keepalive time), not as an idle kept-alive connection,
    # whose time a stopping worker cuts to 2 s.
    worker = connection.worker
    assert list(worker.pending_conns) == [connection.served]
    assert not worker.keepalived_conns
    assert worker._heads[connection.served] == bytearray(b"GET /sec")
    connection.client.sendall(b"ond HTTP/1.1\r\nHost: t\r\n\r\n")
    worker.on_pending_socket_readable(connection.served, connection.served.sock)
    assert [connection.read_answer(), connection.read_answer()] == [b"/first", b"/second"]


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


def test_a_connection_its_thread_closed_is_counted_gone_once(make_connection):
    connection = make_connection(4)
    worker = connection.worker
    worker.nr_conns = 1  # as accept() counts it
    connection.client.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    connection.client.shutdown(socket.SHUT_WR)  # so that the linger after the answer is short
    result = connection.handle()
    assert result is False
    assert connection.served.sock.fileno() == -1  # closed (after its linger) on this thread
    connection.finish(result)
    # Counted twice, a stopping worker would think itself idle with requests still in flight.
    assert worker.nr_conns == 0
    assert connection.read_answer() == b"/first"


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


# ------------------------------------------------------- a real gunicorn process that stops

REPO_ROOT = Path(__file__).resolve().parent.parent

STOP_APP = """
import time

def app(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(1.5)
    body = environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""


def read_response(sock: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """Read one answer off a blocking socket: its status line, headers and body."""
    answer = sock.makefile("rb")
    status = answer.readline().rstrip()
    headers: dict[str, str] = {}
    while (line := answer.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = answer.read(int(headers.get("content-length", "0")))
    return status, headers, body


@pytest.fixture
def lone_worker(tmp_path: Path) -> Iterator[Callable[[str], tuple[subprocess.Popen[bytes], int]]]:
    """Start gunicorn (one worker of the given class, 4 threads) on a small app; stop it after."""
    started: list[subprocess.Popen[bytes]] = []
    (tmp_path / "stop_app.py").write_text(STOP_APP)
    (tmp_path / "empty.conf.py").write_text("")

    def start(worker_class: str) -> tuple[subprocess.Popen[bytes], int]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            str(Path(sys.executable).parent / "gunicorn"),
            "-c", str(tmp_path / "empty.conf.py"),
            "-k", worker_class, "-w", "1", "--threads", "4",
            "--keep-alive", "5", "--graceful-timeout", "10",
            "-b", f"127.0.0.1:{port}", "stop_app:app",
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(process)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
                    sock.sendall(b"GET /up HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    if read_response(sock)[0].startswith(b"HTTP/1.1 200"):
                        return process, port
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"gunicorn ({worker_class}) did not answer in time")

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)


@pytest.mark.parametrize(
    "worker_class", ["gunicorn_workers.LifoThreadWorker", "gthread"], ids=["lifo", "gthread"]
)
def test_a_stopping_worker_answers_every_request_that_reached_it(lone_worker, worker_class):
    process, port = lone_worker(worker_class)

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=WAIT)

    # Connections that end on their own first: a worker that miscounted them would think
    # itself idle on TERM and exit with the requests below unanswered.
    for _ in range(6):
        with connect() as sock:
            sock.sendall(b"GET /closed HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert read_response(sock)[2] == b"/closed"
    with connect() as kept, connect() as slow, connect() as partial:
        kept.sendall(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(kept)[2] == b"/first"  # then idle, kept alive
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")  # in flight on TERM
        partial.sendall(b"GET /partial HTTP/1.1\r\nHost: t\r\n")  # its head unfinished
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Within gthread's 2 s for a stopping worker's kept-alive connections, and the head's
        # keepalive time: both are answered, with "Connection: close".
        kept.sendall(b"GET /kept HTTP/1.1\r\nHost: t\r\n\r\n")
        partial.sendall(b"\r\n")
        answers = {}
        for name, sock in (("slow", slow), ("kept", kept), ("partial", partial)):
            status, headers, body = read_response(sock)
            answers[name] = (status, body)
            if name != "slow":  # its keep-alive was settled before TERM
                assert headers.get("connection") == "close", (name, headers)
        assert answers == {
            "slow": (b"HTTP/1.1 200 OK", b"/slow"),
            "kept": (b"HTTP/1.1 200 OK", b"/kept"),
            "partial": (b"HTTP/1.1 200 OK", b"/partial"),
        }
    assert process.wait(WAIT) == 0
