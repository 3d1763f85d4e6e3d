"""The DashScope client sends what requests would prepare from scratch, over kept connections."""

from __future__ import annotations

import gzip
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import responses

from app.config import Channel
from app.observability.logs import json_formatter
from app.upstream import (
    BASE_HEADERS,
    ChannelAdapter,
    DashScopeClient,
    UpstreamBrokenAnswer,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

UPSTREAM_KEY = "sk-upstream-0123456789"
ANSWER = {"request_id": "r", "output": {"task_id": "t", "task_status": "RUNNING"}}

BASE_URLS = [
    "https://dashscope.test",
    "https://DashScope.TEST:8443/proxy",
    "http://127.0.0.1:8080/dash%20scope",
    "https://bücher.test",
]
TASK_IDS = [
    "0385dc79-5ff8-4d82-bcb6-caa4a9f7a3d9",
    "a b",
    "x%2Fy",
    "../../secrets",
    "ünï~code",
    "id?with=query#frag",
]


def channel(base_url: str, workspace: str | None = None) -> Channel:
    """Return a channel at `base_url`."""
    return Channel(
        name="c", base_url=base_url, api_key=UPSTREAM_KEY, models=frozenset(), workspace=workspace
    )


def from_scratch(
    method: str, url: str, extra: dict[str, str], body: bytes | None = None
) -> requests.PreparedRequest:
    """Return the request requests prepares for this call with nothing reused."""
    headers = {**BASE_HEADERS, **extra, "Authorization": f"Bearer {UPSTREAM_KEY}"}
    return requests.Request(method, url, headers=headers, data=body).prepare()


def sent(upstream: responses.RequestsMock) -> list[requests.PreparedRequest]:
    """Return the requests that reached the wire."""
    return [call.request for call in upstream.calls]


def assert_same(got: requests.PreparedRequest, expected: requests.PreparedRequest) -> None:
    """Fail unless two requests carry the same method, URL, headers and body."""
    assert (got.method, got.url, got.body) == (expected.method, expected.url, expected.body)
    assert dict(got.headers) == dict(expected.headers)


@pytest.fixture
def upstream() -> responses.RequestsMock:
    """Answer every call with a running task."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for method in (responses.GET, responses.POST):
            mock.add(method, re.compile(".*"), json=ANSWER)
        yield mock


@pytest.mark.parametrize("base_url", BASE_URLS)
@pytest.mark.parametrize("task_id", TASK_IDS)
def test_queries_and_cancels_match_a_fresh_preparation(
    upstream: responses.RequestsMock, base_url: str, task_id: str
) -> None:
    client = DashScopeClient(1, 1, query_retries=0)
    client.query_task(channel(base_url), task_id)
    client.cancel_task(channel(base_url), task_id)
    query, cancel = sent(upstream)
    assert_same(query, from_scratch("GET", f"{base_url}/api/v1/tasks/{task_id}", {}))
    assert_same(cancel, from_scratch("POST", f"{base_url}/api/v1/tasks/{task_id}/cancel", {}))


@pytest.mark.parametrize("base_url", BASE_URLS)
def test_submits_match_a_fresh_preparation_and_headers_do_not_leak(
    upstream: responses.RequestsMock, base_url: str
) -> None:
    client = DashScopeClient(1, 1)
    target = channel(base_url, workspace="ws-1")
    service = "services/aigc/video-generation/video-synthesis"
    body = json.dumps({"model": "m", "input": {"prompt": "ünï"}}).encode()
    inspected = {"X-DashScope-DataInspection": "enable", "X-Not-Forwarded": "1"}
    client.submit_task(target, service, body, inspected)
    client.submit_task(target, service, b"{}")
    first, second = sent(upstream)
    extra = {
        "Content-Type": "application/json",
        "X-DashScope-Async": "enable",
        "X-DashScope-WorkSpace": "ws-1",
    }
    url = f"{base_url}/api/v1/{service}"
    inspection = {"X-DashScope-DataInspection": "enable"}
    assert_same(first, from_scratch("POST", url, {**extra, **inspection}, body))
    # The first call's forwarded header and length stay with it, not with the next call.
    assert_same(second, from_scratch("POST", url, extra, b"{}"))


# What a real server saw of each call: the client's port, its Cookie header, its request target.
Seen = tuple[int, str | None, str]


class _Server(ThreadingHTTPServer):
    # Handler threads wait on kept-alive connections; closing must not wait for them.
    block_on_close = False

    @classmethod
    def start(cls, handler: type[BaseHTTPRequestHandler]) -> _Server:
        """Serve `handler` on a free local port, on a thread of its own."""
        server = cls(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return server

    @property
    def origin(self) -> str:
        """Return the server's `http://host:port`."""
        return f"http://127.0.0.1:{self.server_port}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()


class _Recorder(BaseHTTPRequestHandler):
    """Answer every request with a running task and a cookie; remember who asked for what."""

    protocol_version = "HTTP/1.1"  # keep-alive, as DashScope's load balancers speak
    seen: list[Seen]

    def do_GET(self) -> None:
        self.seen.append((self.client_address[1], self.headers.get("Cookie"), self.path))
        body = json.dumps(ANSWER).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "acw_tc=tenant-a; Path=/")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Print nothing."""


@pytest.fixture
def origins() -> Iterator[list[tuple[str, list[Seen]]]]:
    """Start ten real HTTP servers; return each one's origin and the requests it saw."""
    started = []
    for _ in range(10):
        seen: list[Seen] = []
        started.append((_Server.start(type("Handler", (_Recorder,), {"seen": seen})), seen))
    yield [(server.origin, seen) for server, seen in started]
    for server, _ in started:
        server.stop()


def test_each_origin_keeps_its_connection_and_sends_no_cookie(
    origins: list[tuple[str, list[Seen]]],
) -> None:
    client = DashScopeClient(2, 2, query_retries=0)
    (first, first_seen), (second, second_seen) = origins[:2]
    for _ in range(3):
        for origin in (first, second):
            assert client.query_task(channel(origin), "t-1").task_status == "RUNNING"
    # One connection per origin, reused: the client port never changes.
    assert [len(first_seen), len(second_seen)] == [3, 3]
    assert len({port for port, _, _ in first_seen}) == 1
    assert len({port for port, _, _ in second_seen}) == 1
    # One session serves every account: a cookie an answer sets never rides on a later call.
    assert [cookie for _, cookie, _ in first_seen + second_seen] == [None] * 6


class _HeaderRecorder(BaseHTTPRequestHandler):
    """Answer every GET and POST with a running task; remember each request's headers."""

    protocol_version = "HTTP/1.1"
    headers_seen: list[dict[str, str]]

    def do_GET(self) -> None:
        self.headers_seen.append(dict(self.headers.items()))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps(ANSWER).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        """Print nothing."""


def test_each_call_sends_only_the_headers_it_needs() -> None:
    headers_seen: list[dict[str, str]] = []
    server = _Server.start(type("Handler", (_HeaderRecorder,), {"headers_seen": headers_seen}))
    try:
        client = DashScopeClient(2, 2, query_retries=0)
        target = channel(server.origin)
        client.query_task(target, "t-1")
        client.cancel_task(target, "t-1")
        client.submit_task(target, "services/aigc/video-generation/video-synthesis", b"{}")
    finally:
        server.stop()
    common = {
        "Host": server.origin.removeprefix("http://"),
        "User-Agent": "bailian-gateway/0.1",
        "Accept-Encoding": requests.utils.DEFAULT_ACCEPT_ENCODING,
        "Authorization": f"Bearer {UPSTREAM_KEY}",
    }
    # No `Accept: */*` or `Connection: keep-alive`: HTTP/1.1 means both without them.
    assert headers_seen == [
        common,
        {**common, "Content-Length": "0"},
        {
            **common,
            "Content-Type": "application/json",
            "X-DashScope-Async": "enable",
            "Content-Length": "2",
        },
    ]


def test_more_origins_than_pools_each_get_their_own_calls(
    origins: list[tuple[str, list[Seen]]],
) -> None:
    # A thread's session keeps eight pools: ten origins in turn make it let the oldest go
    # each time, and every call must still reach its own origin.
    client = DashScopeClient(2, 2, query_retries=0)
    for _ in range(3):
        for origin, _ in origins:
            assert client.query_task(channel(origin), "t-1").status == 200
    assert [len(seen) for _, seen in origins] == [3] * 10


@pytest.mark.parametrize("base_path", ["", "/dash%20scope", "/bücher"])
def test_each_call_sends_the_request_target_requests_would(
    origins: list[tuple[str, list[Seen]]], base_path: str
) -> None:
    # `responses` stands in for the adapter's send, so only a real server sees the target the
    # adapter cuts from the URL.
    client = DashScopeClient(2, 2, query_retries=0)
    origin, seen = origins[0]
    base_url = f"{origin}{base_path}"
    for task_id in TASK_IDS:
        assert client.query_task(channel(base_url), task_id).status == 200
    expected = [
        from_scratch("GET", f"{base_url}/api/v1/tasks/{task_id}", {}).path_url
        for task_id in TASK_IDS
    ]
    assert [target for _, _, target in seen] == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://dashscope.test/api/v1/tasks/t-1",
        "https://user:secret@dashscope.test:8443/p/api/v1/tasks/t-1?a=1&b=%20",
        "https://dashscope.test/api/v1/tasks/t-1#fragment",
        "https://dashscope.test/api/v1/tasks/t-1?",
        "https://dashscope.test/api/v1/tasks/t-1?a#b",
        "https://dashscope.test",
        "https://dashscope.test?a=1",
    ],
)
def test_the_adapter_cuts_the_request_target_requests_would(url: str) -> None:
    prepared = requests.Request("GET", "https://dashscope.test").prepare()
    prepared.url = url  # as given: preparing would already drop an empty query
    expected = requests.adapters.HTTPAdapter().request_url(prepared, {})
    assert ChannelAdapter().request_url(prepared, {}) == expected


class _HalfAnswer(BaseHTTPRequestHandler):
    """Send the headers and part of a body, then close the connection or fall silent."""

    protocol_version = "HTTP/1.1"
    then_stall = False

    def do_GET(self) -> None:
        body = json.dumps(ANSWER).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:10])
        self.wfile.flush()
        if self.then_stall:
            time.sleep(1.5)  # past the client's read timeout
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        """Print nothing."""


@pytest.mark.parametrize(
    ("then_stall", "expected"),
    [(False, UpstreamBrokenAnswer), (True, UpstreamTimeout)],
    ids=["cut-short", "stalled"],
)
def test_a_body_that_stops_halfway_is_a_typed_failure(
    then_stall: bool, expected: type[UpstreamError]
) -> None:
    server = _Server.start(type("Handler", (_HalfAnswer,), {"then_stall": then_stall}))
    try:
        client = DashScopeClient(2, 0.5, query_retries=0)
        with pytest.raises(UpstreamError) as raised:
            client.query_task(channel(server.origin), "t-1")
        assert type(raised.value) is expected
        assert UPSTREAM_KEY not in str(raised.value)
    finally:
        server.stop()


class _RawServer:
    """A listening socket whose connections each get the request head read, then `answer`."""

    def __init__(self, answer: Callable[[socket.socket], None], read_head: bool = True) -> None:
        self.answer = answer
        self.read_head = read_head
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.origin = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                head = b"" if self.read_head else b"\r\n\r\n"
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                try:
                    self.answer(conn)
                except OSError as exc:  # the client hung up: what some tests expect
                    self.errors.append(exc)

    def close(self) -> None:
        """Stop accepting connections (again: a no-op)."""
        if self.listener.fileno() != -1:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept; close would not
            self.listener.close()
        self.thread.join(5)


@pytest.fixture
def raw_server() -> Iterator[Callable[..., _RawServer]]:
    """Return a starter of raw answering servers, closed after the test."""
    started: list[_RawServer] = []

    def start(answer: Callable[[socket.socket], None], read_head: bool = True) -> _RawServer:
        started.append(_RawServer(answer, read_head))
        return started[-1]

    yield start
    for server in started:
        server.close()


def _head(status: str = "200 OK", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_the_read_timeout_bounds_the_whole_answer_not_each_read(
    raw_server: Callable[..., _RawServer], framing: str
) -> None:
    body = json.dumps(ANSWER).encode()

    def drip(conn: socket.socket) -> None:
        if framing == "length":
            conn.sendall(_head(Content_Length=str(len(body))))
        else:
            conn.sendall(_head(Transfer_Encoding="chunked"))
        for byte in body:  # a byte every 0.2 s: each read is quick, the answer is not
            piece = bytes([byte])
            conn.sendall(piece if framing == "length" else b"1\r\n" + piece + b"\r\n")
            time.sleep(0.2)

    server = raw_server(drip)
    client = DashScopeClient(2, 1.0, query_retries=0)
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout):
        client.query_task(channel(server.origin), "t-1")

    assert time.monotonic() - started < 1.6  # the read timeout and one drip, not 14 s


def _drip_head(conn: socket.socket) -> None:
    body = json.dumps(ANSWER).encode()
    head = _head(Content_Length=str(len(body)), X_Pad="x" * 60)
    for byte in head:  # a byte every 0.1 s: each recv is quick, the head takes 10 s
        conn.sendall(bytes([byte]))
        time.sleep(0.1)
    conn.sendall(body)


@pytest.mark.parametrize("operation", ["query", "submit"])
def test_the_read_timeout_bounds_an_answer_head_that_trickles_in(
    raw_server: Callable[..., _RawServer], operation: str
) -> None:
    server = raw_server(_drip_head)
    client = DashScopeClient(2, 1.0, query_retries=2)
    call = {
        "query": lambda: client.query_task(channel(server.origin), "t-1"),
        "submit": lambda: client.submit_task(channel(server.origin), "services/x", b"{}"),
    }[operation]
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout) as raised:
        call()

    # The read timeout and the watch's interval, not 10 s; a query is not retried either.
    assert time.monotonic() - started < 1.6
    assert raised.value.cause == "timeout"


def test_the_read_timeout_counts_the_head_and_the_body_together(
    raw_server: Callable[..., _RawServer],
) -> None:
    body = json.dumps(ANSWER).encode()

    def slow_head_then_slow_body(conn: socket.socket) -> None:
        conn.sendall(_head(Content_Length=str(len(body)))[:-2])
        time.sleep(0.7)  # each part is within the timeout, both together are not
        conn.sendall(b"\r\n")
        for start in range(0, len(body), 4):
            conn.sendall(body[start : start + 4])
            time.sleep(0.05)

    server = raw_server(slow_head_then_slow_body)
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout):
        DashScopeClient(2, 1.0, query_retries=0).query_task(channel(server.origin), "t-1")

    assert time.monotonic() - started < 1.4


def test_calls_after_a_head_that_timed_out_are_answered(
    raw_server: Callable[..., _RawServer],
) -> None:
    body = json.dumps(ANSWER).encode()
    calls: list[int] = []

    def first_drips(conn: socket.socket) -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            _drip_head(conn)
        else:
            conn.sendall(_head(Content_Length=str(len(body))) + body)

    server = raw_server(first_drips)
    client = DashScopeClient(2, 1.0, query_retries=0)
    with pytest.raises(UpstreamTimeout):
        client.query_task(channel(server.origin), "t-1")

    answered = [client.query_task(channel(server.origin), "t-1") for _ in range(3)]

    assert [answer.data for answer in answered] == [ANSWER] * 3


def test_an_answer_that_comes_in_pieces_within_the_timeout_is_read(
    raw_server: Callable[..., _RawServer],
) -> None:
    body = json.dumps(ANSWER).encode()

    def in_pieces(conn: socket.socket) -> None:
        conn.sendall(_head(Content_Length=str(len(body))))
        for start in range(0, len(body), 10):
            conn.sendall(body[start : start + 10])
            time.sleep(0.02)

    server = raw_server(in_pieces)
    answer = DashScopeClient(2, 2, query_retries=0).query_task(channel(server.origin), "t-1")

    assert (answer.status, answer.body, answer.data) == (200, body, ANSWER)


def _sender_of(megabytes: int, sent: list[int], **headers: str) -> Callable[[socket.socket], None]:
    """Return an answer of `megabytes` MiB of a JSON string, counting the bytes sent."""

    def send(conn: socket.socket) -> None:
        conn.sendall(_head(**headers))
        chunked = headers.get("Transfer_Encoding") == "chunked"
        piece = b"x" * 2**20
        sent.append(0)
        conn.sendall(b'{"pad": "' if not chunked else b'9\r\n{"pad": "\r\n')
        for _ in range(megabytes):
            conn.sendall(piece if not chunked else b"%x\r\n%s\r\n" % (len(piece), piece))
            sent[-1] += len(piece)

    return send


def test_an_answer_over_max_answer_bytes_by_its_length_is_never_read(
    raw_server: Callable[..., _RawServer],
) -> None:
    sent: list[int] = []
    server = raw_server(_sender_of(100, sent, Content_Length=str(100 * 2**20 + 9)))
    client = DashScopeClient(2, 5, query_retries=0, max_answer_bytes=64 * 1024)

    with pytest.raises(UpstreamBrokenAnswer, match="over 65536 bytes"):
        client.query_task(channel(server.origin), "t-1")

    server.close()
    assert sent[0] < 100 * 2**20  # the gateway hung up: the server could not send it all
    assert server.errors


def test_an_answer_over_max_answer_bytes_without_a_length_is_cut_at_the_cap(
    raw_server: Callable[..., _RawServer],
) -> None:
    sent: list[int] = []
    server = raw_server(_sender_of(100, sent, Transfer_Encoding="chunked"))
    client = DashScopeClient(2, 5, query_retries=0, max_answer_bytes=64 * 1024)

    with pytest.raises(UpstreamBrokenAnswer, match="over 65536 bytes"):
        client.query_task(channel(server.origin), "t-1")

    server.close()
    assert sent[0] < 100 * 2**20
    assert server.errors


def test_a_compressed_answer_is_capped_after_decompression(
    raw_server: Callable[..., _RawServer],
) -> None:
    # 64 MiB of JSON in a few hundred kB of gzip: the cap is on what the gateway would hold.
    compressed = gzip.compress(b'{"pad": "' + b"x" * 64 * 2**20 + b'"}', compresslevel=1)

    def bomb(conn: socket.socket) -> None:
        conn.sendall(_head(Content_Length=str(len(compressed)), Content_Encoding="gzip"))
        conn.sendall(compressed)

    server = raw_server(bomb)
    client = DashScopeClient(2, 5, query_retries=0, max_answer_bytes=2**20)

    with pytest.raises(UpstreamBrokenAnswer, match="over 1048576 bytes"):
        client.query_task(channel(server.origin), "t-1")


def test_an_answer_of_exactly_max_answer_bytes_is_read(
    raw_server: Callable[..., _RawServer],
) -> None:
    limit = 200 * 1024
    body = b'{"request_id": "r", "pad": "' + b"x" * (limit - 30) + b'"}'
    assert len(body) == limit

    def exact(conn: socket.socket) -> None:
        conn.sendall(_head(Transfer_Encoding="chunked"))
        conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))

    server = raw_server(exact)
    client = DashScopeClient(2, 5, query_retries=0, max_answer_bytes=limit)

    assert client.query_task(channel(server.origin), "t-1").body == body


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _reset(conn: socket.socket) -> None:
    # SO_LINGER with a zero timeout: close sends a RST, not a FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _silent(_conn: socket.socket) -> None:
    time.sleep(1.0)  # past the client's read timeout


def _half_body(conn: socket.socket) -> None:
    conn.sendall(_head(Content_Length="100") + b'{"request_id"')


def _plain_http(conn: socket.socket) -> None:
    conn.sendall(_head(Content_Length="2") + b"{}")


@pytest.mark.parametrize(
    ("where", "failure", "cause"),
    [
        ("closed-port", UpstreamUnreachable, "refused"),
        ("unknown-host", UpstreamUnreachable, "dns"),
        ("tls-to-plain-http", UpstreamBrokenAnswer, "tls"),
        ("silent", UpstreamTimeout, "timeout"),
        ("reset", UpstreamBrokenAnswer, "reset"),
        ("closed-without-answer", UpstreamBrokenAnswer, "closed"),
        ("cut-short", UpstreamBrokenAnswer, "cut_short"),
    ],
)
def test_a_failed_call_is_logged_with_its_cause_and_no_url_or_key(
    raw_server: Callable[..., _RawServer],
    caplog: pytest.LogCaptureFixture,
    where: str,
    failure: type[UpstreamError],
    cause: str,
) -> None:
    answers: dict[str, Callable[[socket.socket], None]] = {
        "tls-to-plain-http": _plain_http,
        "silent": _silent,
        "reset": _reset,
        "closed-without-answer": lambda _conn: None,
        "cut-short": _half_body,
    }
    if where == "closed-port":
        base_url = f"http://127.0.0.1:{_closed_port()}"
    elif where == "unknown-host":
        base_url = "http://dashscope.invalid"
    else:
        tls = where.startswith("tls")
        origin = raw_server(answers[where], read_head=not tls).origin  # no head in a handshake
        base_url = origin.replace("http://", "https://") if tls else origin
    client = DashScopeClient(2, 0.5, query_retries=0)

    with pytest.raises(UpstreamError) as raised:
        client.query_task(channel(base_url), "t-1")

    assert type(raised.value) is failure
    assert raised.value.cause == cause
    [record] = [r for r in caplog.records if r.name == "bailian_gateway.upstream"]
    assert (record.levelname, getattr(record, "cause", None)) == ("WARNING", cause)
    assert record.getMessage() == f"upstream query: {failure.outcome} ({cause})"
    line = json_formatter().format(record)
    for secret in (UPSTREAM_KEY, base_url.split("//")[1]):
        assert secret not in line


def test_an_answered_call_is_logged_at_debug_without_a_cause(
    upstream: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bailian_gateway")
    DashScopeClient(1, 1, query_retries=0).query_task(channel("https://dashscope.test"), "t-1")

    [record] = [r for r in caplog.records if r.name == "bailian_gateway.upstream"]
    assert (record.levelname, record.getMessage(), getattr(record, "cause", "unset")) == (
        "DEBUG",
        "upstream query: ok",
        None,
    )


def test_an_answer_of_an_error_status_is_logged_at_info(
    upstream: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.reset()
    upstream.get(
        "https://dashscope.test/api/v1/tasks/t-1",
        status=400,
        json={"code": "InvalidParameter", "message": "bad", "request_id": "r-1"},
    )
    caplog.set_level(logging.INFO, logger="bailian_gateway")
    DashScopeClient(1, 1, query_retries=0).query_task(channel("https://dashscope.test"), "t-1")

    [record] = [r for r in caplog.records if r.name == "bailian_gateway.upstream"]
    assert (record.levelname, record.getMessage(), record.status) == (
        "INFO",
        "upstream query: http_error",
        400,
    )
