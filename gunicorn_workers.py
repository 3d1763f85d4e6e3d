"""gunicorn's gthread worker, with a thread pool that gives work to the thread idle the shortest
and a thread that keeps serving a connection whose next request follows at once.

gunicorn.conf.py names `LifoThreadWorker` as the worker class. This module imports nothing of
the app: gunicorn's master imports it, and a HUP reload must not find app code already loaded.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent import futures
from typing import Any

from gunicorn import util
from gunicorn.http.parser import Parser
from gunicorn.workers.gthread import TConn, ThreadWorker

# A call waiting for a thread: its future, the function and its arguments.
_WorkItem = tuple["futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _Thread:
    """One pool thread, parked on its own lock while idle."""

    def __init__(self) -> None:
        self._wake = threading.Lock()
        self._wake.acquire()
        self._item: _WorkItem | None = None

    def hand(self, item: _WorkItem | None) -> None:
        """Give the parked thread its next call, or None to make it exit."""
        self._item = item
        self._wake.release()

    def park(self) -> _WorkItem | None:
        """Wait for `hand` and return what it gave."""
        self._wake.acquire()
        item, self._item = self._item, None
        return item


class LifoThreadPool(futures.Executor):
    """Up to `max_workers` threads; each call goes to the thread that went idle last.

    concurrent.futures.ThreadPoolExecutor hands each call to whichever idle thread the OS wakes
    on its queue, and never stops the threads a burst started: after one burst, a steady load
    is spread over all of them (~100 a worker after 400 connections), each with its own
    upstream session and cold CPU caches, and a steady 32 connections answered a fifth fewer
    running-task queries a second. Here the same few threads serve a steady load, and the
    others wait, parked, for the next burst.
    """

    def __init__(self, max_workers: int) -> None:
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._idle: list[_Thread] = []  # the most recently idle last
        self._backlog: deque[_WorkItem] = deque()  # calls that found every thread busy
        self._threads: list[threading.Thread] = []
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        """Run `fn(*args, **kwargs)` on the last idle thread, a new one, or the next free one."""
        future: futures.Future[Any] = futures.Future()
        item = (future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                self._idle.pop().hand(item)
            elif len(self._threads) < self._max_workers:
                thread = threading.Thread(
                    target=self._serve,
                    args=(_Thread(), item),
                    name=f"LifoThreadPool-{len(self._threads)}",
                    # gunicorn waits for requests in flight (graceful_timeout) before it shuts
                    # the pool down; a thread must not hold the process up past that.
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._backlog.append(item)
        return future

    def _serve(self, parked: _Thread, item: _WorkItem | None) -> None:
        while item is not None:
            future, fn, args, kwargs = item
            result, error = None, None
            running = future.set_running_or_notify_cancel()
            if running:
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    error = exc
            # Go idle before the caller hears of the result: a caller that submits again at
            # once must find this thread on top of the idle stack, not another one.
            item, idle = self._next(parked)
            if running:
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)
            # A finished call's objects must not live on in a parked thread.
            del future, fn, args, kwargs, result, error
            if idle:
                item = parked.park()

    def _next(self, parked: _Thread) -> tuple[_WorkItem | None, bool]:
        """Return the oldest waiting call; else None, and whether the thread is now idle."""
        with self._lock:
            if self._backlog:
                return self._backlog.popleft(), False
            if self._shutdown:
                return None, False
            self._idle.append(parked)
            return None, True

    def has_spare_thread(self) -> bool:
        """Return whether a call submitted now would start at once."""
        # Read without the lock: a hint for whether to hold on to a thread, nothing more.
        return bool(self._idle) or len(self._threads) < self._max_workers

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; let the threads finish the backlog (unless cancelled) and exit."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._backlog:
                    self._backlog.popleft()[0].cancel()
            idle, self._idle = self._idle, []
            threads = list(self._threads)
        for parked in idle:
            parked.hand(None)
        if wait:
            for thread in threads:
                thread.join()


# How long a thread that has answered a request waits for the next one on the same connection
# before handing the connection back to the worker's poller.
NEXT_REQUEST_WAIT_MS = 50


# ------------------------------------------------------- gunicorn's own refusals, as DashScope's

# What gunicorn itself refuses (base.Worker.handle_error: a malformed request line or header,
# a request line over limit_request_line, more headers than limit_request_fields, a broken
# chunked body...) in DashScope's envelope, with the codes app/errors.py gives these statuses.
# The message is fixed per status: gunicorn's own quotes the client's bytes.
GUNICORN_ERRORS = {
    400: ("InvalidParameter", "The request is not valid HTTP."),
    403: ("AccessDenied", "The request is forbidden."),
    414: ("InvalidParameter", "The request line is too long."),
    417: ("InvalidParameter", "The request's Expect header cannot be met."),
    431: ("InvalidParameter", "The request has too many headers, or too large ones."),
    500: ("InternalError", "An internal error occurred."),
    501: ("InvalidParameter", "The request's transfer coding is not supported."),
}


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Write gunicorn's error answer as DashScope's JSON envelope instead of an HTML page."""
    code, message = GUNICORN_ERRORS.get(status_int, ("InvalidParameter", reason))
    request_id = str(uuid.uuid4())
    body = json.dumps({"request_id": request_id, "code": code, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-Id: {request_id}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class LifoThreadWorker(ThreadWorker):
    """gunicorn's gthread worker on a LifoThreadPool of `threads` threads.

    gthread hands every kept-alive connection back to its main thread after each request: the
    main thread waits for the next request with the other connections, then hands it to a pool
    thread. A client that sends its next request at once (a poller, a load of back-to-back
    calls) pays two thread hand-offs per request for that, which cost the gateway about a tenth
    of its throughput. Here the thread that answered waits up to NEXT_REQUEST_WAIT_MS for the
    next request itself, if the pool has a thread to spare for other connections when the wait
    begins; a connection that stays quiet goes back to the poller, for the keepalive time.

    gunicorn's own refusals (a malformed head, too long, too many headers) are answered in
    DashScope's JSON envelope (`init_process`: gunicorn 27.0.1 has no setting for its error
    page). A client that never finishes its head or body still holds a thread here: that is
    the job of the nginx front (deploy/nginx.conf).
    """

    def init_process(self) -> None:
        """Answer gunicorn's own refusals in JSON, then run the worker."""
        # gunicorn has no setting for its error page: handle_error writes it with
        # util.write_error, replaced here in the worker process only (the master writes none).
        util.write_error = write_json_error
        super().init_process()

    # gunicorn's stubs say ThreadPoolExecutor; gunicorn only calls submit and shutdown.
    def get_thread_pool(self) -> futures.Executor:  # type: ignore[override]
        """Return the pool the worker hands its connections to."""
        return LifoThreadPool(self.cfg.threads)

    def handle(self, conn: TConn) -> Any:
        """Serve the connection's requests while each next one follows within the wait."""
        while True:
            result = super().handle(conn)
            # Anything but a kept-alive HTTP/1 connection of a running worker is gthread's.
            if result is not True or conn.is_http2 or not self.alive:
                return result
            # A pipelined request already read ahead is served now, wait or no wait.
            read_ahead = isinstance(conn.parser, Parser) and conn.parser.unreader.buf.getvalue()
            if not read_ahead and not self._next_request_follows(conn):
                return result

    def _next_request_follows(self, conn: TConn) -> bool:
        """Wait briefly for the connection to become readable, unless threads are short."""
        pool = self.tpool
        if not isinstance(pool, LifoThreadPool) or not pool.has_spare_thread():
            return False
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        # Readable also means closed by the client: gthread's parser then ends the connection.
        return bool(poller.poll(NEXT_REQUEST_WAIT_MS))
