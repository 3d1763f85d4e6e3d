"""Growth: the store's reads and the reconciler's pass with 10k tasks and with 1M, side by side.

    .venv/bin/python bench/run.py --only growth          # bench/results/<date>-growth.md/.json
    .venv/bin/python bench/growth.py --sizes 2000,20000  # the same, other sizes

Each store is built with bulk inserts through the gateway's own tables (its triggers and
indexes included), on SQLite and, when reachable, on PostgreSQL: 90% of the tasks are one
account's (the one listed), spread over the retention window; the rest are ten others'.
Measured with the store functions the routes call: the median ownership read (a task query's
first step), one page of `GET /tasks` for each documented filter, and one reconciler pass
(each pass archives the same 100 expired tasks at every size, so the ratio is the table's).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import Engine, create_engine, func, insert, make_url, select, text

from app import create_app
from app.reconcile import Reconciler
from app.store import create_key, find_caller, get_owned_task, hash_secret, open_engine
from app.store.tables import submissions, tasks
from app.store.tasks import list_owned_tasks

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_SIZES = (10_000, 1_000_000)
SMOKE_SIZES = (600, 1200)
MODELS = ("wan2.5-t2v-preview", "wan2.2-t2v-plus", "wanx2.1-kf2v-plus")
MODEL_WEIGHTS = (6, 3, 1)
# A video takes minutes: the tasks of the last ten minutes are still running or pending in
# part (with their reservations held), the older ones all finished.
STATUSES = ("SUCCEEDED", "FAILED", "CANCELED", "RUNNING", "PENDING")
RECENT_WEIGHTS = (55, 4, 1, 30, 10)
FINISHED_WEIGHTS = (92, 6, 2, 0, 0)
STILL_RUNNING = timedelta(minutes=10)
RETENTION = timedelta(hours=24)
LISTING_SHARE = 0.9
OTHER_ACCOUNTS = 10
PASSES = 5
EXPIRED_PER_PASS = 100
# A channel the bench's gateway has not: the reconciler's refresh scan reads the running tasks
# due and skips them, so a pass measures the database and no upstream.
GONE_CHANNEL = "gone"
CHUNK = 10_000


@dataclass(frozen=True)
class Filter:
    """One documented filter of `GET /tasks`, as the route passes it to the store."""

    label: str
    status: str | None = None
    model: str | None = None
    # Hours before the store's time: start_time and end_time.
    window: tuple[float, float] | None = None
    page_no: int = 1
    page_size: int = 10


FILTERS = (
    Filter("no filter"),
    Filter("status=SUCCEEDED", status="SUCCEEDED"),
    Filter("status=RUNNING", status="RUNNING"),
    Filter(f"model_name={MODELS[0]}", model=MODELS[0]),
    Filter(f"model_name={MODELS[1]} & status=FAILED", model=MODELS[1], status="FAILED"),
    Filter("start_time & end_time (6 h 20 min)", window=(8.4, 2.07)),
    Filter("start_time & end_time & status=SUCCEEDED", status="SUCCEEDED", window=(8.4, 2.07)),
    Filter("page_size=100", page_size=100),
    Filter("page_no=50 & page_size=100", page_no=50, page_size=100),
)


def body(task_id: str, status: str, final: bool) -> str:
    """Return an answer of DashScope's shape and size, as the store keeps it."""
    output: dict[str, Any] = {
        "task_id": task_id,
        "task_status": status,
        "submit_time": "2026-12-02 20:00:00.000",
        "scheduled_time": "2026-12-02 20:00:01.000",
    }
    answer: dict[str, Any] = {"request_id": secrets.token_hex(16), "output": output}
    if final:
        output["end_time"] = "2026-12-02 20:03:00.000"
        output["video_url"] = f"https://dashscope-result.oss.example/{task_id}.mp4?Expires=1"
        answer["usage"] = {"video_duration": 5, "video_ratio": "1280*720", "video_count": 1}
    return json.dumps(answer)


@dataclass
class Store:
    """A built store: its engine, the listed account, and the tasks it holds."""

    backend: str
    url: str
    engine: Engine
    size: int
    now: datetime
    account_id: int
    sample_ids: list[str]


def build(backend: str, url: str, size: int, now: datetime, log: Callable[[str], None]) -> Store:
    """Fill an empty database with `size` tasks (and their submissions) by bulk inserts."""
    engine = open_engine(url)
    owners = []
    for n in range(1 + OTHER_ACCOUNTS):
        caller = find_caller(engine, hash_secret(create_key(engine, f"account-{n}")))
        assert caller is not None
        owners.append((caller.account_id, caller.key_id))
    rng = random.Random(size)
    expired = PASSES * EXPIRED_PER_PASS
    live = size - expired
    # The live tasks are spread evenly over the window but its first 10 minutes; the expired
    # ones, 100 a minute just before it, so that each pass's clock expires the next 100.
    span = (RETENTION - timedelta(minutes=10)).total_seconds()
    started = time.monotonic()
    sample: list[str] = []
    task_rows: list[dict[str, Any]] = []
    submission_rows: list[dict[str, Any]] = []

    def flush() -> None:
        with engine.begin() as conn:
            conn.execute(insert(tasks), task_rows)
            conn.execute(insert(submissions), submission_rows)
        task_rows.clear()
        submission_rows.clear()

    for i in range(size):
        if i < expired:
            account_id, key_id = owners[1 + i % OTHER_ACCOUNTS]
            submitted = now - RETENTION + timedelta(minutes=i // EXPIRED_PER_PASS, seconds=-30)
        else:
            listing = rng.random() < LISTING_SHARE
            account_id, key_id = owners[0] if listing else owners[1 + i % OTHER_ACCOUNTS]
            submitted = now - timedelta(seconds=span * (size - 1 - i) / max(live, 1))
        task_id = f"{i:08d}-{secrets.token_hex(12)}"
        recent = submitted > now - STILL_RUNNING
        status = rng.choices(STATUSES, RECENT_WEIGHTS if recent else FINISHED_WEIGHTS)[0]
        final = status in ("SUCCEEDED", "FAILED", "CANCELED")
        if account_id == owners[0][0] and len(sample) < 1000 and rng.random() < 0.01:
            sample.append(task_id)
        task_rows.append(
            {
                "task_id": task_id,
                "account_id": account_id,
                "key_id": key_id,
                "channel": GONE_CHANNEL,
                "model": rng.choices(MODELS, MODEL_WEIGHTS)[0],
                "status": status,
                "upstream_body": body(task_id, status, final),
                "submitted_at": submitted,
                "refreshed_at": submitted + timedelta(minutes=3) if final else now,
                "finished_at": submitted + timedelta(minutes=3) if final else None,
            }
        )
        submission_rows.append(
            {
                "account_id": account_id,
                "key_id": key_id,
                "model": task_rows[-1]["model"],
                "channel": GONE_CHANNEL,
                "service_path": "/api/v1/services/aigc/video-generation/video-synthesis",
                "body_sha256": secrets.token_hex(32),
                "state": "accepted",
                "task_id": task_id,
                "sent_at": submitted,
                "resolved_at": submitted,
                "resolved_by": "answer",
                "estimate": Decimal("3.000000"),
                "estimate_tier": "720P",
                "estimate_seconds": Decimal("5.000"),
                "billing_state": "settled" if final else "reserved",
                "billing_period": submitted.strftime("%Y-%m"),
            }
        )
        if len(task_rows) >= CHUNK:
            flush()
    if task_rows:
        flush()
    if backend == "postgresql":
        # What autovacuum does after a load: statistics, and the visibility map that lets
        # an index answer a count alone.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    log(f"{backend}: built {size:,} tasks in {time.monotonic() - started:.1f} s")
    return Store(backend, url, engine, size, now, owners[0][0], sample)


def median_ms(call: Callable[[], Any], repeat: int) -> float:
    """Return the median wall time of `repeat` calls, after one unmeasured call."""
    call()
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def measure(store: Store, repeat: int, tmp: Path) -> dict[str, Any]:
    """Return the store's medians in milliseconds: ownership read, each list, a pass."""
    engine, now, account = store.engine, store.now, store.account_id
    cutoff = now - RETENTION
    ids = iter(store.sample_ids * (1 + 50 * repeat // max(len(store.sample_ids), 1)))
    results: dict[str, Any] = {
        "ownership read": median_ms(
            lambda: get_owned_task(engine, account, next(ids), cutoff), 50 * repeat
        ),
    }
    totals: dict[str, int] = {}
    counted: dict[str, int] = {}
    bounds: dict[str, tuple[datetime, datetime | None]] = {}
    for spec in FILTERS:

        def page(spec: Filter = spec) -> None:
            after, before = cutoff, None
            if spec.window is not None:
                # As the route: the later of start_time and the retention cutoff.
                after = max(now - timedelta(hours=spec.window[0]), cutoff)
                before = now - timedelta(hours=spec.window[1])
            total, _rows = list_owned_tasks(
                engine,
                account,
                submitted_after=after,
                submitted_before=before,
                status=spec.status,
                model=spec.model,
                offset=(spec.page_no - 1) * spec.page_size,
                limit=spec.page_size,
            )
            totals[spec.label] = total
            bounds[spec.label] = (after, before)

        results[f"list: {spec.label}"] = median_ms(page, repeat)
        # Outside the timed calls: the plain count is what the list no longer does.
        counted[spec.label] = plain_count(engine, account, *bounds[spec.label], spec)
        if totals[spec.label] != counted[spec.label]:
            raise RuntimeError(f"{spec.label}: total {totals[spec.label]}, COUNT(*) {counted}")
    results["reconciler pass"] = reconciler_pass_ms(store, tmp)
    with engine.connect() as conn:
        hot = conn.execute(text("SELECT COUNT(*) FROM tasks")).scalar_one()
        archived = conn.execute(text("SELECT COUNT(*) FROM task_archive")).scalar_one()
    return {
        "ms": results,
        "totals": totals,
        "hot_tasks_after": int(hot),
        "archived": int(archived),
    }


def plain_count(
    engine: Engine, account: int, after: datetime, before: datetime | None, spec: Filter
) -> int:
    """Return COUNT(*) over tasks of a list's conditions: what its total must equal."""
    conditions = [tasks.c.account_id == account, tasks.c.submitted_at > after]
    if before is not None:
        conditions.append(tasks.c.submitted_at <= before)
    if spec.status is not None:
        conditions.append(tasks.c.status == spec.status)
    if spec.model is not None:
        conditions.append(tasks.c.model == spec.model)
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(*conditions)).scalar_one())


def reconciler_pass_ms(store: Store, tmp: Path) -> float:
    """Return the median of PASSES reconciler passes, each expiring the next 100 tasks."""
    config = tmp / f"growth-{store.backend}-{store.size}.toml"
    config.write_text(
        "[tasks]\nreconcile_interval = 0\n\n"
        '[[channels]]\nname = "primary"\nbase_url = "http://127.0.0.1:9"\n'
        'api_key_env = "GROWTH_UPSTREAM_KEY"\nmodels = ["wan2.5-t2v-preview"]\n'
    )
    app = create_app(
        {
            "GATEWAY_CONFIG": str(config),
            "GATEWAY_DATABASE_URL": store.url,
            "GATEWAY_INSTANCE_PATH": str(tmp / f"instance-{store.backend}-{store.size}"),
            "GROWTH_UPSTREAM_KEY": "sk-growth-unused",
        }
    )
    gateway = app.extensions["gateway"]
    times = []
    try:
        for n in range(PASSES):
            clock = store.now + timedelta(minutes=n, seconds=1)
            reconciler = Reconciler(gateway, clock=lambda clock=clock: clock, sleep=lambda _s: None)
            began = time.perf_counter()
            report = reconciler.run_pass()
            times.append(time.perf_counter() - began)
            if report.errors or report.archived != EXPIRED_PER_PASS:
                raise RuntimeError(f"pass {n}: {report.summary()}")
    finally:
        gateway.engine.dispose()
    return statistics.median(times) * 1000


@contextmanager
def sqlite_url(tmp: Path, size: int) -> Iterator[str]:
    """Return the URL of a new SQLite file."""
    yield f"sqlite:///{tmp / f'growth-{size}.sqlite3'}"


@contextmanager
def postgresql_url(base: str, size: int) -> Iterator[str]:
    """Return the URL of a schema of its own in the PostgreSQL database, dropped afterwards."""
    schema = f"growth_{size}_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        admin.dispose()


def postgresql_reachable(url: str | None) -> bool:
    """Return whether the PostgreSQL URL answers."""
    if not url:
        return False
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # any failure means: not reachable, measure SQLite alone
        return False
    finally:
        engine.dispose()


def run(
    sizes: tuple[int, ...],
    repeat: int,
    pg_url: str | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Build and measure every store; return the results by backend and size."""
    backends = ["sqlite"] + (["postgresql"] if postgresql_reachable(pg_url) else [])
    if "postgresql" not in backends:
        log(f"growth: PostgreSQL not reachable at {pg_url!r}: SQLite only")
    now = datetime.now().replace(tzinfo=None)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bailian-growth-") as work:
        tmp = Path(work)
        for backend in backends:
            for size in sizes:
                place = (
                    sqlite_url(tmp, size)
                    if backend == "sqlite"
                    else postgresql_url(pg_url or "", size)
                )
                with place as url:
                    store = build(backend, url, size, now, log)
                    try:
                        found = measure(store, repeat, tmp)
                    finally:
                        store.engine.dispose()
                    results.setdefault(backend, {})[str(size)] = found
                    log(f"{backend}: measured {size:,} tasks")
                if backend == "sqlite":
                    Path(url.removeprefix("sqlite:///")).unlink(missing_ok=True)
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "sizes": list(sizes),
            "repeat": repeat,
            "backends": backends,
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg()[0],
            "listing_share": LISTING_SHARE,
            "retention_hours": RETENTION.total_seconds() / 3600,
            "expired_per_pass": EXPIRED_PER_PASS,
        },
        "results": results,
    }


def markdown(data: dict[str, Any]) -> str:
    """Return the report: one row per measure, each backend's sizes side by side."""
    meta = data["meta"]
    small, large = (str(size) for size in meta["sizes"][:2])
    head = "| median ms |"
    rule = "|---|"
    for backend in meta["backends"]:
        head += f" {backend} {int(small):,} | {backend} {int(large):,} | ratio |"
        rule += "---:|---:|---:|"
    lines = [
        f"# Growth, {meta['date']}",
        "",
        f"Stores of {int(small):,} and {int(large):,} tasks, {meta['listing_share']:.0%} of "
        f"them the listed account's, within a {meta['retention_hours']:.0f} h retention window; "
        f"medians of {meta['repeat']} calls (the ownership read: {50 * meta['repeat']}); a pass "
        f"archives {meta['expired_per_pass']} expired tasks. {meta['cpus']} CPUs, load "
        f"{meta['loadavg']:.2f} at the end.",
        "",
        head,
        rule,
    ]
    first = data["results"][meta["backends"][0]][small]["ms"]
    for name in first:
        row = f"| {name} |"
        for backend in meta["backends"]:
            a = data["results"][backend][small]["ms"][name]
            b = data["results"][backend][large]["ms"][name]
            row += f" {a:.3f} | {b:.3f} | {b / a:.2f}x |" if a else f" {a} | {b} | n/a |"
        lines.append(row)
    lines += [
        "",
        "The totals the lists answered, each equal to a COUNT(*) of its conditions over tasks:",
        "",
    ]
    for backend in meta["backends"]:
        for size in (small, large):
            found = data["results"][backend][size]
            lines.append(
                f"- {backend} {int(size):,}: "
                + ", ".join(f"{k}: {v:,}" for k, v in found["totals"].items())
                + f"; after the passes {found['hot_tasks_after']:,} hot, "
                f"{found['archived']:,} archived"
            )
    return "\n".join(lines) + "\n"


def unused_stem(out_dir: Path, base: str) -> str:
    """Return `base`, or `base-2`, `base-3`...: a later run the same day keeps the earlier one."""
    stem, n = base, 1
    while (out_dir / f"{stem}.json").exists() or (out_dir / f"{stem}.md").exists():
        n += 1
        stem = f"{base}-{n}"
    return stem


def write(data: dict[str, Any], out_dir: Path, base: str) -> Path:
    """Write <base>.md and .json into out_dir; return the Markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = unused_stem(out_dir, base)
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(data))
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1, default=str))
    return md


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the growth scenario's options to a command line."""
    parser.add_argument(
        "--sizes", help="two store sizes, in tasks (default: 10000,1000000; --smoke: 600,1200)"
    )
    parser.add_argument("--repeat", type=int, help="calls per median (default: 15; --smoke: 2)")
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("GATEWAY_BENCH_DATABASE_URL")
        or os.environ.get("GATEWAY_TEST_DATABASE_URL"),
        help="a PostgreSQL database to measure in a schema of its own (default: "
        "GATEWAY_BENCH_DATABASE_URL, else GATEWAY_TEST_DATABASE_URL); unset: SQLite only",
    )


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and write the report."""
    parser = argparse.ArgumentParser(prog="bench/growth.py", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--smoke", action="store_true", help="tiny stores, 2 calls per median")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the report goes")
    args = parser.parse_args(argv)
    return run_and_report(args)


def run_and_report(args: argparse.Namespace) -> int:
    """Run the scenario with parsed options, print the table and write the report."""
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", flush=True)

    smoke = bool(getattr(args, "smoke", False))
    sizes = DEFAULT_SIZES if not smoke else SMOKE_SIZES
    if args.sizes:
        sizes = tuple(int(size) for size in str(args.sizes).split(","))
    repeat = args.repeat or (2 if smoke else 15)
    if len(sizes) != 2 or min(sizes) <= PASSES * EXPIRED_PER_PASS:
        raise SystemExit(f"--sizes: two sizes above {PASSES * EXPIRED_PER_PASS} tasks")
    data = run(sizes, repeat, args.pg_url, log)
    base = f"{time.strftime('%Y-%m-%d')}-growth" + ("-smoke" if smoke else "")
    md = write(data, args.out, base)
    print(md.read_text())
    log(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
