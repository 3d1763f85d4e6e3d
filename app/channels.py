"""Channel selection, failover and cool-downs."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from app.config import Channel
from app.observability import metrics
from app.upstream import DashScopeClient, UpstreamAnswer, UpstreamError, UpstreamThrottled

log = logging.getLogger(__name__)

# A failing channel sits out BASE * 2**(failures-1) seconds, up to MAX; a channel whose own
# key is refused sits out AUTH_COOLDOWN, since only an operator can fix that.
BASE_COOLDOWN = 2.0
MAX_COOLDOWN = 300.0
AUTH_COOLDOWN = 600.0
# /readyz lists a channel as failing when its last FAILING_CALLS calls in this process all
# failed, the latest less than FAILING_WINDOW seconds ago or the channel still sitting out after
# it (a channel that sits out is not called, and is no better for it).
FAILING_CALLS = 3
FAILING_WINDOW = 60.0


class NoUsableChannel(Exception):
    """Every channel that serves the model is cooling down."""


class AllChannelsFailed(Exception):
    """Every channel tried failed in a way that created no task."""


class ChannelPool:
    """The configured channels, with the cool-down state of each in this process."""

    def __init__(
        self,
        channels: Iterable[Channel],
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.channels = tuple(channels)
        self._by_name = {channel.name: channel for channel in self.channels}
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self._lock = threading.Lock()
        # Keyed by (channel, None) for faults of the whole channel, and by (channel, model)
        # for throttling, which DashScope applies per model and account.
        self._failures: dict[tuple[str, str | None], int] = {}
        self._cooling_until: dict[tuple[str, str | None], float] = {}
        # Per channel: calls failed in a row (any operation), and when the last of them did.
        self._failed_in_a_row: dict[str, tuple[int, float]] = {}

    def get(self, name: str) -> Channel | None:
        """Return the channel of that name, if it is still configured."""
        return self._by_name.get(name)

    def is_cooling(self, channel: Channel, model: str | None = None) -> bool:
        """Return whether the channel (or its model) is sitting out after a failure."""
        now = self._clock()
        with self._lock:
            return any(
                self._cooling_until.get((channel.name, scope), 0.0) > now for scope in {None, model}
            )

    def candidates(self, model: str) -> list[Channel]:
        """Return the usable channels for a model in the order to try them."""
        usable = [c for c in self.channels if model in c.models and not self.is_cooling(c, model)]
        # Weighted shuffle within a priority tier (Efraimidis-Spirakis keys), tiers high first,
        # so a lower tier is reached only when every channel above it has failed.
        keyed = [(c.priority, self._rng.random() ** (1.0 / c.weight), c) for c in usable]
        keyed.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [channel for _, _, channel in keyed]

    def report_success(self, channel: Channel, model: str | None = None) -> None:
        """Forget the channel's past failures (and its model's)."""
        with self._lock:
            for scope in {None, model}:
                self._failures.pop((channel.name, scope), None)
                self._cooling_until.pop((channel.name, scope), None)
            self._failed_in_a_row.pop(channel.name, None)

    def record_call(self, channel: Channel, *, failed: bool) -> None:
        """Remember how a call that cools nothing down (a task query) ended, for readiness."""
        with self._lock:
            self._note_call(channel, failed=failed)

    def _note_call(self, channel: Channel, *, failed: bool) -> None:
        if failed:
            count, _ = self._failed_in_a_row.get(channel.name, (0, 0.0))
            self._failed_in_a_row[channel.name] = (count + 1, self._clock())
        else:
            self._failed_in_a_row.pop(channel.name, None)

    def failing(self) -> list[str]:
        """Return the names of the channels whose recent calls all failed, in config order."""
        now = self._clock()
        with self._lock:
            return [
                channel.name
                for channel in self.channels
                if self._failed_in_a_row.get(channel.name, (0, 0.0))[0] >= FAILING_CALLS
                and (
                    now - self._failed_in_a_row[channel.name][1] < FAILING_WINDOW
                    or self._cooling_until.get((channel.name, None), 0.0) > now
                )
            ]

    def report_failure(
        self, channel: Channel, *, auth: bool = False, throttled_model: str | None = None
    ) -> float:
        """Cool the channel (or one model of it) down longer with each failure; return seconds."""
        scope = (channel.name, throttled_model)
        with self._lock:
            failures = self._failures.get(scope, 0) + 1
            self._failures[scope] = failures
            seconds = (
                AUTH_COOLDOWN if auth else min(MAX_COOLDOWN, BASE_COOLDOWN * 2 ** (failures - 1))
            )
            self._cooling_until[scope] = self._clock() + seconds
            # A 429 is the channel answering: it works, for other models at least.
            self._note_call(channel, failed=throttled_model is None)
        reason = "auth" if auth else "throttled" if throttled_model else "failure"
        metrics.channel_cooldowns.labels(channel.name, reason).inc()
        return seconds


def submit_with_failover(
    pool: ChannelPool,
    client: DashScopeClient,
    model: str,
    service_path: str,
    body: bytes,
    client_headers: Mapping[str, str],
    before_send: Callable[[Channel], None] = lambda _channel: None,
    only: str | None = None,
) -> tuple[Channel, UpstreamAnswer]:
    """Submit on the first channel that takes it, failing over only when nothing was created.

    `before_send` runs before each attempt with the channel about to be tried; what it raises
    stops the submit before that channel is called. `only` names the one channel allowed.
    """

    def attempt(channel: Channel) -> UpstreamAnswer:
        before_send(channel)
        return client.submit_task(channel, service_path, body, client_headers)

    candidates = [c for c in pool.candidates(model) if only is None or c.name == only]
    # A resend could bill a second video: only a failure that provably created nothing moves on.
    return call_with_failover(pool, model, candidates, attempt, lambda exc: exc.nothing_created)


def call_with_failover(
    pool: ChannelPool,
    model: str,
    candidates: list[Channel],
    attempt: Callable[[Channel], UpstreamAnswer],
    may_move_on: Callable[[UpstreamError], bool],
) -> tuple[Channel, UpstreamAnswer]:
    """Return the first candidate's answer that is not a failure of the channel itself.

    A channel that cannot be reached, refuses its own key, throttles or answers 5xx cools
    down and the next is tried; an UpstreamError that `may_move_on` refuses is raised at once.
    When every candidate failed and one throttled, its 429 is the answer.
    """
    if not candidates:
        raise NoUsableChannel(model)
    throttled: tuple[Channel, UpstreamAnswer] | None = None
    throttled_unsaid: UpstreamThrottled | None = None  # a 429 without DashScope's JSON
    for channel in candidates:
        try:
            answer = attempt(channel)
        except UpstreamThrottled as exc:
            pool.report_failure(channel, throttled_model=model)
            throttled_unsaid = exc
            continue
        except UpstreamError as exc:
            pool.report_failure(channel)
            if not may_move_on(exc):
                raise
            log.warning("upstream unreachable", extra={"channel": channel.name, "cause": exc.cause})
            continue
        if answer.status in (401, 403):
            seconds = pool.report_failure(channel, auth=True)
            log.error(
                "upstream refused the channel's own key: fix the channel's key",
                extra={
                    "channel": channel.name,
                    "upstream_status": answer.status,
                    "cooldown_seconds": seconds,
                },
            )
            continue
        if answer.status == 429:
            pool.report_failure(channel, throttled_model=model)
            throttled = (channel, answer)
            continue
        if answer.status >= 500:
            pool.report_failure(channel)
            continue
        pool.report_success(channel, model)
        return channel, answer
    if throttled is not None:
        return throttled  # clients should back off, as DashScope asked
    if throttled_unsaid is not None:
        raise throttled_unsaid  # the same, in the gateway's words
    raise AllChannelsFailed(model)
