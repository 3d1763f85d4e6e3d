"""Benchmark bailian-gateway against a fake DashScope, with in-run references.

    make bench                      # the full benchmark (bench/run.sh installs nginx, wrk, ...)
    .venv/bin/python bench/run.py --smoke --out /tmp/x   # a few seconds, installs nothing

See bench/README.md for what is measured and how to read the results.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import http.client
import json
import os
import platform
import runpy
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import drivers
import growth
import profiling
import report
from services import (
    API_PREFIX,
    CHANNEL_KEY,
    DONE_MODEL,
    ECHO_MODULE,
    HUGE_SECONDS,
    REPO_ROOT,
    RUNNING_MODEL,
    SLOW_MODEL,
    Endpoints,
    GatewayInfo,
    Stack,
    clean_environ,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SUBMIT_ROUTE = "/services/aigc/video-generation/video-synthesis"
SLOW_LATENCY_MS = 200.0


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full benchmark or the smoke test's miniature of it."""

    smoke: bool
    runs: int
    duration: float
    warmup: float
    conns: tuple[int, ...]
    slow_conns: int
    slow_duration: float  # scenario 4's runs: longer, see bench/README.md
    tasks: int  # tasks of each kind made before measuring
    burst_count: int
    image_bytes: int  # length of the base64 image in a big submit
    png: bool
    profile: bool
    profile_seconds: int


def make_plan(args: argparse.Namespace, driver: str) -> Plan:
    """Pick the plan from the flags."""
    if args.smoke:
        plan = Plan(
            smoke=True,
            runs=1,
            duration=1 if driver == "wrk" else 0.3,  # wrk takes whole seconds only
            warmup=0,
            conns=(2,),
            slow_conns=4,
            slow_duration=1 if driver == "wrk" else 0.3,
            tasks=8,
            burst_count=2,
            image_bytes=1 * 1024 * 1024,
            png=False,
            profile=False,
            profile_seconds=0,
        )
    else:
        plan = Plan(
            smoke=False,
            runs=3,
            duration=5,
            warmup=1,
            conns=(1, 32),
            slow_conns=200,
            slow_duration=20,
            tasks=256,
            burst_count=20,
            image_bytes=14 * 1000 * 1000,
            png=True,
            profile=True,
            profile_seconds=6,
        )
    overrides: dict[str, Any] = {}
    if args.runs is not None:
        overrides["runs"] = args.runs
    if args.duration is not None:
        overrides["duration"] = overrides["slow_duration"] = args.duration
    if args.no_png:
        overrides["png"] = False
    if args.no_profile:
        overrides["profile"] = False
    return Plan(**{**plan.__dict__, **overrides})


class Log:
    """Progress lines with the time since the start."""

    def __init__(self) -> None:
        self.began = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.began:6.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------- HTTP helpers


def call(
    method: str, url: str, key: str, body: bytes | None = None, timeout: float = 60
) -> tuple[int, dict[str, Any]]:
    """One request; return the status and the JSON answer ({} if it was not JSON)."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}", "X-DashScope-Async": "enable"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, parsed.path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        data = {}
    return response.status, data if isinstance(data, dict) else {}


def submit_body(model: str, image_chars: int = 0) -> bytes:
    """A video-synthesis submit body; with an inline base64 image of that many characters."""
    body: dict[str, Any] = {
        "model": model,
        "input": {"prompt": "a cat surfing a wave at sunset"},
        "parameters": {"resolution": "720P", "duration": 5, "prompt_extend": True},
    }
    if image_chars:
        raw = os.urandom(image_chars * 3 // 4)
        body["input"]["img_url"] = "data:image/png;base64," + base64.b64encode(raw).decode()
    return json.dumps(body).encode()


def make_tasks(gateway: GatewayInfo, model: str, count: int, expect: str, log: Log) -> list[str]:
    """Submit `count` tasks through the gateway, query each once, and check its status."""

    def one(_: int) -> str:
        status, data = call(
            "POST", gateway.url + API_PREFIX + SUBMIT_ROUTE, gateway.key, submit_body(model)
        )
        task_id = (data.get("output") or {}).get("task_id")
        if status != 200 or not task_id:
            raise RuntimeError(f"submit of {model} answered {status}: {data}")
        status, data = call("GET", f"{gateway.url}{API_PREFIX}/tasks/{task_id}", gateway.key)
        seen = (data.get("output") or {}).get("task_status")
        if status != 200 or seen != expect:
            raise RuntimeError(f"task {task_id} of {model}: {status} {seen}, expected {expect}")
        return str(task_id)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(one, range(count)))
    log(f"made {len(ids)} {expect} tasks ({model})")
    return ids


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One measured operation: what to send, and to which origin for each target."""

    key: str
    number: str
    title: str
    short: str
    method: str
    origins: dict[str, str]  # target -> origin
    ids_path: Path | None = None
    body_path: Path | None = None

    def load(self, target: str, gateway: GatewayInfo) -> drivers.Load:
        """The load for one target: the gateway's route and key (the floor's too), or upstream's."""
        served = target in ("gateway", "floor")
        prefix, key = (API_PREFIX, gateway.key) if served else ("/api/v1", CHANNEL_KEY)
        route = "/tasks/" if self.method == "GET" else SUBMIT_ROUTE
        return drivers.Load(
            method=self.method,
            url=self.origins[target] + prefix + route,
            key=key,
            ids_path=self.ids_path,
            body_path=self.body_path,
        )


def drive(
    driver: str,
    load: drivers.Load,
    conns: int,
    duration: float,
    stop: threading.Event | None = None,
) -> drivers.Result:
    """Run one load with the chosen driver; `stop` may end it early."""
    if driver == "wrk":
        return drivers.run_wrk(load, conns, int(duration), stop)
    return drivers.run_python(load, conns, duration, stop)


def summarize(runs: list[drivers.Result]) -> dict[str, float]:
    """Median of each figure over the runs."""
    return {
        metric: drivers.median([float(getattr(r, metric)) for r in runs])
        for metric in ("rps", "p50_ms", "p99_ms", "errors", "requests")
    }


def measure(
    plan: Plan,
    driver: str,
    scenarios: list[Scenario],
    gateway: GatewayInfo,
    floor: GatewayInfo,
    log: Log,
) -> list[dict[str, Any]]:
    """Run every scenario x connection count x target, interleaved, `plan.runs` times."""
    # The gunicorn servers, whose CPU is measured around each of their runs.
    servers = {"gateway": gateway, "floor": floor}
    cases: list[dict[str, Any]] = []
    for scenario in scenarios:
        slow = scenario.key == "query_slow"
        counts = (plan.slow_conns,) if slow else plan.conns
        duration = plan.slow_duration if slow else plan.duration
        for conns in counts:
            cases.append(
                {
                    "id": f"{scenario.key}@{conns}",
                    "key": scenario.key,
                    "number": scenario.number,
                    "title": scenario.title,
                    "short": scenario.short,
                    "conns": conns,
                    "duration": duration,
                    "scenario": scenario,
                    "targets": {t: {"runs": []} for t in scenario.origins},
                }
            )
    for round_no in range(plan.runs):
        for case in cases:
            scenario = case["scenario"]
            for target in case["targets"]:
                load = scenario.load(target, gateway)
                if round_no == 0 and plan.warmup:
                    drive(driver, load, case["conns"], plan.warmup)
                server = servers.get(target)
                before = server.cpu() if server is not None else {}
                result = drive(driver, load, case["conns"], case["duration"])
                cpu = ""
                if server is not None:
                    result.detail["cpu"] = cpu_split(
                        before, server.cpu(), result.seconds, server.master.process.pid
                    )
                    cpu = f"  gunicorn CPU {result.detail['cpu']['cores']:.2f} cores"
                case["targets"][target]["runs"].append(result)
                log(
                    f"run {round_no + 1}/{plan.runs} {case['id']:<18} {target:<8} "
                    f"{result.rps:9,.0f} req/s  p50 {result.p50_ms:7.2f} ms  "
                    f"p99 {result.p99_ms:7.2f} ms  errors {result.errors}{cpu}"
                )
    for case in cases:
        case.pop("scenario")
        for data in case["targets"].values():
            data["median"] = summarize(data["runs"])
            cpus = [r.detail["cpu"] for r in data["runs"] if "cpu" in r.detail]
            if cpus:
                data["median"]["cpu_cores"] = drivers.median([c["cores"] for c in cpus])
                for metric in ("busiest_worker", "system_share"):
                    data["median"][metric] = drivers.median([c[metric] for c in cpus])
            data["runs"] = [r.as_dict() for r in data["runs"]]
    return cases


def cpu_split(
    before: dict[int, tuple[float, float]],
    after: dict[int, tuple[float, float]],
    seconds: float,
    master: int,
) -> dict[str, Any]:
    """CPU the gunicorn processes used in a run: cores, system share, busiest worker's share."""
    user = {pid: after.get(pid, (0.0, 0.0))[0] - before[pid][0] for pid in before}
    system = {pid: after.get(pid, (0.0, 0.0))[1] - before[pid][1] for pid in before}
    used = {pid: user[pid] + system[pid] for pid in before}
    total = sum(used.values())
    workers = sorted((v for pid, v in used.items() if pid != master), reverse=True)
    return {
        "cores": total / seconds if seconds else 0.0,
        "system_share": sum(system.values()) / total if total else 0.0,
        "workers_s": workers,
        "busiest_worker": workers[0] / total if total and workers else 0.0,
    }


def measure_burst(
    plan: Plan, origins: dict[str, str], gateway: GatewayInfo, log: Log
) -> dict[str, Any]:
    """Twenty (smoke: two) concurrent big submits per target, `plan.runs` times."""
    body = submit_body(RUNNING_MODEL, plan.image_bytes)
    targets: dict[str, Any] = {t: {"runs": []} for t in origins}
    for round_no in range(plan.runs):
        for target, origin in origins.items():
            is_gateway = target == "gateway"
            prefix, key = (API_PREFIX, gateway.key) if is_gateway else ("/api/v1", CHANNEL_KEY)
            time.sleep(0.5)  # let the previous burst's memory settle
            result = drivers.burst(
                origin + prefix + SUBMIT_ROUTE,
                key,
                body,
                plan.burst_count,
                rss_sum=gateway.rss_sum if is_gateway else None,
            )
            targets[target]["runs"].append(result)
            log(
                f"run {round_no + 1}/{plan.runs} big submits     {target:<8} "
                f"{result.ok}/{result.count} ok in {result.wall_s:.2f} s, p99 "
                f"{result.p99_ms:,.0f} ms"
                + (
                    f", RSS {result.baseline_rss / 2**20:,.0f} -> "
                    f"{result.peak_rss / 2**20:,.0f} MiB"
                    if is_gateway
                    else ""
                )
            )
    for data in targets.values():
        runs = data["runs"]
        data["median"] = {
            metric: drivers.median([float(getattr(r, metric)) for r in runs])
            for metric in (
                "ok",
                "errors",
                "wall_s",
                "p50_ms",
                "p99_ms",
                "baseline_rss",
                "peak_rss",
                "after_rss",
                "growth",
            )
        }
        data["max_growth"] = max(r.growth for r in runs)
        data["first_growth"] = runs[0].growth
        data["runs"] = [r.as_dict() for r in runs]
    return {
        "title": f"5. {plan.burst_count} concurrent big submits",
        "count": plan.burst_count,
        "body_bytes": len(body),
        "image_chars": plan.image_bytes,
        "bytes_in_flight": plan.burst_count * len(body),
        "targets": targets,
    }


# --------------------------------------------------------------------------- targets


def check_targets(
    plan: Plan, cases: list[dict[str, Any]], burst: dict[str, Any]
) -> list[dict[str, Any]]:
    """Compare the gateway's figures with the issue's targets."""
    by_id = {case["id"]: case for case in cases}
    low, high = min(plan.conns), max(plan.conns)
    checks: list[dict[str, Any]] = []

    def med(case_id: str, target: str, metric: str) -> float:
        return float(by_id[case_id]["targets"][target]["median"][metric])

    for key, label, limit in (
        ("query_running", "query of a running task", 2.0),
        ("query_done", "query of a finished task", 2.0),
        ("submit", "submit", 3.0),
    ):
        case_id = f"{key}@{low}"
        added = med(case_id, "gateway", "p50_ms") - med(case_id, "direct", "p50_ms")
        checks.append(
            {
                "target": f"{label}: added p50 at {low} conn ≤ {limit:g} ms above direct",
                "measured": f"{added:+.2f} ms ({med(case_id, 'gateway', 'p50_ms'):.2f} vs "
                f"{med(case_id, 'direct', 'p50_ms'):.2f} ms)",
                "ok": added <= limit,
            }
        )
    for key, label, minimum in (
        ("query_done", "finished-task query", 4000),
        ("query_running", "running-task query", 2000),
        ("submit", "submit", 1000),
    ):
        case_id = f"{key}@{high}"
        rps = med(case_id, "gateway", "rps")
        measured = f"{rps:,.0f} req/s"
        if "floor" in by_id[case_id]["targets"]:
            ceiling = med(case_id, "floor", "rps")
            measured += f" (Flask floor {ceiling:,.0f} req/s; gateway {rps / ceiling:.0%} of it)"
        checks.append(
            {
                "target": f"{label} ≥ {minimum:,} req/s at {high} conns",
                "measured": measured,
                "ok": rps >= minimum,
            }
        )
    slow = f"query_slow@{plan.slow_conns}"
    share = med(slow, "gateway", "rps") / max(med(slow, "direct", "rps"), 1e-9)
    extra = med(slow, "gateway", "p99_ms") - med(slow, "direct", "p99_ms")
    checks.append(
        {
            "target": f"200 ms upstream at {plan.slow_conns} conns: ≥ 90% of direct req/s",
            "measured": f"{share:.0%} ({med(slow, 'gateway', 'rps'):,.0f} vs "
            f"{med(slow, 'direct', 'rps'):,.0f} req/s)",
            "ok": share >= 0.9,
        }
    )
    checks.append(
        {
            "target": f"200 ms upstream at {plan.slow_conns} conns: p99 within 50 ms of direct",
            "measured": f"{extra:+.1f} ms ({med(slow, 'gateway', 'p99_ms'):.1f} vs "
            f"{med(slow, 'direct', 'p99_ms'):.1f} ms)",
            "ok": extra <= 50,
        }
    )
    gateway = burst["targets"]["gateway"]
    runs = gateway["runs"]
    all_ok = all(r["ok"] == r["count"] for r in runs)
    checks.append(
        {
            "target": f"{burst['count']} concurrent big submits all succeed",
            "measured": ", ".join(f"{r['ok']}/{r['count']}" for r in runs),
            "ok": all_ok,
        }
    )
    worst = gateway["max_growth"] / burst["bytes_in_flight"]
    checks.append(
        {
            "target": "peak gunicorn memory growth ≤ 3x the bytes in flight",
            "measured": f"worst run {gateway['max_growth'] / 2**20:,.0f} MiB = {worst:.2f}x "
            f"of {burst['bytes_in_flight'] / 2**20:,.0f} MiB",
            "ok": worst <= 3.0,
        }
    )
    return checks


# --------------------------------------------------------------------------- profile


def run_profile(
    plan: Plan,
    driver: str,
    scenarios: list[Scenario],
    gateway: GatewayInfo,
    out_dir: Path,
    stem: str,
    log: Log,
) -> dict[str, Any]:
    """Sample every worker with py-spy during the running-task query and the submit loads."""
    if profiling.py_spy() is None:
        return {"note": "py-spy is not installed: no profile."}
    conns = max(plan.conns)
    seconds = plan.profile_seconds
    result: dict[str, Any] = {
        "note": f"Under {conns} connections, phases of one load: every worker "
        f"sampled at 200 Hz for {seconds} s with `--gil` (only the thread holding the GIL: "
        f"shares of Python CPU), then {seconds} s with `--idle` keeping only threads that "
        "are handling a request (shares of request wall time, waits included); before "
        "them, a `--gil` flame graph of the busiest worker. py-spy pauses a worker for each "
        "sample, so throughput while sampled is below the table's. Rows are inclusive: a sample "
        "counts for every row whose function is on its stack.",
        "scenarios": {},
    }
    for scenario in scenarios:
        if scenario.key not in ("query_running", "submit"):
            continue
        key = scenario.key
        load = scenario.load("gateway", gateway)
        svg_seconds = max(2, seconds // 2)
        # py-spy falls behind on workers with many threads, so the phases take longer than
        # their nominal seconds: the load runs until they are done (bounded by `total`).
        total = 6 * seconds + 60
        outcome: dict[str, drivers.Result] = {}
        stop = threading.Event()
        loader = threading.Thread(
            target=lambda load=load, outcome=outcome, stop=stop, total=total: outcome.setdefault(
                "r", drive(driver, load, conns, total, stop)
            ),
            daemon=True,
        )
        loader.start()
        workers = gateway.worker_pids()
        cpu_before = gateway.cpu()
        time.sleep(1.5)
        cpu_after = gateway.cpu()
        busiest = max(
            workers, key=lambda pid: sum(cpu_after.get(pid, (0, 0))) - sum(cpu_before[pid])
        )
        svg: Path | None = out_dir / f"{stem}-profile-{key}.svg"
        assert svg is not None
        spy = profiling.record(busiest, svg_seconds, svg, "gil", fmt="flamegraph")
        svg_error = profiling.finish([spy], svg_seconds + 60)[0]
        if spy.returncode != 0 or not svg.exists() or "ERROR" in svg.read_text()[:2000]:
            log(f"py-spy flame graph failed: {svg_error.strip()[-300:]}")
            svg = None
        views: dict[str, Any] = {}
        raw_names: list[str] = []
        for mode in ("gil", "wall"):
            paths = [
                out_dir / f"{stem}-profile-{key}-{mode}-worker{n}.txt" for n in range(len(workers))
            ]
            spies = [
                profiling.record(pid, seconds, path, mode)
                for pid, path in zip(workers, paths, strict=True)
            ]
            errors = profiling.finish(spies, seconds + 60)
            for error in errors:
                if "overran" in error:
                    log(f"warning: {error.strip().splitlines()[-1]} ({key}, {mode})")
            existing = [p for p in paths if p.exists()]
            if not existing:
                stop.set()
                loader.join(timeout=total + 60)
                log(f"py-spy failed: {' '.join(errors).strip()[-500:]}")
                return {"note": f"py-spy failed: {' '.join(errors).strip()[-300:]}"}
            raw_names += [p.name for p in existing]
            stacks = profiling.read_stacks(existing, request_threads_only=mode == "wall")
            views[mode] = profiling.analyze(stacks)
        if not loader.is_alive():
            log("warning: the load ended before the profile did; shares cover an idle tail")
        stop.set()
        loader.join(timeout=total + 60)
        top = ", ".join(f"{op.strip()} {pct:.0f}%" for op, pct in views["gil"]["operations"][:6])
        log(f"profiled {key}: {views['gil']['samples']} GIL samples; {top}")
        result["scenarios"][key] = {
            "title": f"{scenario.number}. {scenario.title} at {conns} conns",
            "workers": len(workers),
            "seconds": seconds,
            "conns": conns,
            "rps": outcome["r"].rps if "r" in outcome else 0.0,
            "raw": raw_names,
            "svg": svg.name if svg else None,
            "views": views,
        }
    return result


# --------------------------------------------------------------------------- main


def tool_versions() -> dict[str, str]:
    """Versions of the external tools used, for the report."""
    found = {}
    for tool, args in (("nginx", ["-v"]), ("wrk", ["-v"])):
        path = shutil.which(tool)
        if path:
            done = subprocess.run([path, *args], capture_output=True, text=True, check=False)
            text = (done.stdout + done.stderr).strip().splitlines()
            first = text[0] if text else "?"
            # "nginx version: nginx/1.22.1", "wrk debian/4.1.0-3+b2 [epoll] Copyright ..."
            found[tool] = first.removeprefix("nginx version: ").split(" [")[0]
    return found


def gunicorn_summary() -> str:
    """The shipped gunicorn.conf.py's worker settings, read the way gunicorn reads them."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(clean_environ() | {k: v for k, v in saved.items() if k == "PATH"})
        # gunicorn runs its config file from the repository, whose modules it imports.
        sys.path.insert(0, str(REPO_ROOT))
        conf = runpy.run_path(str(REPO_ROOT / "gunicorn.conf.py"))
    finally:
        sys.path.remove(str(REPO_ROOT))
        os.environ.clear()
        os.environ.update(saved)
    return (
        f"{conf['workers']} {conf['worker_class']} workers x {conf['threads']} threads, "
        f"keepalive {conf['keepalive']} s, log level {conf['loglevel']}"
    )


def gateway_log_summary(path: Path) -> dict[str, Any]:
    """Count warnings and errors in the gateway's log and keep a few distinct ones."""
    counts = {"lines": 0, "warnings": 0, "errors": 0}
    samples: list[str] = []
    try:
        with path.open(errors="replace") as handle:
            for line in handle:
                counts["lines"] += 1
                if "WARNING" in line or "[WARN" in line:
                    counts["warnings"] += 1
                elif "ERROR" in line or "CRITICAL" in line or "Traceback" in line:
                    counts["errors"] += 1
                else:
                    continue
                short = line.strip()[:240]
                if len(samples) < 8 and short not in samples:
                    samples.append(short)
    except OSError:
        pass
    return {**counts, "samples": samples}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a few seconds: 1 run, short loads, tiny burst, no PNG, no profile",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR,
        help="where the report goes (default: bench/results)",
    )
    parser.add_argument(
        "--fake",
        choices=("auto", "nginx", "simulator"),
        default="auto",
        help="zero-latency fake: nginx when installed (auto), else the simulator",
    )
    parser.add_argument(
        "--driver",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk when installed (auto), else a Python loop",
    )
    parser.add_argument("--runs", type=int, help="runs per figure (median taken)")
    parser.add_argument("--duration", type=float, help="seconds per run")
    parser.add_argument("--no-png", action="store_true", help="skip the chart")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--only",
        choices=("growth",),
        help="run one scenario alone: growth (the store at 10k and 1M tasks, bench/growth.py)",
    )
    parser.add_argument(
        "--no-growth", action="store_true", help="skip the growth scenario of the full run"
    )
    growth.add_arguments(parser)
    return parser.parse_args(argv)


def unused_stem(out_dir: Path, base: str) -> str:
    """Return `base`, or `base-2`, `base-3`...: a later run the same day keeps the earlier one."""
    stem, n = base, 1
    while (out_dir / f"{stem}.json").exists() or (out_dir / f"{stem}.md").exists():
        n += 1
        stem = f"{base}-{n}"
    return stem


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the report; return the exit status."""
    args = parse_args(argv)
    if args.only == "growth":
        return growth.run_and_report(args)
    log = Log()
    has_nginx = shutil.which("nginx") is not None
    fake = args.fake if args.fake != "auto" else ("nginx" if has_nginx else "simulator")
    driver = args.driver if args.driver != "auto" else ("wrk" if drivers.wrk_path() else "python")
    if fake == "nginx" and not has_nginx:
        raise SystemExit("--fake nginx: nginx is not installed")
    if driver == "wrk" and drivers.wrk_path() is None:
        raise SystemExit("--driver wrk: wrk is not installed")
    plan = make_plan(args, driver)
    load_before = os.getloadavg()[0]
    date = time.strftime("%Y-%m-%d")
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = unused_stem(out_dir, f"{date}-smoke" if plan.smoke else date)
    workdir = Path(tempfile.mkdtemp(prefix="bailian-bench-"))
    stack = Stack(workdir)
    log(
        f"plan: {'smoke' if plan.smoke else 'full'}, fake {fake}, driver {driver}, "
        f"work dir {workdir}"
    )
    try:
        data = run(plan, fake, driver, has_nginx, stack, out_dir, stem, log)
        data["meta"]["loadavg"] = [load_before, os.getloadavg()[0]]
    except BaseException:
        for proc in stack.procs:
            tail = proc.log_tail(15)
            if tail:
                print(f"--- {proc.name} ({proc.log_path}) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    data["meta"]["command"] = " ".join(
        ["python bench/run.py", *[shlex.quote(a) for a in (argv or sys.argv[1:])]]
    )
    if plan.png:
        png = out_dir / f"{stem}.png"
        report.chart(data, png)
        data["meta"]["png"] = png.name
    md = out_dir / f"{stem}.md"
    md.write_text(report.markdown(data))
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    log(f"wrote {md}")
    print("\n".join(report.targets_table(data["checks"])))
    if not plan.smoke and not args.no_growth:
        # After the gateway's processes are gone: the stores are built on the same two cores.
        growth.run_and_report(args)
    return 0


def run(
    plan: Plan,
    fake: str,
    driver: str,
    has_nginx: bool,
    stack: Stack,
    out_dir: Path,
    stem: str,
    log: Log,
) -> dict[str, Any]:
    """Start everything, make the tasks, measure, profile; return the report's data."""
    if fake == "nginx":
        running, done = stack.nginx_fakes()
    else:
        running = stack.simulator("fake-running", running_seconds=HUGE_SECONDS)
        done = stack.simulator("fake-done", running_seconds=0)
    # The delay must not cost CPU: the simulator sleeps in a thread per connection and, at 200
    # connections, is CPU-bound below 1,000 req/s on two cores, taking them from the gateway.
    if fake == "nginx" and ECHO_MODULE.exists():
        slow_fake = f"nginx echo_sleep {SLOW_LATENCY_MS:.0f} ms (canned JSON)"
        slow = stack.nginx_slow_fake(SLOW_LATENCY_MS)
    else:
        slow_fake = f"simulator with {SLOW_LATENCY_MS:.0f} ms latency"
        slow = stack.simulator(
            "fake-slow", running_seconds=HUGE_SECONDS, latency_ms=SLOW_LATENCY_MS
        )
    endpoints = Endpoints(fake_running=running, fake_done=done, fake_slow=slow)
    if has_nginx:
        proxies = stack.nginx_proxies({"running": running, "done": done, "slow": slow})
        endpoints.proxy_running = proxies["running"]
        endpoints.proxy_done = proxies["done"]
        endpoints.proxy_slow = proxies["slow"]
    log(f"fakes up: {endpoints}")
    gateway = stack.gateway(endpoints)
    log(f"gateway up at {gateway.url}, pids {gateway.pids()}")
    floor = stack.flask_floor()
    log(f"Flask floor up at {floor.url}, pids {floor.pids()}")

    running_ids = make_tasks(gateway, RUNNING_MODEL, plan.tasks, "RUNNING", log)
    done_ids = make_tasks(gateway, DONE_MODEL, plan.tasks, "SUCCEEDED", log)
    slow_ids = make_tasks(gateway, SLOW_MODEL, plan.tasks, "RUNNING", log)
    files = stack.workdir
    for name, ids in (("running", running_ids), ("done", done_ids), ("slow", slow_ids)):
        (files / f"ids-{name}.txt").write_text("\n".join(ids) + "\n")
    (files / "submit.json").write_bytes(submit_body(RUNNING_MODEL))

    def origins(direct: str, proxy: str | None, with_floor: bool = True) -> dict[str, str]:
        found = {"direct": direct}
        if proxy:
            found["nginx"] = proxy
        if with_floor:
            found["floor"] = floor.url
        found["gateway"] = gateway.url
        return found

    scenarios = [
        Scenario(
            "query_running",
            "1",
            "query of a running task (upstream call)",
            "query running",
            "GET",
            origins(running, endpoints.proxy_running),
            files / "ids-running.txt",
        ),
        Scenario(
            "query_done",
            "2",
            "query of a finished task (from the store)",
            "query finished",
            "GET",
            origins(done, endpoints.proxy_done),
            files / "ids-done.txt",
        ),
        Scenario(
            "submit",
            "3",
            "submit",
            "submit",
            "POST",
            origins(running, endpoints.proxy_running),
            body_path=files / "submit.json",
        ),
        Scenario(
            "query_slow",
            "4",
            f"query, {SLOW_LATENCY_MS:.0f} ms upstream",
            f"query {SLOW_LATENCY_MS:.0f} ms up",
            "GET",
            origins(slow, endpoints.proxy_slow, with_floor=False),
            files / "ids-slow.txt",
        ),
    ]
    cases = measure(plan, driver, scenarios, gateway, floor, log)
    burst = measure_burst(
        plan, origins(running, endpoints.proxy_running, with_floor=False), gateway, log
    )
    checks = check_targets(plan, cases, burst)
    profile: dict[str, Any] | None = None
    if plan.profile:
        try:
            profile = run_profile(plan, driver, scenarios, gateway, out_dir, stem, log)
        except Exception as exc:  # the measurements above must still make a report
            log(f"profile failed: {exc!r}")
            profile = {"note": f"The profile failed: {exc!r}."}
    versions = tool_versions()
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "smoke": plan.smoke,
            "runs": plan.runs,
            "duration": plan.duration,
            "slow_duration": plan.slow_duration,
            "warmup": plan.warmup,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # Which build matters as much as which version: see the README's "Performance".
            "python": f"{platform.python_version()} ({os.path.realpath(sys.executable)})",
            "driver": f"wrk ({versions.get('wrk', '?')})" if driver == "wrk" else "Python loop",
            "fake": f"nginx canned JSON ({versions.get('nginx', '?')})"
            if fake == "nginx"
            else "simulator (zero latency)",
            "nginx_reference": has_nginx,
            "slow_latency_ms": SLOW_LATENCY_MS,
            "slow_fake": slow_fake,
            "gunicorn": gunicorn_summary(),
            "gateway_log": gateway_log_summary(gateway.master.log_path),
            "plan": {k: v for k, v in plan.__dict__.items()},
        },
        "cases": cases,
        "burst": burst,
        "checks": checks,
        "profile": profile,
    }


if __name__ == "__main__":
    sys.exit(main())
