"""Load drivers: wrk (with bench/wrk/*.lua) or a tiny Python loop, and the big-submit burst.

Every driver is bounded in time and in count, and only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LUA_DIR = Path(__file__).resolve().parent / "wrk"
WRK_TIMEOUT_S = 10  # a request slower than this counts as an error (wrk --timeout)
PY_MAX_REQUESTS = 200_000  # the Python loop's hard cap per run, whatever the duration


@dataclass
class Load:
    """One load to apply: a method on a URL, with ids (queries) or a body file (submits)."""

    method: str  # GET (a query: ids are appended to url) or POST (a submit of body_path)
    url: str  # for GET: the query URL up to and including "/tasks/"
    key: str
    ids_path: Path | None = None
    body_path: Path | None = None


@dataclass
class Result:
    """What one run measured."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        return asdict(self)


def wrk_path() -> str | None:
    """Return the wrk binary, if installed."""
    return shutil.which("wrk")


def percentile(sorted_values: list[float], pct: float) -> float:
    """Return the pct-th percentile (nearest rank) of sorted values; 0 for none."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(pct / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


# --------------------------------------------------------------------------- wrk


def run_wrk(load: Load, conns: int, duration: int, stop: threading.Event | None = None) -> Result:
    """Drive the load with wrk for `duration` whole seconds over `conns` connections.

    Setting `stop` ends the run early (wrk reports what it measured so far on SIGINT).
    """
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed")
    env = {**os.environ, "BENCH_LUA_DIR": str(LUA_DIR), "BENCH_KEY": load.key}
    if load.method == "GET":
        assert load.ids_path is not None
        parsed = urllib.parse.urlsplit(load.url)
        env["BENCH_PATH"] = parsed.path
        env["BENCH_IDS"] = str(load.ids_path)
        script = LUA_DIR / "query.lua"
    else:
        assert load.body_path is not None
        env["BENCH_BODY"] = str(load.body_path)
        script = LUA_DIR / "submit.lua"
    threads = max(1, min(2, conns))
    args = [
        wrk,
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, int(duration))}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "-s",
        str(script),
        load.url,
    ]
    process = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if stop is not None:
        watcher = threading.Thread(
            target=lambda: stop.wait(duration + 60) and process.send_signal(signal.SIGINT),
            daemon=True,
        )
        watcher.start()
    try:
        stdout, stderr = process.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    line = next((x for x in stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{stdout}\n{stderr}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    seconds = data["duration_us"] / 1e6
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Result(
        requests=data["requests"],
        seconds=seconds,
        rps=data["requests"] / seconds if seconds else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=errors,
        detail={k: data[k] for k in ("connect", "read", "write", "status", "timeout")},
    )


# --------------------------------------------------------------------------- Python loop


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parsed = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=timeout)


def run_python(
    load: Load, conns: int, duration: float, stop: threading.Event | None = None
) -> Result:
    """Drive the load from `conns` threads with keep-alive connections (no wrk needed)."""
    stop = stop or threading.Event()
    path = urllib.parse.urlsplit(load.url).path
    headers = {"Authorization": f"Bearer {load.key}"}
    ids: list[str] = []
    body = b""
    if load.method == "GET":
        assert load.ids_path is not None
        ids = [x for x in load.ids_path.read_text().split() if x]
    else:
        assert load.body_path is not None
        body = load.body_path.read_bytes()
        headers |= {"Content-Type": "application/json", "X-DashScope-Async": "enable"}
    latencies: list[list[float]] = [[] for _ in range(conns)]
    errors = [0] * conns
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    budget = max(1, PY_MAX_REQUESTS // conns)
    start_barrier = threading.Barrier(conns + 1)
    stop_at = [0.0]

    def worker(index: int) -> None:
        conn = _connection(load.url, WRK_TIMEOUT_S)
        mine = latencies[index]
        start_barrier.wait()
        i = index * 7919
        while time.monotonic() < stop_at[0] and len(mine) < budget and not stop.is_set():
            i += 1
            target = path + ids[i % len(ids)] if ids else path
            began = time.perf_counter()
            try:
                conn.request(load.method, target, body=body or None, headers=headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                errors[index] += 1
                conn.close()
                conn = _connection(load.url, WRK_TIMEOUT_S)
                continue
            mine.append(time.perf_counter() - began)
            if not 200 <= status < 400:
                errors[index] += 1
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(conns)]
    for thread in threads:
        thread.start()
    began = time.monotonic()
    stop_at[0] = began + duration
    start_barrier.wait()
    for thread in threads:
        thread.join(timeout=duration + WRK_TIMEOUT_S + 30)
    seconds = time.monotonic() - began
    merged = sorted(x for part in latencies for x in part)
    return Result(
        requests=len(merged),
        seconds=seconds,
        rps=len(merged) / seconds if seconds else 0.0,
        p50_ms=percentile(merged, 50) * 1000,
        p99_ms=percentile(merged, 99) * 1000,
        errors=sum(errors),
        detail={"statuses": {str(k): v for k, v in statuses.items()}},
    )


# --------------------------------------------------------------------------- big submits


@dataclass
class BurstResult:
    """Concurrent big submits: how many succeeded, how fast, and the memory they took."""

    count: int
    ok: int
    errors: int
    wall_s: float
    p50_ms: float
    p99_ms: float
    body_bytes: int
    baseline_rss: int = 0
    peak_rss: int = 0
    after_rss: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def growth(self) -> int:
        """Return peak RSS minus the RSS just before the burst."""
        return max(0, self.peak_rss - self.baseline_rss)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy."""
        return {**asdict(self), "growth": self.growth}


def burst(
    url: str,
    key: str,
    body: bytes,
    count: int,
    rss_sum: Callable[[], int] | None = None,
    timeout: float = 120,
) -> BurstResult:
    """Send `count` copies of a submit body at once, each on its own new connection.

    When `rss_sum` is given it is sampled every few milliseconds from just before the burst
    until every answer is in, and the peak is recorded.
    """
    path = urllib.parse.urlsplit(url).path
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "X-DashScope-Async": "enable",
    }
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    ready = threading.Barrier(count + 1)
    sampling = threading.Event()
    peak = [0]

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], rss_sum() if rss_sum else 0)
            time.sleep(0.005)

    def send() -> None:
        conn = _connection(url, timeout)
        ready.wait()
        began = time.perf_counter()
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            status = str(response.status)
        except (OSError, http.client.HTTPException) as exc:
            status = type(exc).__name__
        finally:
            conn.close()
        with lock:
            latencies.append(time.perf_counter() - began)
            statuses[status] = statuses.get(status, 0) + 1

    baseline = rss_sum() if rss_sum else 0
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    senders = [threading.Thread(target=send, daemon=True) for _ in range(count)]
    for thread in senders:
        thread.start()
    began = time.perf_counter()
    ready.wait()
    for thread in senders:
        thread.join(timeout=timeout + 10)
    wall = time.perf_counter() - began
    time.sleep(0.05)
    sampling.set()
    sampler.join(timeout=5)
    ordered = sorted(latencies)
    ok = statuses.get("200", 0)
    return BurstResult(
        count=count,
        ok=ok,
        errors=count - ok,
        wall_s=wall,
        p50_ms=percentile(ordered, 50) * 1000,
        p99_ms=percentile(ordered, 99) * 1000,
        body_bytes=len(body),
        baseline_rss=baseline,
        peak_rss=peak[0],
        after_rss=rss_sum() if rss_sum else 0,
        statuses=statuses,
    )


def median(values: list[float]) -> float:
    """Return the median (0 for none)."""
    return float(statistics.median(values)) if values else 0.0
