"""gunicorn's gthread worker, with a thread pool that gives work to the thread idle the shortest,
a thread that keeps serving a connection whose next request follows at once, and a main thread
that hands a connection to the pool only once its request head has arrived in full.

gunicorn.conf.py names `LifoThreadWorker` as the worker class. This module imports nothing of
the app: gunicorn's master imports it, and a HUP reload must not find app code already loaded.
"""

from __future__ import annotations

import json
import select
import selectors
import socket
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from concurrent import futures
from functools import partial
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

# How long a connection has to deliver a complete request head when gunicorn's `keepalive` is 0
# (otherwise it is `keepalive`: GATEWAY_KEEPALIVE, 5 s).
HEAD_SECONDS_WITHOUT_KEEPALIVE = 5.0
# The most the main thread reads from a connection at once while it waits for the head.
HEAD_READ_BYTES = 65536


def _ends_head(data: bytes | bytearray, start: int = 0) -> bool:
    """Return whether the bytes hold the blank line that ends an HTTP/1 request head."""
    # A bare LF is gunicorn's parser's to refuse or accept, not the wait's to hang on.
    return data.find(b"\r\n\r\n", start) >= 0 or data.find(b"\n\n", start) >= 0


def _max_head_bytes(cfg: Any) -> int:
    """Return the longest head gunicorn's parser reads before it refuses one (its own limits)."""
    # As gunicorn.http.message computes them: 0 (or past 32768) means its defaults.
    line = cfg.limit_request_line or 8190
    fields = cfg.limit_request_fields if 0 < cfg.limit_request_fields <= 32768 else 32768
    field_size = cfg.limit_request_field_size or 8190
    return int(line + 2 + fields * (field_size + 2) + 4)


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

    gthread also gives a pool thread to a connection as soon as it has a byte to read, and that
    thread then reads the request head with no time limit: a client that sends its head a byte
    at a time keeps the thread for as long as it likes, and a few hundred of them take every
    thread (gunicorn 27 has no setting for it). Here the main thread reads the head itself,
    with the connections it already watches, and hands the connection over only once the head
    is complete (or longer than gunicorn's parser allows, so that the parser refuses it). A
    connection whose head is not complete `keepalive` seconds after it was accepted, or after
    the first byte of its next request, is closed without an answer, as gthread closes an idle
    one. The body is the app's to read within its own deadline ([server] body_timeout); a body
    the app did not read (a 401 comes before it) is drained only as far as it has arrived
    (`_keepalive_after`), and an ending connection lingers on its pool thread, never on the
    main one (`handle`; `finish_request` then only counts it gone). A stopping worker (HUP,
    TERM) keeps doing all this until its last connection is gone, as gthread does: heads that
    arrive are answered, with "Connection: close". TLS, uwsgi and HTTP/2 prior-knowledge
    listeners read their first bytes differently, and are left to gthread as it is. gunicorn's
    own refusals (a malformed head, too long, too many headers) are answered in DashScope's
    JSON envelope (`init_process`).

    What is gthread's and replaced here (gunicorn 27.0.1 has no setting for any of it):
    `enqueue_req` and `on_pending_socket_readable` (the head is read on the main thread),
    `finish_request` (for a connection already closed), `_keepalive_after` (the drain),
    `util.write_error` (the error page). Each is checked by tests/test_gunicorn_workers.py and
    tests/e2e/test_slow_clients.py against the gunicorn the project pins.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self._reads_heads = (
            not cfg.is_ssl
            and getattr(cfg, "protocol", "http") == "http"
            and getattr(cfg, "http2_cleartext", "off") not in ("prior-knowledge", "both")
        )
        self._head_seconds = float(cfg.keepalive or HEAD_SECONDS_WITHOUT_KEEPALIVE)
        self._head_limit = _max_head_bytes(cfg)
        # What the main thread has read of each connection's next request head. Weak: gthread
        # closes and forgets connections (murder_pending, murder_keepalived) on its own.
        self._heads: weakref.WeakKeyDictionary[TConn, bytearray] = weakref.WeakKeyDictionary()

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

    # ---- the main thread: a connection goes to the pool with its whole head

    def enqueue_req(self, conn: TConn) -> None:
        """Wait on the poller for the connection's request head; then hand it to a thread."""
        # gthread calls this for a new connection, for a kept-alive one that turned readable, and
        # for one whose thread read ahead into its next request.
        parser = conn.parser
        read_ahead = parser.unreader.buf.getvalue() if isinstance(parser, Parser) else b""
        if not self._reads_heads or _ends_head(read_ahead) or len(read_ahead) > self._head_limit:
            super().enqueue_req(conn)
            return
        head = self._heads.setdefault(conn, bytearray())
        if isinstance(parser, Parser) and read_ahead:
            # Part of a pipelined head, read ahead by a thread: waited for like any other.
            head += parser.unreader.take_buffered()
        conn.sock.setblocking(False)
        # gthread's deferred connections: closed by murder_pending once this passes.
        conn.timeout = time.monotonic() + self._head_seconds
        self.pending_conns.append(conn)
        self.poller.register(
            conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn)
        )

    def on_pending_socket_readable(self, conn: TConn, client: socket.socket) -> None:
        """Read what arrived of the head; hand the connection over once it is complete."""
        if not self._reads_heads:
            super().on_pending_socket_readable(conn, client)
            return
        head = self._heads.setdefault(conn, bytearray())
        try:
            data = conn.sock.recv(HEAD_READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client
            data = b""
        if data:
            searched = max(len(head) - 3, 0)
            head += data
            if not _ends_head(head, searched) and len(head) <= self._head_limit:
                return
        self.poller.unregister(client)
        self.pending_conns.remove(conn)
        if not data:
            # Closed before its head was complete: there is no request to answer.
            self._heads.pop(conn, None)
            self.nr_conns -= 1
            conn.close()
            return
        conn.data_ready = True  # gthread's thread must not wait for data again
        super().enqueue_req(conn)

    def finish_request(self, conn: TConn, fs: futures.Future[Any]) -> None:
        """Count a connection its pool thread closed as gone, once; leave the rest to gthread."""
        if conn.sock.fileno() >= 0:
            super().finish_request(conn, fs)
            return
        # gthread would close it again: setblocking on the closed socket raises, and its
        # handler then takes the connection off nr_conns a second time. With nr_conns short, a
        # stopping worker believes it has no connections left, and exits at once on a HUP or
        # TERM, cutting the requests its threads are still answering.
        self.nr_conns -= 1

    # ---- a pool thread

    def handle(self, conn: TConn) -> Any:
        """Serve the connection's requests while each next one follows within the wait."""
        head = self._heads.pop(conn, None)
        if head:
            # The bytes the main thread read go back in front of the socket for the parser.
            conn.sock.setblocking(True)
            conn.init()
            if isinstance(conn.parser, Parser):
                conn.parser.unreader.unread(bytes(head))
        while True:
            result = super().handle(conn)
            if result is False and self._reads_heads:
                # gthread's main thread closes an ending connection "gracefully": it lingers
                # up to 2 s reading whatever the client still sends, and for those 2 s serves
                # no other connection. A client dribbling a body it was refused keeps sending.
                # The linger happens here instead, on this thread; the main thread then finds
                # the socket closed.
                util.close_graceful(conn.sock)
            # Anything but a kept-alive HTTP/1 connection of a running worker is gthread's.
            if result is not True or conn.is_http2 or not self.alive:
                return result
            if not isinstance(conn.parser, Parser):
                return result
            # A pipelined request already read ahead is served now, wait or no wait; part of
            # one waits for the rest on the main thread (gthread's finish_request enqueues it).
            read_ahead = conn.parser.unreader.buf.getvalue()
            if read_ahead:
                if _ends_head(read_ahead) or not self._reads_heads:
                    continue
                return result
            if not self._next_request_follows(conn):
                return result

    def _keepalive_after(self, conn: TConn, keepalive: bool) -> bool:
        """Keep the connection only if what is left of the request body has already arrived."""
        # gthread drains a body the app did not read (a 401 before the body, say) before the
        # next request: "up to 5 s", but the deadline is only checked between reads of 1 KiB,
        # each of which waits until 1 KiB has come, so a client sending a byte a second keeps
        # the thread for 17 minutes. Here only what has arrived is read, without waiting; a
        # body still on its way ends the connection (the answer was sent already).
        if not keepalive or not self._reads_heads or not isinstance(conn.parser, Parser):
            return bool(getattr(super(), "_keepalive_after")(conn, keepalive))  # noqa: B009
        conn.sock.setblocking(False)
        try:
            return bool(conn.parser.finish_body())
        except OSError:  # nothing more to read yet (BlockingIOError), or reset
            return False
        finally:
            conn.sock.setblocking(True)

    def _next_request_follows(self, conn: TConn) -> bool:
        """Wait briefly for the next request head, unless threads are short."""
        pool = self.tpool
        if not isinstance(pool, LifoThreadPool) or not pool.has_spare_thread():
            return False
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        if not poller.poll(NEXT_REQUEST_WAIT_MS):
            return False
        if not self._reads_heads:
            return True
        # Only a complete head is read on this thread; the start of one goes to the poller.
        try:
            arrived = conn.sock.recv(HEAD_READ_BYTES, socket.MSG_PEEK)
        except OSError:
            return True  # gthread's parser meets the same error and ends the connection
        # Nothing to peek at once readable: closed by the client, which the parser ends too.
        return not arrived or _ends_head(arrived)
