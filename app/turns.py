"""Turns: each worker works on a few requests at once, and the others wait in arrival order."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class Turns:
    """Let `places` requests work at once; the others wait, and come in first come, first served.

    A worker's threads share one GIL, which hands the CPU round the runnable ones: when a burst
    of requests arrives together, every one of them finishes near the end of the burst. Taking
    turns in arrival order, the first ones finish first, and the burst adds its wait to the
    last ones only. A request gives its place up while it waits on something that needs no CPU
    (DashScope, a client's upload): `set_aside`. With 0 places everyone comes in at once.
    """

    def __init__(self, places: int) -> None:
        if places < 0:
            raise ValueError("places must be 0 (no limit) or more")
        self.places = places
        self._free = places
        self._lock = threading.Lock()
        # A parked lock per waiting thread, oldest first: whoever leaves hands its place to the
        # oldest directly, so a thread arriving meanwhile cannot take it first.
        self._waiting: deque[threading.Lock] = deque()

    @property
    def waiting(self) -> int:
        """Return how many requests wait for a place."""
        return len(self._waiting)

    def take(self) -> None:
        """Wait for a place, behind everyone who asked before."""
        if not self.places:
            return
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                return
            parked = threading.Lock()
            parked.acquire()
            self._waiting.append(parked)
        parked.acquire()  # released by `give_up`, which hands its place over

    def give_up(self) -> None:
        """Leave a place: to the oldest waiter, or free."""
        if not self.places:
            return
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._free += 1

    @contextmanager
    def set_aside(self) -> Iterator[None]:
        """Give the place up for the block (a wait that needs no CPU), then queue for one again."""
        self.give_up()
        try:
            yield
        finally:
            self.take()
