"""The reconciler: replays the journal, adopts tasks left in flight, refreshes, forgets.

One pass at a time runs across every worker and instance (a lease in the database), in the
service every `[tasks] reconcile_interval` seconds and as `bailian-gateway reconcile`. Only
the journal replay runs without the lease: each instance's journal is its own file.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from app import refresh
from app.billing.ledger import Settlement, outstanding, unsettled_final_tasks
from app.billing.prices import Estimate, estimate, to_cent
from app.billing.settlement import settle
from app.config import Channel
from app.gateway import Gateway
from app.journal import Entry
from app.observability import metrics
from app.store import claim_refresh, utcnow
from app.store.leases import acquire_lease, release_lease
from app.store.rates import forget_call_counts
from app.store.submissions import (
    AcceptedTask,
    Owner,
    Submission,
    in_flight,
    known_task_ids,
    mark_ambiguous,
    mark_not_created,
    record_accepted,
    record_orphan,
)
from app.store.tasks import archive_tasks, due_for_refresh
from app.store.uploads import forget_expired_uploads
from app.upstream import UpstreamAnswer, UpstreamError

log = logging.getLogger(__name__)

LEASE = "reconciler"
# DashScope's listing takes and gives times in Beijing time.
LISTING_TIMEZONE_OFFSET = timedelta(hours=8)
LISTING_PAGE_SIZE = 100
# How far DashScope's clock may run behind ours, as seen in a task's creation time. Kept small:
# a task created before the submit was sent cannot be its own (another program's, on a key
# shared with the gateway, say).
CLOCK_SKEW = timedelta(seconds=5)
# Tasks moved out of the hot table per pass, in batches: enough to keep up with any submit rate
# a deployment sees, small enough that no transaction holds the database for long.
ARCHIVE_BATCH = 1000
# Finished tasks left unsettled that one pass settles (each is one short transaction).
SETTLE_PER_PASS = 5000
ARCHIVE_PER_PASS = 50_000


@dataclass
class PassReport:
    """What one pass did, as counts and as the lines its log carried."""

    replayed: int = 0
    adopted: int = 0
    not_created: int = 0
    refreshed: int = 0
    settled: int = 0
    archived: int = 0
    skipped: bool = False
    errors: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Return the pass in one line."""
        if self.skipped:
            return "reconcile: skipped, another reconciler holds the lease"
        text = (
            f"reconcile: {self.replayed} replayed, {self.adopted} adopted, "
            f"{self.not_created} created nothing, {self.refreshed} refreshed, "
            f"{self.settled} settled, {self.archived} archived"
        )
        return text + (f", errors in: {', '.join(self.errors)}" if self.errors else "")


class Reconciler:
    """Reconcile one gateway's database with the journal and with DashScope."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.clock = clock
        self.sleep = sleep
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When each channel may next be asked, to keep to its query budget.
        self._next_call: dict[str, float] = {}

    # ------------------------------------------------------------------ one pass

    def run_pass(self) -> PassReport:
        """Run one pass: replay the journal, then, holding the lease, the upstream work."""
        report = PassReport()
        self._step(report, "journal", self.replay_journal)
        now = self.clock()
        if not self._step(report, "lease", lambda r: self._acquire(r, now)):
            report.skipped = True
            metrics.reconciler_passes.labels("skipped").inc()
            return report
        try:
            self._step(report, "adoption", self.resolve_in_flight)
            self._step(report, "refresh", self.refresh_running)
            self._step(report, "settlement", self.settle_finished)
            self._step(report, "retention", self.archive_expired)
        finally:
            self._step(report, "lease", lambda _r: self._release())
        metrics.reconciler_passes.labels("error" if report.errors else "ok").inc()
        return report

    def _step(self, report: PassReport, name: str, step: Callable[[PassReport], Any]) -> Any:
        try:
            return step(report)
        except (SQLAlchemyError, UpstreamError, OSError) as exc:
            metrics.reconciler_errors.labels(name).inc()
            log.warning("reconciler step failed: %s", type(exc).__name__, extra={"step": name})
            report.errors.append(name)
            return None

    def _acquire(self, _report: PassReport, now: datetime) -> bool:
        # Long enough for the slowest pass the budget allows; released as soon as it ends.
        seconds = 2 * self._pass_seconds() + 60
        return acquire_lease(self.gateway.engine, LEASE, self.holder, now, seconds)

    def _release(self) -> None:
        release_lease(self.gateway.engine, LEASE, self.holder, self.clock())

    def _pass_seconds(self) -> float:
        # A pass may spend up to an interval on upstream queries; a one-shot run (the loop off,
        # cron) the default interval's worth.
        return self.settings.reconcile_interval or 30.0

    def _event(self, report: PassReport, message: str, level: int, **fields: Any) -> None:
        """Log one event of the pass and keep it for `bailian-gateway reconcile` to print."""
        log.log(level, message, extra=fields)
        shown = " ".join(f"{name}={value}" for name, value in fields.items())
        report.lines.append(f"{message} {shown}")

    # ------------------------------------------------------------------ the journal

    def replay_journal(self, report: PassReport) -> None:
        """Record every journaled task in the database, each once however often replayed."""

        def apply(entry: Entry) -> None:
            try:
                accepted = AcceptedTask(
                    submission_id=int(entry["submission_id"]),
                    task_id=str(entry["task_id"]),
                    status=str(entry["status"]),
                    upstream_body=str(entry["upstream_body"]),
                    accepted_at=datetime.fromisoformat(entry["accepted_at"]),
                )
            except (KeyError, TypeError, ValueError):
                # Not a line the gateway wrote: kept aside for an operator, never retried.
                self.gateway.journal.reject(entry)
                self._event(report, "journal line rejected", logging.ERROR)
                return
            owner = Owner(
                int(entry["account_id"]),
                int(entry["key_id"]),
                str(entry["channel"]),
                str(entry["model"]),
                accepted.accepted_at,
                str(entry.get("service_path", "")),
                str(entry.get("body_sha256", "")),
            )
            try:
                record_accepted(self.gateway.engine, accepted, by="journal", owner=owner)
            except LookupError:
                cost = self._estimate_of(entry)
                record_orphan(self.gateway.engine, accepted, owner, cost)
            metrics.journal_lines.labels("replayed").inc()
            report.replayed += 1
            self._event(
                report,
                "journal replayed",
                logging.INFO,
                task_id=accepted.task_id,
                channel=entry.get("channel"),
            )

        self.gateway.journal.replay(apply)

    def _estimate_of(self, entry: Entry) -> Estimate | None:
        """Return a journal line's estimate, or the model's default one for an older line."""
        try:
            return Estimate(
                str(entry["estimate_tier"]),
                Decimal(str(entry["estimate_seconds"])),
                Decimal(str(entry["estimate"])),
            )
        except (KeyError, ArithmeticError):
            pricing = self.settings.pricing.get(str(entry["model"]))
            return estimate(pricing, None) if pricing is not None else None

    # ------------------------------------------------------------------ submissions in flight

    def resolve_in_flight(self, report: PassReport) -> None:
        """Adopt the tasks of submissions left in flight, or mark that they created none."""
        now = self.clock()
        # A submission younger than this may still be waiting for its answer in a request.
        grace = timedelta(
            seconds=self.settings.connect_timeout
            + self.settings.read_timeout
            + self.settings.record_retry_seconds
            + 5
        )
        everything = in_flight(self.gateway.engine, sent_before=now)
        stuck = [s for s in everything if s.sent_at <= now - grace]
        groups: dict[tuple[str, str], list[Submission]] = defaultdict(list)
        for submission in everything:
            groups[(submission.channel, submission.model)].append(submission)
        for (channel_name, model), group in groups.items():
            mine = [s for s in group if s in stuck]
            if not mine:
                continue
            channel = self.gateway.pool.get(channel_name)
            if channel is None:
                continue  # the channel was removed: an operator must look at its tasks
            self._resolve_group(report, channel, model, mine, group, now)
        metrics.submissions_unresolved.set(len(in_flight(self.gateway.engine, sent_before=now)))

    def _resolve_group(
        self,
        report: PassReport,
        channel: Channel,
        model: str,
        stuck: list[Submission],
        competitors: list[Submission],
        now: datetime,
    ) -> None:
        window = timedelta(seconds=self.settings.adoption_window_seconds)
        start = min(s.sent_at for s in stuck) - CLOCK_SKEW
        end = min(max(s.sent_at for s in stuck) + window, now)
        listed = self._listing(channel, model, start, end)
        known = known_task_ids(self.gateway.engine, [task_id for task_id, _ in listed])
        unowned = sorted(
            ((created, task_id) for task_id, created in listed if task_id not in known),
        )
        taken: set[str] = set()
        for submission in stuck:
            low, high = submission.sent_at - CLOCK_SKEW, submission.sent_at + window
            candidates = [
                (created, task_id)
                for created, task_id in unowned
                if low <= created <= high and task_id not in taken
            ]
            # Past this, DashScope's listing covers the whole window in which the task could
            # have been created.
            window_closed = now >= high + CLOCK_SKEW
            if not candidates:
                if window_closed:
                    self._created_nothing(report, channel, submission, now)
                continue
            created, task_id = candidates[0]
            if self._contested(submission, created, competitors, window):
                if window_closed:
                    mark_ambiguous(self.gateway.engine, submission.id, now)
                    self._event(
                        report,
                        "adoption ambiguous, left to an operator",
                        logging.ERROR,
                        submission=submission.id,
                        channel=channel.name,
                    )
                continue
            taken.add(task_id)
            self._adopt(report, channel, submission, task_id, now)

    def _created_nothing(
        self, report: PassReport, channel: Channel, submission: Submission, now: datetime
    ) -> None:
        if mark_not_created(self.gateway.engine, submission.id, now, by="reconciler"):
            report.not_created += 1
            self._event(
                report,
                "submission created nothing",
                logging.INFO,
                submission=submission.id,
                channel=channel.name,
            )

    @staticmethod
    def _contested(
        submission: Submission,
        created: datetime,
        competitors: list[Submission],
        window: timedelta,
    ) -> bool:
        """Return whether another account's submission could as well have created the task."""
        return any(
            other.account_id != submission.account_id
            and other.sent_at - CLOCK_SKEW <= created <= other.sent_at + window
            for other in competitors
        )

    def _adopt(
        self,
        report: PassReport,
        channel: Channel,
        submission: Submission,
        task_id: str,
        now: datetime,
    ) -> None:
        answer = self._throttled(channel, partial(self.gateway.client.query_task, channel, task_id))
        if answer.status == 200 and answer.task_status:
            status, body = answer.task_status, answer.body.decode()
        else:  # recorded as the submit's answer would have said; the next refresh says more
            status = "PENDING"
            body = json.dumps({"output": {"task_id": task_id, "task_status": status}})
        accepted = AcceptedTask(submission.id, task_id, status, body, now)
        if not record_accepted(self.gateway.engine, accepted, by="reconciler"):
            return
        report.adopted += 1
        metrics.tasks_adopted.labels(channel.name).inc()
        refresh.count_transition(metrics.NEW_TASK, status)
        self._event(
            report,
            "task adopted",
            logging.WARNING,
            task_id=task_id,
            channel=channel.name,
            submission=submission.id,
        )

    def _listing(
        self, channel: Channel, model: str, start: datetime, end: datetime
    ) -> list[tuple[str, datetime]]:
        """Return (task id, creation time) of the channel's tasks of a model in a window."""
        found: list[tuple[str, datetime]] = []
        for page_no in range(1, 1000):
            params = {
                "page_no": str(page_no),
                "page_size": str(LISTING_PAGE_SIZE),
                "model_name": model,
                "start_time": _listing_time(start),
                "end_time": _listing_time(end),
            }
            answer = self._throttled(
                channel, partial(self.gateway.client.list_tasks, channel, params)
            )
            if answer.status != 200:
                raise UpstreamError(channel.name, f"task listing answered HTTP {answer.status}")
            items = answer.data.get("data")
            items = items if isinstance(items, list) else []
            for item in items:
                if not isinstance(item, dict):
                    continue
                task_id, created = item.get("task_id"), item.get("gmt_create")
                if isinstance(task_id, str) and isinstance(created, int | float):
                    found.append((task_id, _from_epoch_ms(created)))
            if len(items) < LISTING_PAGE_SIZE:
                break
        return found

    # ------------------------------------------------------------------ running tasks

    def refresh_running(self, report: PassReport) -> None:
        """Refresh the running tasks nobody polled lately, within each channel's query budget."""
        now = self.clock()
        settings = self.settings
        budget = max(1, int(settings.reconcile_queries_per_second * self._pass_seconds()))
        cutoff = now - timedelta(hours=settings.retention_hours)
        due = due_for_refresh(
            self.gateway.engine,
            now,
            settings.refresh_interval,
            cutoff,
            limit=budget * max(1, len(self.gateway.pool.channels)),
        )
        spent: dict[str, int] = defaultdict(int)
        for task in due:
            channel = self.gateway.pool.get(task.channel)
            if channel is None or spent[channel.name] >= budget:
                continue
            if not claim_refresh(
                self.gateway.engine, task.task_id, self.clock(), settings.refresh_interval
            ):
                continue  # a client's query refreshed it meanwhile
            spent[channel.name] += 1
            on_settled = partial(self._settled, report)
            refreshing = partial(refresh.refresh_task, self.gateway, channel, task, on_settled)
            if isinstance(self._throttled(channel, refreshing), UpstreamAnswer):
                report.refreshed += 1

    # ------------------------------------------------------------------ settlement

    def settle_finished(self, report: PassReport) -> None:
        """Settle finished tasks whose reservation is still held (a settlement that failed)."""
        for task_id, status, usage in unsettled_final_tasks(self.gateway.engine, SETTLE_PER_PASS):
            settled = settle(self.gateway, task_id, status, usage)
            if settled is not None:
                self._settled(report, settled)
        metrics.reservations_outstanding.set(float(outstanding(self.gateway.engine)))

    def _settled(self, report: PassReport, settled: Settlement) -> None:
        # app/billing/settlement.py logged it already: the report only keeps the line to print.
        report.settled += 1
        report.lines.append(
            f"task settled task_id={settled.task_id} charged={to_cent(settled.charged)}"
        )

    def _throttled(self, channel: Channel, call: Callable[[], Any]) -> Any:
        """Make an upstream call no sooner than the channel's query budget allows."""
        spacing = 1.0 / self.settings.reconcile_queries_per_second
        wait = self._next_call.get(channel.name, 0.0) - time.monotonic()
        if wait > 0:
            self.sleep(wait)
        self._next_call[channel.name] = time.monotonic() + spacing
        return call()

    # ------------------------------------------------------------------ retention

    def archive_expired(self, report: PassReport) -> None:
        """Move tasks past the retention window out of the hot table, in short transactions."""
        now = self.clock()
        cutoff = now - timedelta(hours=self.settings.retention_hours)
        while report.archived < ARCHIVE_PER_PASS:
            moved = archive_tasks(self.gateway.engine, cutoff, now, ARCHIVE_BATCH)
            report.archived += moved
            if moved < ARCHIVE_BATCH:
                break
        # Upload directories DashScope has deleted its files from (after 48 h) bind nothing.
        forget_expired_uploads(self.gateway.engine, now)
        # A rate limit counts the current second only; past seconds are dead rows.
        forget_call_counts(self.gateway.engine, now - timedelta(minutes=1))

    # ------------------------------------------------------------------ in the service

    def start_in_background(self) -> None:
        """Run a pass every reconcile_interval seconds in a daemon thread of this process."""
        if self.settings.reconcile_interval <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self._thread.start()
        # A preloaded app is forked into workers: each child needs a thread of its own.
        os.register_at_fork(after_in_child=self._restart_in_child)

    def _restart_in_child(self) -> None:
        self._stop = threading.Event()
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background loop after its current pass."""
        self._stop.set()

    def _loop(self) -> None:
        # The first pass soon after start (a journal left by a crash is replayed), spread so
        # that the workers of an instance do not all ask for the lease at once.
        first = min(5.0, self.settings.reconcile_interval) * (0.5 + secrets.randbelow(500) / 1000)
        delay = first
        while not self._stop.wait(delay):
            try:
                self.run_pass()
            except Exception:  # the loop must outlive any one pass
                log.exception("reconciler pass failed")
            delay = self.settings.reconcile_interval


def _listing_time(moment: datetime) -> str:
    return (moment + LISTING_TIMEZONE_OFFSET).strftime("%Y%m%d%H%M%S")


def _from_epoch_ms(value: float) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC).replace(tzinfo=None)


def iter_lines(report: PassReport) -> Iterator[str]:
    """Return what `bailian-gateway reconcile` prints for a pass."""
    yield from report.lines
    yield report.summary()
