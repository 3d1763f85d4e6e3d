"""The local journal of accepted tasks the database refused: one fsynced JSON line each."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Entry = dict[str, Any]


class Journal:
    """An append-only file of JSON lines that any process may write and one replays at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        # A replay works on a file of its own, so writers never wait on the database.
        self.replaying_path = f"{path}.replaying"
        self._replay_lock_path = f"{path}.lock"
        self.rejected_path = f"{path}.rejected"

    def append(self, entry: Entry) -> None:
        """Write one entry durably: flushed and fsynced before this returns."""
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # A replay may have moved the file away while this waited for the lock: then
                # the line belongs in the new file, not in the one being replayed.
                if _same_file(fd, self.path):
                    os.write(fd, line)
                    os.fsync(fd)
                    return
            finally:
                os.close(fd)

    def reject(self, entry: Entry) -> None:
        """Keep an entry that cannot be replayed in a file of its own, for an operator."""
        # Durable as the journal is: the replay forgets the entry once this returns. Private as
        # the journal is: an entry holds DashScope's answer.
        fd = os.open(self.rejected_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, json.dumps(entry).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def lines(self) -> int:
        """Return how many entries wait to be replayed."""
        return sum(_count_lines(path) for path in (self.replaying_path, self.path))

    def replay(self, apply: Callable[[Entry], None]) -> int | None:
        """Apply every entry, oldest first, and forget them; None if another replay is running.

        An exception from `apply` stops the replay and propagates; the next replay starts at
        the entry that raised. `apply` must still be idempotent: a replay cut short by a crash
        starts again from the start of the same file.
        """
        with self._replay_lock() as locked:
            if not locked:
                return None
            self._move_aside()
            lines = _read_lines(self.replaying_path)
            replayed = 0
            for index, line in enumerate(lines):
                entry = _entry_of(line)
                if entry is None:
                    continue
                try:
                    apply(entry)
                except BaseException:
                    # What was applied (or rejected) is not applied (or rejected) again.
                    self._keep_for_next_replay(lines[index:])
                    raise
                replayed += 1
            if os.path.exists(self.replaying_path):
                os.unlink(self.replaying_path)
            return replayed

    def _keep_for_next_replay(self, lines: list[bytes]) -> None:
        """Leave only these lines in the replay file, replaced at once (never half written)."""
        partial = f"{self.replaying_path}.partial"
        with open(partial, "wb") as handle:
            handle.writelines(lines)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, self.replaying_path)

    @contextmanager
    def _replay_lock(self) -> Iterator[bool]:
        if not os.path.exists(self.path) and not os.path.exists(self.replaying_path):
            yield True  # nothing to replay, nothing to lock
            return
        fd = os.open(self._replay_lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _move_aside(self) -> None:
        """Append the journal's entries to the replay file, under the writers' lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if not os.path.exists(self.replaying_path):
                os.rename(self.path, self.replaying_path)
                return
            # A replay that failed left its file: the new entries go after its own.
            with open(self.path, "rb") as new, open(self.replaying_path, "ab") as aside:
                aside.write(new.read())
                aside.flush()
                os.fsync(aside.fileno())
            os.unlink(self.path)
        finally:
            os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    except FileNotFoundError:
        return 0


def _read_lines(path: str) -> list[bytes]:
    try:
        with open(path, "rb") as handle:
            return handle.readlines()
    except FileNotFoundError:
        return []


def _entry_of(line: bytes) -> Entry | None:
    # A line cut short by a crash mid-write was never acknowledged: its task is found again by
    # the reconciler's listing, as any submission left in flight.
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None
