"""The DashScope client: a Session per thread, timeouts, retries and typed exceptions."""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http.client import IncompleteRead, RemoteDisconnected
from typing import Any, ClassVar
from urllib.parse import urlencode

import requests
from requests.adapters import HTTPAdapter
from requests.utils import get_encoding_from_headers
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import ConnectionPool, HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    HTTPError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.response import HTTPResponse
from urllib3.util.retry import Retry

from app.bodies import DeadlineWatch
from app.config import DEFAULT_MAX_ANSWER_BYTES, Channel
from app.observability import metrics

log = logging.getLogger("bailian_gateway.upstream")

USER_AGENT = "bailian-gateway/0.1"
# What every call sends besides its own headers: the gateway's name and the encodings it reads.
# Not requests' `Accept: */*` and `Connection: keep-alive`: they say what their absence means in
# HTTP/1.1, and every header costs each call a copy, a check and an encoding.
BASE_HEADERS = {"User-Agent": USER_AGENT, "Accept-Encoding": requests.utils.DEFAULT_ACCEPT_ENCODING}
# Headers a client may send that DashScope honours and that mean the same through a gateway.
OSS_RESOLVE_HEADER = "X-DashScope-OssResourceResolve"
FORWARDED_SUBMIT_HEADERS = ("X-DashScope-DataInspection", OSS_RESOLVE_HEADER)
# Each operation's method and the headers it adds to BASE_HEADERS and the channel's key.
OPERATIONS: dict[str, tuple[str, dict[str, str]]] = {
    "submit": ("POST", {"Content-Type": "application/json", "X-DashScope-Async": "enable"}),
    # A synchronous service (a face check): DashScope refuses the async header there with 403.
    "check": ("POST", {"Content-Type": "application/json"}),
    "query": ("GET", {}),
    "policy": ("GET", {}),
    "cancel": ("POST", {}),
    "list": ("GET", {}),
}
# DashScope's task ids are UUIDs; anything else is not one of ours and never reaches the database
# (or a URL, a header, a log line): an answer naming one is a broken answer.
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# DashScope's task statuses are short upper-case words (PENDING, RUNNING...), in a column of 32.
TASK_STATUS_PATTERN = re.compile(r"[A-Z][A-Z_]{0,31}")
# Task paths (under /api/v1/), logged as templates so that one log field and one label group
# every task.
TASK_PATH = re.compile(r"tasks/(?P<task_id>[^/]+)(?P<action>/[a-z]+)?")
# The most of an answer's body read at once: small enough not to allocate the whole cap for
# each read, large enough that a big answer takes few of them.
READ_CHUNK_BYTES = 64 * 1024
# What an upstream request id keeps: visible ASCII, up to a length far past a UUID's.
UNSAFE_REQUEST_ID_CHARACTERS = re.compile(r"[^!-~]+")
MAX_REQUEST_ID_LENGTH = 128
# Paths that requests' URL preparation returns unchanged: unreserved characters and slashes,
# no dot (urllib3 resolves dot segments), no percent sign, query or fragment.
PLAIN_PATH = re.compile(r"[A-Za-z0-9_~/-]*")
# Late by a tenth of a second at most: a read timeout is seconds. One thread per process.
ANSWER_DEADLINES = DeadlineWatch(interval=0.1, name="answer-deadlines")


class UpstreamError(Exception):
    """DashScope could not be asked, or did not answer usably."""

    # True when the request provably created nothing upstream, so another channel may be tried.
    nothing_created: ClassVar[bool] = False
    # How metrics and logs name this failure.
    outcome: ClassVar[str] = "broken"

    def __init__(
        self, channel: str, detail: str, *, cause: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(f"channel {channel}: {detail}")
        self.channel = channel
        # What the upstream log line names it by: refused, dns, tls, timeout, reset...
        self.cause = cause
        # The HTTP status of an answer that came but could not be used.
        self.status = status


class UpstreamUnreachable(UpstreamError):
    """The connection failed before the request was sent."""

    nothing_created = True
    outcome = "unreachable"


class UpstreamTimeout(UpstreamError):
    """The request was sent but no answer came within the read timeout."""

    outcome = "timeout"


class UpstreamBrokenAnswer(UpstreamError):
    """The connection broke after sending, or the answer was not DashScope's JSON."""


class UpstreamThrottled(UpstreamError):
    """DashScope (or a front of it) answered 429, without DashScope's JSON error to relay."""

    # A refusal: the request created nothing, and another channel may take it.
    nothing_created = True
    outcome = "http_error"  # an answer with a status, as a JSON 429 is


@dataclass(frozen=True)
class UpstreamAnswer:
    """An HTTP answer from DashScope: its status, its bytes (as sent, if UTF-8), and its JSON."""

    status: int
    body: bytes
    data: dict[str, Any]

    @property
    def output(self) -> dict[str, Any]:
        """Return the answer's `output` object, or an empty one."""
        output = self.data.get("output")
        return output if isinstance(output, dict) else {}

    @property
    def request_id(self) -> str | None:
        """Return DashScope's request id, fit for a response header and a log line."""
        value = self.data.get("request_id")
        if not isinstance(value, str):
            return None
        # It becomes X-Request-Id: a CR or LF would split the header, and anything but visible
        # ASCII is no id DashScope makes (UUIDs), so it is dropped, as is a length no id has.
        value = UNSAFE_REQUEST_ID_CHARACTERS.sub("", value)[:MAX_REQUEST_ID_LENGTH]
        return value or None

    @property
    def task_id(self) -> str | None:
        """Return the task id in the answer, if it is one DashScope makes."""
        value = self.output.get("task_id")
        return value if isinstance(value, str) and TASK_ID_PATTERN.fullmatch(value) else None

    @property
    def task_status(self) -> str | None:
        """Return the task status in the answer, if it is one DashScope writes."""
        value = self.output.get("task_status")
        # Stored in a column of 32 and compared with DashScope's words: anything else would
        # fail the write (PostgreSQL) or leave a task neither running nor final.
        return value if isinstance(value, str) and TASK_STATUS_PATTERN.fullmatch(value) else None


# The cause a failed call is logged with: the first of these met along its exception's chain
# (requests' error, urllib3's, the socket's), outermost first. Types only: their text may hold
# a URL.
CAUSES: tuple[tuple[type[BaseException], str], ...] = (
    (NameResolutionError, "dns"),
    (socket.gaierror, "dns"),
    (ConnectionRefusedError, "refused"),
    (RemoteDisconnected, "closed"),  # before "reset": it is a ConnectionResetError too
    (ConnectionResetError, "reset"),
    (BrokenPipeError, "reset"),
    (SSLError, "tls"),
    (ssl.SSLError, "tls"),
    (ssl.CertificateError, "tls"),
    (TimeoutError, "timeout"),  # the socket's (urllib3's own timeouts wrap one)
    (IncompleteRead, "cut_short"),
    (DecodeError, "bad_content_encoding"),
)


def _cause_of(error: BaseException) -> str:
    """Return the CAUSES name of a failure, else `other`."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        for kind, cause in CAUSES:
            if isinstance(current, kind):
                return cause
        # urllib3 keeps the error it wraps in `reason` (MaxRetryError) or in its arguments
        # (ProtocolError), requests in its arguments, Python in the chain.
        linked = (current.__cause__, current.__context__, getattr(current, "reason", None))
        pending += [e for e in (*linked, *current.args) if isinstance(e, BaseException)]
    return "other"


def _urllib3_reason(exc: requests.ConnectionError) -> object:
    # requests wraps urllib3's error (in a MaxRetryError when it came from sending); its type
    # tells "never connected" from "connected, sent, then lost the connection" (which may have
    # created a task) and from "the answer stopped coming".
    reason = exc.args[0] if exc.args else None
    return reason.reason if isinstance(reason, MaxRetryError) else reason


class ChannelAdapter(HTTPAdapter):
    """requests' HTTP adapter, minus per-call work whose outcome is fixed for a channel."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # One pool per origin and TLS setting: as few as the configuration has channel hosts.
        self._pools: dict[tuple[str, Any, Any], ConnectionPool] = {}

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: Any,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> ConnectionPool:
        """Return the connection pool of the request's origin, looked up once per origin."""
        # requests parses the URL and rebuilds urllib3's pool key (some thirty normalised
        # fields) on every call: a twentieth of a task query's CPU, for an answer that only
        # the origin and the TLS settings decide.
        if proxies or not request.url:
            return _with_timed_answers(
                super().get_connection_with_tls_context(request, verify, proxies, cert)
            )
        key = (_origin(request.url), verify, cert)
        pool = self._pools.get(key)
        if pool is None:
            pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
            self._pools[key] = _with_timed_answers(pool)
        return pool

    def request_url(
        self, request: requests.PreparedRequest, proxies: Mapping[str, str] | None
    ) -> str:
        """Return the path and query to send, as requests would, without parsing the URL."""
        # requests parses the whole URL three times to learn that no proxy applies and to cut
        # the path from it (2% of a task query's CPU); without a proxy the answer is the part
        # after the origin. A fragment or an empty query is left to requests, which drops them.
        url = request.url or ""
        path = url[len(_origin(url)) :]
        if proxies or not path.startswith("/") or "#" in path or path.endswith("?"):
            return super().request_url(request, proxies)
        return path

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        """Wrap urllib3's response as requests does, minus its cookies and a copy of its headers."""
        # The gateway answers with DashScope's body, never its cookies, and one session serves
        # every account: filling a cookie jar from each answer (2% of a task query's CPU)
        # would be work that nothing reads.
        response = requests.Response()
        response.status_code = resp.status
        # urllib3's headers are a case-insensitive mapping already: requests copies them into
        # its own (1% of a task query's CPU), which only changes their type.
        response.headers = resp.headers
        response.encoding = get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url or ""
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        """Close the pools, and forget them."""
        # The PoolManager may have let go of a pool kept here: close those too.
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        super().close()


class _TimedHTTPConnection(HTTPConnection):
    """urllib3's connection, whose answer's head must come within the read timeout."""

    # When the whole answer must have come (time.monotonic()); None: no read timeout.
    answer_deadline: float | None = None

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]  # as urllib3's own
        """Read the answer's head, as a timeout if it has not come by the deadline."""
        # urllib3 calls this once the request is sent, its `timeout` set to the read timeout:
        # each recv's bound, not the head's. A head that trickles in would hold the thread for
        # as long as it lasts, so the socket is shut at the deadline, which the body keeps to.
        seconds = self.timeout
        if not isinstance(seconds, int | float) or self.sock is None:
            self.answer_deadline = None
            return super().getresponse()
        self.answer_deadline = time.monotonic() + seconds
        watched = ANSWER_DEADLINES.add(self.sock, self.answer_deadline)
        try:
            response = super().getresponse()
        except Exception:
            if watched.fired:  # the shut socket read as a peer that left: it was the deadline
                raise _head_timeout() from None
            raise
        finally:
            ANSWER_DEADLINES.remove(watched)
        if watched.fired:
            # The head came as the socket was shut (or was cut short by it and read as whole):
            # late either way, and the socket reads nothing more.
            response.close()
            raise _head_timeout()
        return response


class _TimedHTTPSConnection(_TimedHTTPConnection, HTTPSConnection):
    """urllib3's TLS connection, whose answer's head must come within the read timeout."""


def _head_timeout() -> TimeoutError:
    # The socket's own timeout error: urllib3 makes a ReadTimeoutError of it and drops the
    # connection, as for a recv that timed out.
    return TimeoutError("read timeout: the answer's head came too slowly")


def _with_timed_answers(pool: ConnectionPool) -> ConnectionPool:
    """Return the pool, making its connections bound each answer's head by the read timeout."""
    # Before the pool's first request: it makes its connections when a request needs one.
    if isinstance(pool, HTTPSConnectionPool):
        pool.ConnectionCls = _TimedHTTPSConnection
    elif isinstance(pool, HTTPConnectionPool):
        pool.ConnectionCls = _TimedHTTPConnection
    return pool


def _origin(url: str) -> str:
    """Return a prepared URL's scheme and authority: `https://host:port`."""
    authority = url.find("//") + 2
    path = url.find("/", authority)
    return url if path < 0 else url[:path]


class DashScopeClient:
    """Submit tasks to and query tasks from DashScope channels."""

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        query_retries: int = 2,
        *,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
    ) -> None:
        # The read timeout bounds each answer whole, head and body, from when its request has
        # been sent: the head by its connection (_TimedHTTPConnection), the body by _read_body.
        self.timeout = (connect_timeout, read_timeout)
        self.query_retries = query_retries
        self.max_answer_bytes = max_answer_bytes
        self._local = threading.local()
        # The prepared request of each channel and operation, copied for every call.
        self._templates: dict[tuple[Channel, str], requests.PreparedRequest] = {}

    def _sessions(self) -> tuple[requests.Session, requests.Session]:
        # One pair per thread: requests.Session is not thread-safe, and a thread's session
        # keeps its upstream connections alive between requests.
        sessions = getattr(self._local, "sessions", None)
        if sessions is None:
            # Submits never retry inside the client: a resend may bill a second video, and
            # failing over to another channel is the caller's decision.
            submit = self._new_session(Retry(total=0, read=False, redirect=False))
            query = self._new_session(
                Retry(
                    total=self.query_retries,
                    connect=self.query_retries,
                    read=0,
                    status=self.query_retries,
                    other=0,
                    redirect=False,
                    allowed_methods=frozenset({"GET"}),
                    status_forcelist=frozenset({502, 503, 504}),
                    backoff_factor=0.2,
                    backoff_max=2.0,
                    raise_on_status=False,
                    respect_retry_after_header=False,
                )
            )
            sessions = self._local.sessions = (submit, query)
        return sessions

    @staticmethod
    def _new_session(retry: Retry) -> requests.Session:
        session = requests.Session()
        # Proxies and .netrc from the environment would be read on every request; a
        # gateway's upstream route is its configuration, not its environment.
        session.trust_env = False
        adapter = ChannelAdapter(max_retries=retry, pool_connections=8, pool_maxsize=4)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def submit_task(
        self,
        channel: Channel,
        service_path: str,
        body: bytes,
        client_headers: Mapping[str, str] | None = None,
    ) -> UpstreamAnswer:
        """Send a client's submit body unchanged to the channel, asynchronously."""
        prepared = self._prepare(channel, "submit", service_path, body)
        for name, value in (client_headers or {}).items():
            if name in FORWARDED_SUBMIT_HEADERS:
                prepared.headers[name] = value
        submit_session, _ = self._sessions()
        call = _Call.of(channel, "submit", service_path)
        return self._send(channel, submit_session, call, prepared)

    def call_service(
        self,
        channel: Channel,
        service_path: str,
        body: bytes,
        client_headers: Mapping[str, str] | None = None,
    ) -> UpstreamAnswer:
        """Send a client's body unchanged to a synchronous service of the channel."""
        prepared = self._prepare(channel, "check", service_path, body)
        for name, value in (client_headers or {}).items():
            if name in FORWARDED_SUBMIT_HEADERS:
                prepared.headers[name] = value
        submit_session, _ = self._sessions()  # no retries inside: the caller fails over
        call = _Call.of(channel, "check", service_path)
        return self._send(channel, submit_session, call, prepared)

    def get_upload_policy(self, channel: Channel, model: str) -> UpstreamAnswer:
        """Ask the channel for an upload policy for the model (DashScope's getPolicy)."""
        _, query_session = self._sessions()  # idempotent: it hands out a fresh directory
        call = _Call.of(channel, "policy", "uploads")
        path = f"uploads?{urlencode({'action': 'getPolicy', 'model': model})}"
        return self._send(channel, query_session, call, self._prepare(channel, "policy", path))

    def query_task(self, channel: Channel, task_id: str) -> UpstreamAnswer:
        """Ask the channel that created a task about its status."""
        path = f"tasks/{task_id}"
        _, query_session = self._sessions()
        call = _Call.of(channel, "query", path)
        return self._send(channel, query_session, call, self._prepare(channel, "query", path))

    def cancel_task(self, channel: Channel, task_id: str) -> UpstreamAnswer:
        """Ask the channel that created a task to cancel it."""
        path = f"tasks/{task_id}/cancel"
        submit_session, _ = self._sessions()  # no retries: cancel is not idempotent upstream
        call = _Call.of(channel, "cancel", path)
        return self._send(channel, submit_session, call, self._prepare(channel, "cancel", path))

    def list_tasks(self, channel: Channel, params: Mapping[str, str]) -> UpstreamAnswer:
        """List the tasks the channel's own key created (DashScope's `GET /tasks`)."""
        _, query_session = self._sessions()
        call = _Call.of(channel, "list", "tasks")
        prepared = self._prepare(channel, "list", f"tasks?{urlencode(params)}")
        return self._send(channel, query_session, call, prepared)

    def _prepare(
        self, channel: Channel, operation: str, path: str, body: bytes | None = None
    ) -> requests.PreparedRequest:
        """Return the operation's request for `path` under the channel's /api/v1/."""
        # Preparing a request from scratch parses, IDNA-encodes and requotes its URL and builds
        # its headers: a tenth of a task query's CPU. All of that but the path is the same on
        # every call to a channel, so it is prepared once and copied; a path made only of
        # characters that URL preparation keeps as they are is appended as it is.
        template = self._templates.get((channel, operation))
        if template is None:
            method, headers = OPERATIONS[operation]
            headers = {**BASE_HEADERS, **headers, "Authorization": f"Bearer {channel.api_key}"}
            if channel.workspace:
                headers["X-DashScope-WorkSpace"] = channel.workspace
            # Prepared step by step, without requests.Request's cookie jar: these calls carry no
            # cookie, and copying an empty jar for every call cost as much as the rest of the copy.
            template = requests.PreparedRequest()
            template.prepare_method(method)
            template.prepare_url(f"{channel.base_url}/api/v1/", None)
            template.prepare_headers(headers)
            template.prepare_body(None, None)  # a POST without a body says Content-Length: 0
            self._templates[(channel, operation)] = template
        prepared = template.copy()
        if PLAIN_PATH.fullmatch(path):
            prepared.url = f"{template.url}{path}"
        else:
            prepared.prepare_url(f"{channel.base_url}/api/v1/{path}", None)
        if body is not None:
            prepared.prepare_body(body, None)
        return prepared

    def _send(
        self,
        channel: Channel,
        session: requests.Session,
        call: _Call,
        prepared: requests.PreparedRequest,
    ) -> UpstreamAnswer:
        started = time.perf_counter()
        try:
            answer = self._exchange(channel, session, prepared)
        except UpstreamError as exc:
            call.observe(time.perf_counter() - started, None, exc)
            raise
        call.observe(time.perf_counter() - started, answer, None)
        return answer

    def _exchange(
        self, channel: Channel, session: requests.Session, prepared: requests.PreparedRequest
    ) -> UpstreamAnswer:
        # Session.request would merge the session's headers, cookies, hooks and settings into
        # every call (a tenth of a task query's CPU, in typing.Protocol checks mostly), and
        # Session.send would run response hooks, fill the cookie jar and look for a redirect
        # (a tenth of the call itself). These sessions hold no hooks, keep no cookies and follow
        # no redirects, so the prepared request goes straight to the session's adapter.
        adapter = session.get_adapter(prepared.url or "")
        try:
            # No proxies (trust_env is off), said here so that requests does not work it out
            # again on every call.
            response = adapter.send(prepared, timeout=self.timeout, proxies={})
            # Read here, so that a body cut short fails as the call does.
            body = self._read_body(channel, response)
        except requests.ConnectTimeout as exc:
            cause = _cause_of(exc)
            raise UpstreamUnreachable(channel.name, "connect timeout", cause=cause) from None
        except requests.ReadTimeout as exc:
            raise UpstreamTimeout(channel.name, "read timeout", cause=_cause_of(exc)) from None
        except requests.ConnectionError as exc:
            reason, cause = _urllib3_reason(exc), _cause_of(exc)
            if isinstance(reason, NewConnectionError | ConnectTimeoutError):
                raise UpstreamUnreachable(channel.name, "connection failed", cause=cause) from None
            if isinstance(reason, ReadTimeoutError):  # the body stalled after the headers came
                raise UpstreamTimeout(channel.name, "read timeout", cause=cause) from None
            raise UpstreamBrokenAnswer(
                channel.name, "connection lost after sending", cause=cause
            ) from None
        except requests.RequestException as exc:
            cause = _cause_of(exc)
            raise UpstreamBrokenAnswer(channel.name, type(exc).__name__, cause=cause) from None
        except ReadTimeoutError as exc:  # the body stalled after the headers came
            raise UpstreamTimeout(channel.name, "read timeout", cause=_cause_of(exc)) from None
        except HTTPError as exc:  # the body was cut short, or could not be decoded
            cause = _cause_of(exc)
            raise UpstreamBrokenAnswer(channel.name, type(exc).__name__, cause=cause) from None
        return _decode(channel, response.status_code, body)

    def _read_body(self, channel: Channel, response: requests.Response) -> bytes:
        """Return the answer's decoded body: at most max_answer_bytes, by the answer's deadline."""
        # Straight from urllib3's response: requests' `content` walks a generator of 10 kB chunks
        # around the same reads (2% of a task query's CPU), wrapping urllib3's errors (caught by
        # the caller) on the way.
        raw = response.raw
        limit = self.max_answer_bytes
        if raw.length_remaining is not None and raw.length_remaining > limit:
            response.close()  # unread: the connection cannot serve another call
            raise _too_large(channel, response.status_code, limit)
        # The socket's timeout bounds each read, not the answer: one that trickles in a byte at a
        # time would hold the thread for as long as it lasts. So each read gets the time left
        # until the deadline the head was read by (the read timeout after sending).
        connection = raw.connection
        if isinstance(connection, _TimedHTTPConnection) and connection.answer_deadline is not None:
            deadline = connection.answer_deadline
        else:  # not read from a socket (a test's fake wire)
            deadline = time.monotonic() + self.timeout[1]
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                response.close()
                raise UpstreamTimeout(
                    channel.name,
                    "read timeout: the answer came too slowly",
                    cause="timeout",
                    status=response.status_code,
                )
            # Held until the body is read whole (urllib3 then returns it to its pool); and
            # urllib3 sets the socket's timeout again before the connection's next call.
            connection = raw.connection
            if connection is not None and connection.sock is not None:
                connection.sock.settimeout(left)
            chunk = raw.read1(min(limit + 1 - size, READ_CHUNK_BYTES), decode_content=True)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                response.close()
                raise _too_large(channel, response.status_code, limit)


def _too_large(channel: Channel, status: int, limit: int) -> UpstreamBrokenAnswer:
    """Return the failure of an answer longer than the gateway reads."""
    return UpstreamBrokenAnswer(
        channel.name, f"HTTP {status} answer over {limit} bytes", cause="too_large", status=status
    )


def _decode(channel: Channel, status: int, body: bytes) -> UpstreamAnswer:
    """Return the answer with its JSON object, its body re-encoded as UTF-8 if it came otherwise."""
    # JSON's own rules (RFC 8259, 8.1) tell UTF-8 from UTF-16 and UTF-32 and a BOM, as
    # json.loads does for bytes. Decoded strictly here, so that what is stored (and read again
    # with json.loads, as text) is UTF-8 that loads the same: no BOM, no lone surrogate.
    encoding = json.detect_encoding(body)
    try:
        text = body.decode(encoding)
        data = json.loads(text)
    except (ValueError, RecursionError):  # not UTF-8 (or 16, 32), not JSON, nested too deep
        data = None
    if status == 429 and not _is_dashscope_error(data):
        # What it says is clear without the body (too many requests), and a body that is not
        # DashScope's error would reach the client as if it were.
        detail = "HTTP 429 answer is not DashScope's JSON error"
        raise UpstreamThrottled(channel.name, detail, cause="throttled", status=status)
    if not isinstance(data, dict):
        detail = f"HTTP {status} answer is not a JSON object"
        raise UpstreamBrokenAnswer(channel.name, detail, cause="not_json", status=status)
    if encoding != "utf-8":
        body = text.encode()
    return UpstreamAnswer(status=status, body=body, data=data)


def _is_dashscope_error(data: object) -> bool:
    """Return whether a decoded answer is DashScope's error envelope, which names its code."""
    if not isinstance(data, dict):
        return False
    code = data.get("code")
    return isinstance(code, str) and bool(code)


@dataclass(frozen=True)
class _Call:
    """What metrics and logs say about one call to DashScope: never its URL, key or body."""

    channel: str
    operation: str
    method: str
    path: str
    task_id: str | None = None

    @classmethod
    def of(cls, channel: Channel, operation: str, path: str) -> _Call:
        """Describe a call by its channel, its operation and the template of its path."""
        method = OPERATIONS[operation][0]
        task = TASK_PATH.fullmatch(path)
        if task is None:  # a service path: fixed by the views
            return cls(channel.name, operation, method, f"/api/v1/{path}")
        template = "/api/v1/tasks/{task_id}" + (task["action"] or "")
        return cls(channel.name, operation, method, template, task["task_id"])

    def observe(
        self, seconds: float, answer: UpstreamAnswer | None, failure: UpstreamError | None
    ) -> None:
        """Count the call, time it and log one line about it (and what made it fail)."""
        if answer is not None:
            outcome = "ok" if 200 <= answer.status < 300 else "http_error"
            code: int | None = answer.status
        else:
            outcome = failure.outcome if failure is not None else UpstreamError.outcome
            code = failure.status if failure is not None else None
        status = metrics.NO_STATUS if code is None else str(code)
        metrics.upstream_requests.labels(self.channel, self.operation, outcome, status).inc()
        metrics.upstream_request_duration.labels(self.channel, self.operation, outcome).observe(
            seconds
        )
        cause = failure.cause if failure is not None else None
        # A 2xx answer is DEBUG: the access line of the request that made the call names its
        # channel, status, upstream request id and task, so a second INFO line per call would
        # only double the log (and cost a running-task query a twentieth of its CPU).
        if outcome == "ok":
            level = logging.DEBUG
        else:
            level = logging.INFO if answer is not None else logging.WARNING
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            "upstream %s: %s%s",
            self.operation,
            outcome,
            "" if cause is None else f" ({cause})",
            extra={
                "channel": self.channel,
                "method": self.method,
                "path": self.path,
                "status": code,
                "outcome": outcome,
                "cause": cause,
                "duration_ms": round(seconds * 1000, 1),
                "upstream_request_id": answer.request_id if answer is not None else None,
                "task_id": self.task_id or (answer.task_id if answer is not None else None),
            },
        )
