"""In-process caches that a worker's threads share (cachetools, behind a lock)."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

from cachetools import Cache

K = TypeVar("K")
V = TypeVar("V")


class SharedCache(Generic[K, V]):
    """A cachetools cache made safe for the many threads of a gthread worker."""

    def __init__(self, cache: Cache[K, V]) -> None:
        self._cache = cache
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """Return the cached value, or None."""
        with self._lock:
            return self._cache.get(key)

    def put(self, key: K, value: V) -> None:
        """Cache a value (a cache of size zero keeps nothing)."""
        if self._cache.maxsize <= 0:
            return
        with self._lock:
            self._cache[key] = value

    def discard(self, key: K) -> None:
        """Forget a key, if cached."""
        with self._lock:
            self._cache.pop(key, None)
