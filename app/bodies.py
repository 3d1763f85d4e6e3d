"""Reading a submit body the way the gateway and DashScope must agree on it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

OSS_SCHEME = "oss://"


class BodyTimeout(Exception):
    """The client did not send the whole request body within the deadline."""


class _Watched:
    """A socket whose body must have arrived by `deadline` (time.monotonic())."""

    __slots__ = ("deadline", "fired", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.fired = False


class DeadlineWatch:
    """Shut the read side of a socket whose deadline passed, so its reader stops waiting.

    A socket timeout bounds each recv, not a whole read: gunicorn reads a body of known length
    until it has what it asked for (and http.client an answer's head until its blank line), and
    a peer sending a byte a second would never trip it. One thread per process and watch looks
    at the watched sockets every `interval` seconds (adding one wakes nobody); past its
    deadline, a socket's read side is shut, and the blocked read returns at once as if the
    peer had stopped. An answer can still be written.
    """

    def __init__(self, interval: float, name: str = "body-deadlines") -> None:
        self._interval = interval
        self._name = name
        self._lock = threading.Lock()
        self._watched: set[_Watched] = set()
        self._thread_pid = 0

    def add(self, sock: socket.socket, deadline: float) -> _Watched:
        """Watch the socket until `remove`."""
        watched = _Watched(sock, deadline)
        with self._lock:
            self._watched.add(watched)
            # Started on first use in each process: a forked worker has no thread of its parent.
            if self._thread_pid != os.getpid():
                self._thread_pid = os.getpid()
                threading.Thread(target=self._run, name=self._name, daemon=True).start()
        return watched

    def remove(self, watched: _Watched) -> None:
        """Stop watching; once this returns, the socket is not shut any more."""
        with self._lock:
            self._watched.discard(watched)

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            now = time.monotonic()
            with self._lock:
                late = [w for w in self._watched if w.deadline <= now]
                for watched in late:
                    self._watched.discard(watched)
                    watched.fired = True
                    # The plain socket's shutdown, also under TLS: SSLSocket.shutdown would
                    # drop its TLS state while another thread reads, and the answer written
                    # after would go out unencrypted.
                    with contextlib.suppress(OSError):  # closed meanwhile
                        socket.socket.shutdown(watched.sock, socket.SHUT_RD)


# A quarter of a second late at most: a body deadline is tens of seconds.
BODY_DEADLINES = DeadlineWatch(interval=0.25)


def read_within(stream: IO[bytes], sock: socket.socket | None, seconds: float) -> bytes:
    """Read the whole body from `stream`, the client's socket under it, within `seconds`.

    gunicorn reads a body from a blocking socket with no time limit: a client that sends its
    body a byte at a time, or stops half-way, would keep the request's thread for as long as
    it keeps the connection open. Here the thread is back within `seconds` (and a quarter),
    whatever the client does, and the connection is closed after the answer (gunicorn saw the
    body's read fail). Without the socket (another server, a test client) the body is read as
    it comes.
    """
    if sock is None:
        return stream.read()
    watched = BODY_DEADLINES.add(sock, time.monotonic() + seconds)
    try:
        body = stream.read()
    except Exception:
        # A read cut short by the shut socket: Werkzeug may report it as the client leaving.
        if watched.fired:
            raise BodyTimeout from None
        raise
    finally:
        BODY_DEADLINES.remove(watched)
    # Or as the end of the body: what was read is then only part of it. (Shut at the very
    # moment the last byte came, the body is whole but late: refused alike.)
    if watched.fired:
        raise BodyTimeout
    return body


class DuplicateKey(ValueError):
    """A JSON object in the body names the same member twice."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def loads_unique(raw: bytes) -> Any:
    """Parse JSON, refusing any object that repeats a key."""
    # Parsers disagree on which of two equal keys wins: the gateway would check one model or URL
    # and DashScope act on the other, so neither may be chosen.
    return json.loads(raw, object_pairs_hook=_unique_object)


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


def oss_urls(value: Any, path: str = "input") -> Iterator[tuple[str, str]]:
    """Yield (field path, url) for every `oss://` string anywhere in a value."""
    if isinstance(value, str):
        if value.startswith(OSS_SCHEME):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from oss_urls(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from oss_urls(item, f"{path}[{index}]")
