"""Slow and idle clients against the gateway, while a normal client submits and queries.

    .venv/bin/python bench/slow_clients.py --url http://127.0.0.1:8080 --key sk-... \\
        --heads 600 --bodies 600 --idle 600 --duration 15

opens, and keeps open (reconnecting whenever the server closes one), four kinds of connection:

- head dribblers: a submit's request line, then header bytes one at a time, never the end;
- body dribblers, half with the given key and half with an unknown one: a complete head with
  `Content-Length`, then the body a byte at a time, never the end;
- idle connections: connected, nothing sent.

A slow connection that is answered (a 401 before its body is read, say) goes on sending until
the server closes it; one the server closes is opened again.

Once they are all open, a normal client (one or more, `--clients`) submits a task and queries
it, over and over, on a kept-alive connection (`--fresh`: a new one for each request, which
then has to be accepted and given a thread like any other), for `--duration` seconds. It
prints the normal client's success rate and latency percentiles, and what the slow
connections met (how many were open at the end, closed by the server, or answered). `--json`
prints the same as one JSON object (tests/e2e/test_slow_clients.py reads it).

Only the standard library: asyncio, one process. The slow connections come from
`--attack-sources` loopback addresses (127.0.1.1, 127.0.1.2, ...), as from that many client
machines, so that a per-client connection limit in front does not turn them away wholesale;
the normal client connects from the default address (127.0.0.1 on loopback).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

API_PREFIX = "/alibailian/api/v1"
SUBMIT_PATH = f"{API_PREFIX}/services/aigc/video-generation/video-synthesis"
UNKNOWN_KEY = "sk-slow-clients-unknown-0000000000000000"
# The start of a valid submit body: the dribbled rest is a prompt that never ends.
BODY_START = b'{"model": "wan2.5-t2v-preview", "input": {"prompt": "'
BODY_LENGTH = 100_000


@dataclass
class Kind:
    """What one kind of slow connection met."""

    name: str
    open_now: int = 0
    most_open: int = 0
    connects: int = 0
    connect_errors: int = 0
    closed_by_server: int = 0
    answers: Counter[str] = field(default_factory=Counter)

    def opened(self) -> None:
        """Count a connection that is open."""
        self.connects += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)

    def report(self) -> dict[str, Any]:
        """Return the counts as plain values."""
        return {
            "open_at_end": self.open_now,
            "most_open": self.most_open,
            "connects": self.connects,
            "connect_errors": self.connect_errors,
            "closed_by_server": self.closed_by_server,
            "answers": dict(self.answers),
        }


@dataclass
class Target:
    """Where to connect, and from which local addresses the slow connections come."""

    host: str
    port: int
    host_header: str
    sources: list[str]

    async def connect(
        self, index: int | None = None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection (the index picks the slow connection's source address)."""
        local = None
        if index is not None and self.sources:
            local = (self.sources[index % len(self.sources)], 0)
        return await asyncio.open_connection(self.host, self.port, local_addr=local)


def status_of(data: bytes) -> str:
    """Return the status code an answer starts with ("?" when it is not HTTP)."""
    parts = data.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return parts[1].decode()
    return "?"


async def slow_connection(
    target: Target,
    kind: Kind,
    index: int,
    head: bytes,
    dribble: bytes,
    interval: float,
    stop: asyncio.Event,
) -> None:
    """Keep one slow connection open: send `head`, then `dribble` a byte per `interval`."""
    while not stop.is_set():
        try:
            reader, writer = await target.connect(index)
        except OSError:
            kind.connect_errors += 1
            await asyncio.sleep(interval)
            continue
        kind.opened()
        sent = 0
        try:
            if head:
                writer.write(head)
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(65536), interval)
                except TimeoutError:
                    if dribble:
                        writer.write(dribble[sent % len(dribble) : sent % len(dribble) + 1])
                        sent += 1
                    continue
                if not data:
                    kind.closed_by_server += 1
                    break
                # Answered (a 401 before the body, a 408): go on sending, as an attacker who
                # wants the server to keep reading would, until the server closes. (What is
                # not a status line is the rest of an answer.)
                status = status_of(data)
                if status != "?":
                    kind.answers[status] += 1
        except OSError:  # reset by the server
            kind.closed_by_server += 1
        finally:
            kind.open_now -= 1
            writer.close()
        # The next connection a moment later: a slow client, not a flood of fast requests
        # (a flood is a rate limit's business, and would measure the CPU, not the threads).
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- the normal client


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 answer: status, headers (lower-case names), body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            body = body[:-2]
            if size == 0:
                await reader.readuntil(b"\r\n")  # the last chunk's empty trailer
                break
    else:
        body = await reader.read()
    return status, headers, body


@dataclass
class Normal:
    """The normal client's requests: latencies of the good ones, and what went wrong."""

    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    def report(self) -> dict[str, Any]:
        """Return the success rate and percentiles (milliseconds)."""
        done = len(self.latencies)
        total = done + sum(self.failures.values())
        ordered = sorted(self.latencies)

        def percentile(share: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000, 1)

        return {
            "requests": total,
            "succeeded": done,
            "success_rate": round(done / total, 4) if total else 0.0,
            "p50_ms": percentile(0.50),
            "p99_ms": percentile(0.99),
            "max_ms": round(ordered[-1] * 1000, 1) if ordered else None,
            "mean_ms": round(statistics.fmean(ordered) * 1000, 1) if ordered else None,
            "failures": dict(self.failures),
        }


async def normal_client(
    target: Target,
    key: str,
    model: str,
    normal: Normal,
    until: float,
    timeout: float,
    pause: float,
    fresh: bool,
) -> None:
    """Submit, then query the task, again and again on one kept-alive connection (or not)."""
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    body = json.dumps({"model": model, "input": {"prompt": "a normal client"}}).encode()
    task_id = ""
    while time.monotonic() < until:
        if task_id:
            request = (
                f"GET {API_PREFIX}/tasks/{task_id} HTTP/1.1\r\nHost: {target.host_header}\r\n"
                f"Authorization: Bearer {key}\r\n\r\n"
            ).encode()
        else:
            request = (
                f"POST {SUBMIT_PATH} HTTP/1.1\r\nHost: {target.host_header}\r\n"
                f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                f"X-DashScope-Async: enable\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
        started = time.monotonic()
        try:
            if connection is None:
                connection = await asyncio.wait_for(target.connect(), timeout)
            reader, writer = connection
            writer.write(request)
            status, headers, answer = await asyncio.wait_for(read_answer(reader), timeout)
        except TimeoutError:
            normal.failures["timeout"] += 1
            status = 0
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            normal.failures[type(exc).__name__] += 1
            status = 0
        elapsed = time.monotonic() - started
        if status == 200:
            normal.latencies.append(elapsed)
            # The next request queries the task just submitted; after a query, submit again.
            task_id = "" if task_id else json.loads(answer)["output"]["task_id"]
            if fresh or headers.get("connection", "").lower() == "close":
                connection[1].close()
                connection = None
        else:
            if status:
                normal.failures[f"status {status}"] += 1
            if connection is not None:
                connection[1].close()
                connection = None
            task_id = ""
        await asyncio.sleep(pause)
    if connection is not None:
        connection[1].close()


# --------------------------------------------------------------------------- the run


def raise_file_limit() -> int:
    """Raise this process's descriptor limit to its hard limit; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Open the slow connections, run the normal client, and return what both met."""
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    loopback = host.startswith("127.") or host == "localhost"
    sources = [f"127.0.1.{i + 1}" for i in range(args.attack_sources)] if loopback else []
    target = Target(host, port, url.netloc, sources)
    heads, valid, unknown, idle = (
        Kind("head_dribblers"),
        Kind("body_dribblers_valid_key"),
        Kind("body_dribblers_unknown_key"),
        Kind("idle"),
    )
    stop = asyncio.Event()

    def body_head(key: str) -> bytes:
        return (
            f"POST {SUBMIT_PATH} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {BODY_LENGTH}\r\n\r\n"
        ).encode() + BODY_START

    head_start = f"POST {SUBMIT_PATH} HTTP/1.1\r\nHost: {url.netloc}\r\n".encode()
    plan = (
        [(heads, head_start, b"X-Dribble: a\r\n")] * args.heads
        + [(valid, body_head(args.key), b"a")] * (args.bodies - args.bodies // 2)
        + [(unknown, body_head(UNKNOWN_KEY), b"a")] * (args.bodies // 2)
        + [(idle, b"", b"")] * args.idle
    )
    # Interleaved, so that every kind is open while the rest still connect.
    plan = [plan[i] for i in sorted(range(len(plan)), key=lambda i: (i * 7919) % len(plan))]
    tasks = []
    for index, (kind, head, dribble) in enumerate(plan):
        tasks.append(
            asyncio.create_task(
                slow_connection(target, kind, index, head, dribble, args.interval, stop)
            )
        )
        if args.ramp and index % 50 == 49:
            await asyncio.sleep(50 / args.ramp)
    await asyncio.sleep(args.settle)
    opened_before = {k.name: k.open_now for k in (heads, valid, unknown, idle)}
    normal = Normal()
    until = time.monotonic() + args.duration
    await asyncio.gather(
        *(
            normal_client(
                target, args.key, args.model, normal, until, args.timeout, args.pause, args.fresh
            )
            for _ in range(args.clients)
        )
    )
    at_end = {k.name: k.report() for k in (heads, valid, unknown, idle)}
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "url": args.url,
        "slow_connections": len(plan),
        "open_when_normal_client_started": opened_before,
        "slow": at_end,
        "normal": normal.report(),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the gateway's origin, http://HOST:PORT")
    parser.add_argument("--key", required=True, help="a gateway key (the normal client's)")
    parser.add_argument("--model", default="wan2.5-t2v-preview", help="the model submitted")
    parser.add_argument("--heads", type=int, default=600, help="head dribblers")
    parser.add_argument("--bodies", type=int, default=600, help="body dribblers (half: bad key)")
    parser.add_argument("--idle", type=int, default=600, help="idle connections")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between bytes")
    parser.add_argument("--ramp", type=float, default=1000, help="connections opened a second")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=15, help="seconds of normal client")
    parser.add_argument("--clients", type=int, default=1, help="normal clients at once")
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between its requests")
    parser.add_argument("--timeout", type=float, default=5, help="a normal request's limit")
    parser.add_argument(
        "--fresh", action="store_true", help="a new connection for each normal request"
    )
    parser.add_argument("--attack-sources", type=int, default=20, help="loopback addresses")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """Run and print the report."""
    args = parse_args(argv)
    limit = raise_file_limit()
    needed = args.heads + args.bodies + args.idle + args.clients + 64
    if limit < needed:
        print(f"descriptor limit {limit} < {needed} connections", file=sys.stderr)
        return 2
    report = asyncio.run(run(args))
    if args.json:
        print(json.dumps(report))
        return 0
    normal = report["normal"]
    print(f"{report['slow_connections']} slow connections against {report['url']}")
    for name, kind in report["slow"].items():
        print(
            f"  {name:28} open {kind['open_at_end']:5}  most {kind['most_open']:5}  "
            f"connects {kind['connects']:6}  closed by server {kind['closed_by_server']:6}  "
            f"answers {kind['answers']}  connect errors {kind['connect_errors']}"
        )
    print(
        f"normal client: {normal['succeeded']}/{normal['requests']} "
        f"({normal['success_rate']:.2%}) p50 {normal['p50_ms']} ms  p99 {normal['p99_ms']} ms  "
        f"max {normal['max_ms']} ms  failures {normal['failures']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
