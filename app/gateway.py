"""The parts one gateway application is made of, reachable from any request."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from flask import current_app
from sqlalchemy import Engine

from app.caches import SharedCache
from app.channels import ChannelPool
from app.config import Settings
from app.journal import Journal
from app.store import Caller, Task
from app.store.time import utcnow
from app.turns import Turns
from app.upstream import DashScopeClient


@dataclass(frozen=True)
class Gateway:
    """Settings, database, upstream client and channel pool of one application."""

    settings: Settings
    engine: Engine
    client: DashScopeClient
    pool: ChannelPool
    # Who a key hash belongs to, for a few seconds: authentication without a query.
    callers: SharedCache[str, Caller]
    # Final tasks never change again, so they can be served without the database.
    final_tasks: SharedCache[str, Task]
    # Why this worker's last refresh of a task failed, until the next one is due: the polls
    # answered from the store meanwhile say so too (X-Gateway-Stale).
    stale_tasks: SharedCache[str, str]
    # Which of the worker's requests work now: DashScope's routes take turns (app/turns.py).
    turns: Turns
    # Accepted tasks the database refused, until the reconciler replays them.
    journal: Journal
    # The time (naive UTC) a submit's reservation, a settlement and the reconciler read:
    # utcnow, or a test's RunningClock (GATEWAY_CLOCK_START), to roll a month over.
    clock: Callable[[], datetime] = utcnow


def current_gateway() -> Gateway:
    """Return the gateway of the application handling this request."""
    gateway: Gateway = current_app.extensions["gateway"]
    return gateway
