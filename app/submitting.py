"""A submit as paid work: written ahead, sent, and recorded whatever the database does."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from app.billing.ledger import LimitExceeded, Reservation, Reserved
from app.billing.prices import Estimate, estimate
from app.channels import AllChannelsFailed, submit_with_failover
from app.config import Channel
from app.gateway import Gateway
from app.observability import metrics
from app.store import Caller
from app.store.group_commit import is_transient
from app.store.submissions import (
    AcceptedTask,
    hash_prompt,
    mark_not_created,
    move_to_channel,
    record_accepted,
    write_ahead,
)
from app.upstream import UpstreamAnswer, UpstreamBrokenAnswer, UpstreamError

log = logging.getLogger(__name__)

T = TypeVar("T")


class WriteAheadFailed(Exception):
    """The submission could not be written ahead, so nothing was sent to DashScope."""


@dataclass(frozen=True)
class SubmitRequest:
    """A client's submit: who sends it, for which model, to which service path, what body."""

    caller: Caller
    model: str
    service_path: str
    body: bytes
    headers: Mapping[str, str]
    # The body's `parameters`, when the caller has parsed it already.
    parameters: Mapping[str, Any] | None = None
    # The one channel that may take it (the holder of its uploaded files), or any.
    only_channel: str | None = None
    # The body's `input.prompt`: what tells two accounts' lost submits apart (app/reconcile.py).
    prompt: object = None


@dataclass(frozen=True)
class Submitted:
    """DashScope's answer to a submit, the channel that gave it, and what was reserved."""

    channel: Channel
    answer: UpstreamAnswer
    estimate: Estimate
    # What remains of the account's limit after this submit's reservation; None: no limit.
    remaining: Decimal | None


def submit_paid(gateway: Gateway, request: SubmitRequest) -> Submitted:
    """Reserve a submit's estimate, send it written ahead, record its task, then answer."""
    cost = estimate(gateway.settings.pricing[request.model], _parameters_of(request))
    submission = _Submission(gateway, request, Reservation(cost, gateway.settings.currency))
    metrics.submissions_in_flight.inc()
    try:
        channel, answer = submit_with_failover(
            gateway.pool,
            gateway.client,
            request.model,
            request.service_path,
            request.body,
            request.headers,
            before_send=submission.before_send,
            only=request.only_channel,
        )
    except UpstreamError:
        # The submit may have created a task: the row stays in flight, and the reconciler
        # finds the task in the channel's listing.
        raise
    except (AllChannelsFailed, WriteAheadFailed):
        submission.created_nothing()  # no channel tried created anything
        raise
    except LimitExceeded:
        offered = gateway.settings.offered_models
        metrics.limit_refusals.labels(metrics.label_from(request.model, offered)).inc()
        raise
    finally:
        metrics.submissions_in_flight.dec()
    if answer.status != 200:
        submission.created_nothing()
    elif answer.task_id is None:
        # No id, or none DashScope makes: recorded, it could never be asked about (nor billed
        # as DashScope reports). The row stays in flight, for the reconciler's listing.
        raise UpstreamBrokenAnswer(channel.name, "submit answer carries no usable task id")
    else:
        submission.accepted(channel, answer.task_id, answer)
    remaining = submission.reserved.remaining if submission.reserved else None
    return Submitted(channel, answer, cost, remaining)


def _parameters_of(request: SubmitRequest) -> Mapping[str, Any] | None:
    if request.parameters is not None:
        return request.parameters
    try:
        parameters = json.loads(request.body).get("parameters")
    except (ValueError, AttributeError):
        return None
    return parameters if isinstance(parameters, dict) else None


class _Submission:
    """One submit's row: written before the first attempt, moved on failover, resolved after."""

    def __init__(self, gateway: Gateway, request: SubmitRequest, reservation: Reservation) -> None:
        self.gateway = gateway
        self.request = request
        self.reservation = reservation
        self.id: int | None = None
        self.reserved: Reserved | None = None

    def before_send(self, channel: Channel) -> None:
        """Write the submission and its reservation (or its new channel) before sending."""
        engine, now = self.gateway.engine, self.gateway.clock()
        try:
            if self.id is None:
                self.id, self.reserved = _once_more_if_disconnected(
                    lambda: write_ahead(
                        engine,
                        account_id=self.request.caller.account_id,
                        key_id=self.request.caller.key_id,
                        model=self.request.model,
                        channel=channel.name,
                        service_path=self.request.service_path,
                        body_sha256=hashlib.sha256(self.request.body).hexdigest(),
                        prompt_sha256=hash_prompt(self.request.prompt),
                        now=now,
                        reservation=self.reservation,
                    )
                )
            else:
                move_to_channel(engine, self.id, channel.name, now)
        except SQLAlchemyError as exc:
            log.error(
                "submission not written ahead, nothing sent: %s",
                type(exc).__name__,
                extra={"channel": channel.name},
            )
            raise WriteAheadFailed() from None

    def created_nothing(self) -> None:
        """Resolve the submission as one that created no task, releasing its reservation."""
        if self.id is None:
            return
        try:
            mark_not_created(self.gateway.engine, self.id, self.gateway.clock(), by="answer")
        except SQLAlchemyError as exc:
            # Harmless: the reconciler finds nothing in the channel's listing and says so.
            log.warning("submission outcome not recorded: %s", type(exc).__name__)

    def accepted(self, channel: Channel, task_id: str, answer: UpstreamAnswer) -> None:
        """Record the task on the submission, retrying the database, else journal it."""
        if self.id is None:
            raise RuntimeError("a submit was sent without its submission")
        accepted = AcceptedTask(
            submission_id=self.id,
            task_id=task_id,
            status=answer.task_status or "PENDING",
            upstream_body=answer.body.decode(),
            accepted_at=self.gateway.clock(),
        )
        try:
            self._record(accepted)
        except SQLAlchemyError as exc:
            self._journal(accepted, channel, type(exc).__name__)
            return
        metrics.task_transitions.labels(
            metrics.NEW_TASK, metrics.task_status_label(accepted.status)
        ).inc()

    def _record(self, accepted: AcceptedTask) -> None:
        """Record the task, retrying transient database failures with backoff."""
        started = time.monotonic()
        try:
            record_accepted(self.gateway.engine, accepted, by="answer")
            return
        except SQLAlchemyError as exc:
            # The first try's time (a busy timeout, say) counts against the same budget.
            left = self.gateway.settings.record_retry_seconds - (time.monotonic() - started)
            if not is_transient(exc) or left <= 0:
                raise
        # Built only when the database has refused once: every submit would pay for it.
        for attempt in Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_delay(left),
            wait=wait_exponential_jitter(multiplier=0.05, max=2.0),
            reraise=True,
        ):
            with attempt:
                record_accepted(self.gateway.engine, accepted, by="answer")

    def _journal(self, accepted: AcceptedTask, channel: Channel, cause: str) -> None:
        entry = {
            **asdict(accepted),
            "accepted_at": accepted.accepted_at.isoformat(),
            "account_id": self.request.caller.account_id,
            "key_id": self.request.caller.key_id,
            "channel": channel.name,
            "model": self.request.model,
            # What a replay needs to write the submission anew, were its row ever lost.
            "service_path": self.request.service_path,
            "body_sha256": hashlib.sha256(self.request.body).hexdigest(),
            "estimate": str(self.reservation.estimate.amount),
            "estimate_tier": self.reservation.estimate.tier,
            "estimate_seconds": str(self.reservation.estimate.seconds),
        }
        where = {"task_id": accepted.task_id, "channel": channel.name}
        try:
            self.gateway.journal.append(entry)
        except OSError as exc:
            # The submission row is in flight still: the reconciler adopts the task from the
            # channel's listing. The client keeps its answer either way.
            log.error(
                "task neither recorded nor journaled: %s, %s", cause, exc.strerror, extra=where
            )
            return
        metrics.journal_lines.labels("written").inc()
        log.warning("task journaled", extra={**where, "cause": cause})


def _once_more_if_disconnected(write: Callable[[], T]) -> T:
    """Run a write, and once more if the pool's connection had been lost under it."""
    try:
        return write()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
    return write()
