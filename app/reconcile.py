"""The reconciler: replays the journal, adopts tasks left in flight, refreshes, forgets.

One pass at a time runs across every worker and instance (a lease in the database), in the
service every `[tasks] reconcile_interval` seconds and as `bailian-gateway reconcile`. Only
the journal replay runs without the lease: each instance's journal is its own file.
"""

from __future__ import annotations

import itertools
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

from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from app import refresh
from app.billing.ledger import Settlement, outstanding, unsettled_final_tasks
from app.billing.prices import Estimate, estimate, to_cent
from app.billing.settlement import settle
from app.config import Channel
from app.gateway import Gateway
from app.journal import Entry
from app.observability import metrics
from app.store import claim_refresh
from app.store.leases import acquire_lease, release_lease, renew_lease
from app.store.rates import forget_call_counts
from app.store.submissions import (
    AcceptedTask,
    Owner,
    Submission,
    ambiguous_between,
    hash_prompt,
    in_flight,
    known_task_ids,
    mark_ambiguous,
    mark_not_created,
    record_accepted,
    record_orphan,
)
from app.store.tables import FINAL_STATUSES
from app.store.tasks import archive_tasks, due_for_refresh
from app.store.uploads import forget_expired_uploads
from app.upstream import TASK_ID_PATTERN, TASK_STATUS_PATTERN, UpstreamAnswer, UpstreamError

log = logging.getLogger(__name__)

LEASE = "reconciler"
# DashScope's listing takes and gives times in Beijing time.
LISTING_TIMEZONE_OFFSET = timedelta(hours=8)
LISTING_PAGE_SIZE = 100
# DashScope lists at most a day at a time; a margin below it costs a call a day at most.
LISTING_MAX_SPAN = timedelta(hours=23)
# Pages of one listing a pass reads (100,000 tasks): past them, the listing proves nothing.
LISTING_MAX_PAGES = 1000
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


# What a submission's window tells of its task (Reconciler._task_of).
_ADOPT, _WAIT, _UNDECIDED, _NOTHING = "adopt", "wait", "undecided", "nothing"
# How long DashScope keeps a task: one that has not echoed its prompt by then never will (one
# it answers UNKNOWN for may yet be found before that).
TASK_KEPT = timedelta(hours=24)


@dataclass(frozen=True)
class _Seen:
    """What a task query said of a task a listing showed (None: it could not be asked)."""

    answer: UpstreamAnswer | None
    # The hash of the prompt it echoes (`orig_prompt`, once SUCCEEDED), as submissions keep it.
    prompt_sha256: str | None

    @property
    def final(self) -> bool:
        """Return whether the task has finished: what it has not echoed, it never will."""
        return self.answer is not None and self.answer.task_status in FINAL_STATUSES


class LeaseLost(Exception):
    """Another reconciler holds the lease now: this pass must stop."""


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
        clock: Callable[[], datetime] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        # The gateway's own clock unless a test gives one: a pass sees the time its submits do.
        self.clock = clock if clock is not None else gateway.clock
        self.sleep = sleep
        self.monotonic = monotonic
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When each channel may next be asked, to keep to its query budget.
        self._next_call: dict[str, float] = {}
        # When this pass last took or renewed the lease, and until when it holds; None: it
        # holds none.
        self._lease_renewed: datetime | None = None
        self._lease_expires: datetime | None = None

    # ------------------------------------------------------------------ one pass

    def run_pass(self) -> PassReport:
        """Run one pass: replay the journal, then, holding the lease, the upstream work."""
        report = PassReport()
        self._step(report, "journal", self.replay_journal)
        if not self._step(report, "lease", self._acquire):
            report.skipped = True
            metrics.reconciler_passes.labels("skipped").inc()
            return report
        steps = (
            ("adoption", self.resolve_in_flight),
            ("refresh", self.refresh_running),
            ("settlement", self.settle_finished),
            ("retention", self.archive_expired),
        )
        try:
            for name, step in steps:
                self._step(report, "lease", lambda _r: self._keep_lease())
                self._step(report, name, step)
        except LeaseLost:
            # Another reconciler runs now: what is left of this pass is the next one's.
            metrics.reconciler_errors.labels("lease").inc()
            log.error("reconciler lease lost, pass stopped", extra={"step": name})
            if "lease" not in report.errors:
                report.errors.append("lease")
        finally:
            self._step(report, "lease", lambda _r: self._release())
        metrics.reconciler_passes.labels("error" if report.errors else "ok").inc()
        return report

    def _step(self, report: PassReport, name: str, step: Callable[[PassReport], Any]) -> Any:
        """Run one step (or one part of one); a failure is counted and the pass goes on."""
        try:
            return step(report)
        except LeaseLost:
            raise
        except Exception as exc:  # one step's failure, whatever it is, never stops the others
            expected = isinstance(exc, SQLAlchemyError | UpstreamError | OSError)
            metrics.reconciler_errors.labels(name).inc()
            # Its kind only: an exception's text may carry an upstream body or SQL parameters.
            log.log(
                logging.WARNING if expected else logging.ERROR,
                "reconciler step failed: %s",
                type(exc).__name__,
                extra={"step": name},
            )
            if name not in report.errors:
                report.errors.append(name)
            return None

    def _lease_seconds(self) -> float:
        # Long enough for the slowest pass the budget allows; renewed while a pass runs longer
        # (with several channels, or listings of many pages), released as soon as it ends.
        return 2 * self._pass_seconds() + 60

    def _acquire(self, _report: PassReport) -> bool:
        now = self.clock()
        if not acquire_lease(self.gateway.engine, LEASE, self.holder, now, self._lease_seconds()):
            return False
        self._held(now)
        return True

    def _held(self, now: datetime) -> None:
        self._lease_renewed = now
        self._lease_expires = now + timedelta(seconds=self._lease_seconds())

    def _keep_lease(self) -> None:
        """Renew the lease once a third of it has gone by; raise LeaseLost if another has it."""
        if self._lease_renewed is None or self._lease_expires is None:
            return  # not in a pass: nothing to keep
        now = self.clock()
        if now - self._lease_renewed < timedelta(seconds=self._lease_seconds() / 3):
            return
        try:
            kept = renew_lease(self.gateway.engine, LEASE, self.holder, now, self._lease_seconds())
        except SQLAlchemyError as exc:
            # Held still until it expires: the next call tries again.
            log.warning("reconciler lease not renewed: %s", type(exc).__name__)
            if now < self._lease_expires:
                return
            raise LeaseLost() from None
        if not kept:
            raise LeaseLost()
        self._held(now)

    def _release(self) -> None:
        self._lease_renewed = self._lease_expires = None
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
            line = _journal_line(entry)
            if isinstance(line, str):
                # Not a line the gateway wrote: kept aside for an operator, never retried.
                self._reject(report, entry, line)
                return
            accepted, owner = line
            try:
                try:
                    record_accepted(self.gateway.engine, accepted, by="journal", owner=owner)
                except LookupError:
                    cost = self._estimate_of(entry)
                    record_orphan(self.gateway.engine, accepted, owner, cost)
            except (IntegrityError, DataError) as exc:
                # The database will never take it (a key or account a restore from a backup
                # lost, say): the lines behind it are replayed all the same.
                self._reject(report, entry, type(exc).__name__)
                return
            metrics.journal_lines.labels("replayed").inc()
            report.replayed += 1
            self._event(
                report,
                "journal replayed",
                logging.INFO,
                task_id=accepted.task_id,
                channel=owner.channel,
            )

        self.gateway.journal.replay(apply)

    def _reject(self, report: PassReport, entry: Entry, reason: str) -> None:
        """Set a journal line aside for an operator, counted and logged without its content."""
        self.gateway.journal.reject(entry)
        metrics.reconciler_errors.labels("journal").inc()
        if "journal" not in report.errors:
            report.errors.append("journal")
        self._event(report, "journal line rejected", logging.ERROR, reason=reason)

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
        stuck = {s.id for s in everything if s.sent_at <= now - grace}
        groups: dict[tuple[str, str], list[Submission]] = defaultdict(list)
        for submission in everything:
            groups[(submission.channel, submission.model)].append(submission)
        for (channel_name, model), group in groups.items():
            mine = [s for s in group if s.id in stuck]
            if not mine:
                continue
            channel = self.gateway.pool.get(channel_name)
            if channel is None:
                continue  # the channel was removed: an operator must look at its tasks
            # A group's failure (its listing refused, say) is counted; the others go on.
            resolve = partial(
                self._resolve_group, channel=channel, model=model, stuck=mine, group=group, now=now
            )
            self._step(report, "adoption", resolve)
        metrics.submissions_unresolved.set(len(in_flight(self.gateway.engine, sent_before=now)))

    def _resolve_group(
        self,
        report: PassReport,
        *,
        channel: Channel,
        model: str,
        stuck: list[Submission],
        group: list[Submission],
        now: datetime,
    ) -> None:
        window = timedelta(seconds=self.settings.adoption_window_seconds)
        spans = [(s.sent_at - CLOCK_SKEW, min(s.sent_at + window, now)) for s in stuck]
        listed, gaps = self._listing(channel, model, spans)
        if gaps:
            self._event(
                report,
                "task listing incomplete, submissions left in flight",
                logging.WARNING,
                channel=channel.name,
                model=model,
            )
        known = known_task_ids(self.gateway.engine, list(listed))
        unowned = sorted(
            (created, task_id) for task_id, created in listed.items() if task_id not in known
        )
        # Whoever else could have created a task of these windows: the group's submissions in
        # flight, and those left to an operator (no less likely to be a task's owner for that).
        operators = ambiguous_between(
            self.gateway.engine,
            channel.name,
            model,
            min(s.sent_at for s in stuck) - window - CLOCK_SKEW,
            max(s.sent_at for s in stuck) + window + CLOCK_SKEW,
        )
        contenders = [*group, *operators]
        seen: dict[str, _Seen] = {}
        taken: set[str] = set()
        # Resolved in this pass: each created one task at most, and no other is theirs.
        resolved: set[int] = set()
        for submission in stuck:
            others = [o for o in contenders if o.id != submission.id and o.id not in resolved]
            verdict, task_id = self._task_of(channel, submission, unowned, taken, others, seen, now)
            window_closed = now >= submission.sent_at + window + CLOCK_SKEW
            if verdict == _ADOPT and task_id is not None:
                taken.add(task_id)
                resolved.add(submission.id)
                self._adopt(report, channel, submission, task_id, seen[task_id], now)
            elif verdict == _WAIT or not window_closed:
                continue
            elif verdict == _UNDECIDED:
                mark_ambiguous(self.gateway.engine, submission.id, now)
                self._event(
                    report,
                    "adoption ambiguous, left to an operator",
                    logging.ERROR,
                    submission=submission.id,
                    channel=channel.name,
                )
            elif not any(
                low < submission.sent_at + window and submission.sent_at - CLOCK_SKEW < high
                for low, high in gaps
            ):
                # Past its window, and the listing provably covered it: nothing was created.
                resolved.add(submission.id)
                self._created_nothing(report, channel, submission, now)

    def _task_of(
        self,
        channel: Channel,
        submission: Submission,
        unowned: list[tuple[datetime, str]],
        taken: set[str],
        others: list[Submission],
        seen: dict[str, _Seen],
        now: datetime,
    ) -> tuple[str, str | None]:
        """Return the task a submission created (_ADOPT), or why none is told (_WAIT, ...).

        A task is the submission's when no other account's submission could as well have
        created it: none was sent within the adoption window before it, or none of those has
        the prompt DashScope echoes of it. _WAIT: a task that may be another account's has not
        finished (it echoes its prompt once SUCCEEDED; waited for while DashScope keeps it);
        _UNDECIDED: nothing DashScope says tells; _NOTHING: no task of its window is its own.
        """
        window = timedelta(seconds=self.settings.adoption_window_seconds)
        mine = submission.prompt_sha256
        # By prompt: a burst of lost answers makes thousands of others, each task asks of few.
        by_prompt: dict[str | None, list[Submission]] = defaultdict(list)
        for other in others:
            by_prompt[other.prompt_sha256].append(other)
        verdict = _NOTHING
        for created, task_id in unowned:
            if task_id in taken or not (
                submission.sent_at - CLOCK_SKEW <= created <= submission.sent_at + window
            ):
                continue
            theirs = self._seen(channel, task_id, seen).prompt_sha256

            def could_have(other: Submission, created: datetime = created) -> bool:
                return other.sent_at - CLOCK_SKEW <= created <= other.sent_at + window

            if (
                theirs is not None
                and mine is not None
                and theirs != mine
                and any(could_have(o) for o in by_prompt[theirs])
            ):
                continue  # another submission's prompt, not this one's
            # Any other account's submission that may as well have created it.
            alike = others if theirs is None else [*by_prompt[theirs], *by_prompt[None]]
            rivals = (o for o in alike if o.account_id != submission.account_id and could_have(o))
            rival = next(rivals, None)
            if rival is None:
                return _ADOPT, task_id
            # Its prompt, once echoed, tells only if this submission's or a rival's is known.
            telling = mine is not None or any(
                o.prompt_sha256 is not None for o in itertools.chain([rival], rivals)
            )
            if telling and not seen[task_id].final and now - created < TASK_KEPT:
                verdict = _WAIT
            elif verdict != _WAIT:
                verdict = _UNDECIDED
        return verdict, None

    def _seen(self, channel: Channel, task_id: str, seen: dict[str, _Seen]) -> _Seen:
        """Return what DashScope says of a task, asked once a pass."""
        if task_id in seen:
            return seen[task_id]
        query = partial(self.gateway.client.query_task, channel, task_id)
        answer: UpstreamAnswer | None
        try:
            answer = self._throttled(channel, query)
        except UpstreamError as exc:
            # Not known yet: nothing is guessed from it, and a later pass asks again.
            log.warning(
                "task query failed: %s", type(exc).__name__, extra={"channel": channel.name}
            )
            answer = None
        if answer is not None and (answer.status != 200 or answer.task_status is None):
            answer = None
        seen[task_id] = _Seen(
            answer, hash_prompt(answer.output.get("orig_prompt") if answer else None)
        )
        return seen[task_id]

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

    def _adopt(
        self,
        report: PassReport,
        channel: Channel,
        submission: Submission,
        task_id: str,
        seen: _Seen,
        now: datetime,
    ) -> None:
        answer = seen.answer
        if answer is not None and answer.task_status is not None:
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
        self, channel: Channel, model: str, spans: list[tuple[datetime, datetime]]
    ) -> tuple[dict[str, datetime], list[tuple[datetime, datetime]]]:
        """Return the channel's tasks of a model created in some spans of time, by task id.

        And the parts of those spans the listing did not provably cover (empty: all of it).
        Listed a part at a time, each at most a day long, as DashScope's listing takes them.
        """
        found: dict[str, datetime] = {}
        gaps: list[tuple[datetime, datetime]] = []
        for start, end in _merged(spans):
            while start < end:
                part_end = min(start + LISTING_MAX_SPAN, end)
                if not self._list_part(channel, model, start, part_end, found):
                    gaps.append((start, part_end))
                start = part_end
        return found, gaps

    def _list_part(
        self,
        channel: Channel,
        model: str,
        start: datetime,
        end: datetime,
        found: dict[str, datetime],
    ) -> bool:
        """Add the tasks of one span of at most a day to `found`; return whether that was all."""
        ids: set[str] = set()
        totals: set[int | None] = set()
        not_understood = unusable = 0
        for page_no in range(1, LISTING_MAX_PAGES + 1):
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
            total = answer.data.get("total")
            totals.add(total if isinstance(total, int) and not isinstance(total, bool) else None)
            items = answer.data.get("data")
            items = items if isinstance(items, list) else []
            for item in items:
                if not isinstance(item, dict):
                    not_understood += 1
                    continue
                task_id, created = item.get("task_id"), item.get("gmt_create")
                if not isinstance(task_id, str) or not isinstance(created, int | float):
                    not_understood += 1
                    continue
                # Adopted, it could never be asked about; left out, its submission resolves
                # as one that created nothing once its window closes.
                if not TASK_ID_PATTERN.fullmatch(task_id):
                    unusable += 1
                    continue
                try:
                    found[task_id] = _from_epoch_ms(created)
                except (OverflowError, OSError, ValueError):
                    not_understood += 1  # a time no calendar holds: the task cannot be placed
                    continue
                ids.add(task_id)
            if len(items) < LISTING_PAGE_SIZE:
                break
        else:
            return False  # more pages than a pass reads
        if unusable:
            log.error(
                "task listing names task ids DashScope does not make, left out",
                extra={"channel": channel.name, "count": unusable},
            )
        # All of it when every page counted the same total (none created or expired while
        # paging) and that many tasks were read.
        total = next(iter(totals)) if len(totals) == 1 else None
        return not not_understood and total is not None and len(ids) + unusable >= total

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
            self._keep_lease()
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
        wait = self._next_call.get(channel.name, 0.0) - self.monotonic()
        if wait > 0:
            self.sleep(wait)
        # Every upstream call may have taken long: a pass never works on with a lost lease.
        self._keep_lease()
        self._next_call[channel.name] = self.monotonic() + spacing
        return call()

    # ------------------------------------------------------------------ retention

    def archive_expired(self, report: PassReport) -> None:
        """Move tasks past the retention window out of the hot table, in short transactions."""
        now = self.clock()
        cutoff = now - timedelta(hours=self.settings.retention_hours)
        while report.archived < ARCHIVE_PER_PASS:
            self._keep_lease()
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
            except Exception as exc:  # the loop must outlive any one pass
                metrics.reconciler_passes.labels("error").inc()
                # Its kind only, as a failed step's: the text may carry what no log may.
                log.error("reconciler pass failed: %s", type(exc).__name__)
            delay = self.settings.reconcile_interval


def _journal_line(entry: Entry) -> tuple[AcceptedTask, Owner] | str:
    """Return what a journal line records, or which of its fields is not as a submit writes it."""
    number: dict[str, int] = {}
    for name in ("submission_id", "account_id", "key_id"):
        value = entry.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            return name
        number[name] = value
    text: dict[str, str] = {}
    for name in ("task_id", "status", "upstream_body", "accepted_at", "channel", "model"):
        value = entry.get(name)
        if not isinstance(value, str) or not value:
            return name
        text[name] = value
    optional: dict[str, str] = {}
    for name in ("service_path", "body_sha256"):  # older lines have neither
        value = entry.get(name, "")
        if not isinstance(value, str):
            return name
        optional[name] = value
    # A task id or status DashScope does not make could never be asked about (nor fit its
    # column): the submission stays in flight, for the channel's listing.
    if not TASK_ID_PATTERN.fullmatch(text["task_id"]):
        return "task_id"
    if not TASK_STATUS_PATTERN.fullmatch(text["status"]):
        return "status"
    try:
        accepted_at = datetime.fromisoformat(text["accepted_at"])
    except ValueError:
        return "accepted_at"
    if accepted_at.tzinfo is not None:  # the store keeps naive UTC
        accepted_at = accepted_at.astimezone(UTC).replace(tzinfo=None)
    accepted = AcceptedTask(
        submission_id=number["submission_id"],
        task_id=text["task_id"],
        status=text["status"],
        upstream_body=text["upstream_body"],
        accepted_at=accepted_at,
    )
    owner = Owner(
        number["account_id"],
        number["key_id"],
        text["channel"],
        text["model"],
        accepted_at,
        optional["service_path"],
        optional["body_sha256"],
    )
    return accepted, owner


def _merged(spans: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Return spans of time with those that overlap joined, in order."""
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _listing_time(moment: datetime) -> str:
    return (moment + LISTING_TIMEZONE_OFFSET).strftime("%Y%m%d%H%M%S")


def _from_epoch_ms(value: float) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC).replace(tzinfo=None)


def iter_lines(report: PassReport) -> Iterator[str]:
    """Return what `bailian-gateway reconcile` prints for a pass."""
    yield from report.lines
    yield report.summary()
