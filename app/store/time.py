"""The clock the store uses: naive UTC, the same on SQLite and PostgreSQL.

A gateway reads the time from its own clock (`Gateway.clock`): `utcnow`, unless a test sets
GATEWAY_CLOCK_START, which starts a `RunningClock` at that instant (a month's end, say).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta

# Tests only: the instant (ISO 8601) the clock of a gateway process reads when it starts.
CLOCK_START_ENV = "GATEWAY_CLOCK_START"


def utcnow() -> datetime:
    """Return the current time as naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


class RunningClock:
    """A clock set to an instant, running on at the real rate from there (tests only)."""

    def __init__(self, start: datetime) -> None:
        self._offset = timedelta(0)
        self.set(start)

    def __call__(self) -> datetime:
        """Return the clock's time, as naive UTC."""
        return utcnow() + self._offset

    def set(self, moment: datetime) -> None:
        """Set the clock to a moment (naive UTC), from which it runs on."""
        self._offset = moment - utcnow()


def parse_instant(text: str) -> datetime:
    """Return an ISO 8601 time as naive UTC (a time without an offset is UTC already)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{CLOCK_START_ENV}: {text!r} is not an ISO 8601 time (2027-01-31T23:50:00Z)"
        ) from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


def clock_from(environ: Mapping[str, str]) -> Callable[[], datetime]:
    """Return the clock an environment asks for: utcnow, or a RunningClock for a test."""
    text = environ.get(CLOCK_START_ENV)
    if not text:
        return utcnow
    return RunningClock(parse_instant(text))
