"""A durable buffer for usage records: append-only journal files on local disk.

Every finished request appends one JSON line here before anything else happens
to it, so a record survives a database outage and a crash of the process that
made it. A flusher (usage/flusher.py) later moves the records into Postgres and
deletes a file only once all of its records are written.

Why files and not Redis: the buffer must hold while a networked dependency is
down, and Redis can be down too; a local append is one write() of ~200 bytes and
cannot block on a network. (No fsync: the records survive a process crash, not a
power cut of the machine.)

Files and locks, so that several server processes can share one directory:

- each process appends to its own *active* file, which it holds an exclusive
  flock on; a new active file is created under a hidden name, locked, and only
  then renamed into view, so no drainer ever sees it unlocked;
- sealing closes the active file (releasing the lock), making it drainable;
- a drainer takes any *.jsonl file it can lock without blocking: a sealed file,
  or the active file of a process that died (the kernel dropped its lock).
  A file being written or drained by a live process is skipped.

A record may reach the database twice (a drainer that dies after writing but
before deleting the file); the writer skips ids already stored.

Requests still running are not in the journal yet: each process keeps a snapshot of
them, with what each has sent so far, in its *in-flight* file (`inflight-<owner>.json`,
replaced whole a few times a second while it changes), beside a lock file it holds for
its whole life. A process killed with `kill -9` leaves both behind, unlocked; the next
drainer turns that snapshot into `interrupted` records (`orphaned_in_flight`), after the
dead process's journal files are drained, so that a request that did finish keeps its
real record (the writer keeps the first record of an id).

A record the database refuses (not an outage: a value it cannot store) is moved to the
dead-letter file `dead/letters.jsonl` by the writer, so it never blocks the records
behind it, in this process or the next.

When the journal itself cannot be written (disk full, read-only, permission: any OSError),
a record is *held* in memory instead, at most `held_limit` of them (one past that is
dropped, and the caller told so, to count and log it), and `failure` says why. While it is
set, admission refuses new synthesis (usage_unavailable) and appends go straight to the
held store without touching the disk. `probe` (the flusher thread: never the event loop)
retries: the held records, or a blank line when none is held (readers skip blank lines);
the first write that succeeds clears `failure`. `check` looks between writes (a statvfs)
for a journal that has become read-only or full, so that readiness says so before a
record needs it. The writer can also take held records (`held_take`) straight to the
database while the disk stays broken.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

UsageRecord = dict[str, Any]

# A full disk leaves the active file as it was (a short write is cut back): keep it open,
# it takes records again when space returns. Any other error closes it, and the next write
# opens a new file.
_KEEP_OPEN_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Held records go back into the journal this many to a write().
_PROBE_BATCH = 500


class Appended(enum.Enum):
    """What became of a record given to `UsageSpool.append`."""

    JOURNALED = "journaled"
    HELD = "held"  # the journal failed: kept in memory until it (or the database) takes it
    LOST = "lost"  # the journal failed and the held store was full


class UsageSpool:
    def __init__(self, directory: Path, *, held_limit: int = 10_000) -> None:
        self.directory = directory
        self.held_limit = held_limit
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._sequence = 0
        self._lock = threading.Lock()
        self._active_fd: int | None = None
        self._active_bytes = 0
        self._in_flight_lock_fd: int | None = None
        self._in_flight_written = b""
        self._held: deque[UsageRecord] = deque()
        # Why the last write attempt failed ("OSError: [Errno 28] ..."); None once one succeeds.
        self.failure: str | None = None
        self.failing_since: float | None = None  # time.monotonic()
        self.lost = 0  # records dropped since start: the journal failed and the held store was full

    # --- writing (any thread, usually the event loop) ---

    @property
    def writable(self) -> bool:
        """Whether the last write attempt succeeded (or none failed yet)."""
        return self.failure is None

    def held(self) -> int:
        """Records waiting in memory for the journal (or the database) to take them."""
        return len(self._held)

    def append(self, record: UsageRecord) -> Appended:
        line = _line(record)
        with self._lock:
            if self.failure is None:
                try:
                    self._write(line)
                    return Appended.JOURNALED
                except OSError as exc:
                    self._failed(exc)
            # While the journal fails no write is tried here: the probe finds when it works.
            # The last tenth is kept for records that bill audio: refusals made while the
            # journal fails (each one a record of nothing) must not crowd out a stream's row.
            limit = self.held_limit
            if not record.get("audio_seconds"):
                limit -= self.held_limit // 10
            if len(self._held) >= limit:
                self.lost += 1
                return Appended.LOST
            self._held.append(record)
            return Appended.HELD

    def _write(self, data: bytes) -> None:
        """One write() to the active file (O_APPEND: lines never interleave), or OSError;
        a write cut short by a full disk is cut back, so the next line starts clean."""
        if self._active_fd is None:
            self._active_fd = self._open_active()
        fd = self._active_fd
        try:
            written = os.write(fd, data)
            if written != len(data):
                os.ftruncate(fd, self._active_bytes)
                raise OSError(errno.ENOSPC, f"No space left on device (wrote {written} of {len(data)} bytes)")
        except OSError as exc:
            if exc.errno not in _KEEP_OPEN_ERRORS:
                self._active_fd = None
                self._active_bytes = 0
                os.close(fd)
            raise
        self._active_bytes += written

    def _open_active(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        name = f"{self._owner}-{self._sequence:06d}"
        hidden = self.directory / f".{name}.new"
        fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(hidden, self.directory / f"{name}.jsonl")
        except OSError:
            os.close(fd)
            hidden.unlink(missing_ok=True)
            raise
        return fd

    def _failed(self, exc: OSError) -> None:
        if self.failure is None:
            self.failing_since = time.monotonic()
            logger.error(
                "The usage journal in %s cannot be written (%s): usage records are held in memory "
                "(at most %d) and synthesis is refused (usage_unavailable) until it can.",
                self.directory,
                exc,
                self.held_limit,
            )
        self.failure = f"{type(exc).__name__}: {exc}"[:300]

    def probe(self) -> bool:
        """Try the journal again (the flusher thread): the held records, in order, or a
        blank line when none is held. Returns whether it took them all.

        One batch per hold of the lock: the event loop's appends (which take it) wait for
        one batch's write at most, never for the whole held store. Appends made meanwhile
        are held behind the rest (the journal still counts as failing), so order is kept."""
        wrote_held = False
        while True:
            with self._lock:
                try:
                    if self._held:
                        batch = list(islice(self._held, _PROBE_BATCH))
                        self._write(b"".join(_line(record) for record in batch))
                        for _ in batch:
                            self._held.popleft()
                        wrote_held = True
                    elif not wrote_held:
                        self._write(b"\n")
                except OSError as exc:
                    self._failed(exc)
                    return False
                if self._held:
                    continue  # the lock is let go between batches
                if self.failure is not None:
                    logger.warning(
                        "The usage journal can be written again after %.1f s: synthesis is admitted again.",
                        time.monotonic() - (self.failing_since or time.monotonic()),
                    )
                self.failure = None
                self.failing_since = None
                return True

    def check(self) -> bool:
        """Between writes: a journal that became read-only or full is found now (by a real
        write, the probe), not by the next request's record. Returns `writable`."""
        try:
            stats = os.statvfs(self.directory)
        except OSError:
            return self.probe()  # missing (it is made on the first write) or unreadable
        free_blocks = stats.f_bfree if os.geteuid() == 0 else stats.f_bavail
        if stats.f_flag & os.ST_RDONLY or free_blocks == 0:
            return self.probe()
        return self.writable

    def held_take(self, count: int) -> list[UsageRecord]:
        """Up to `count` held records, out of the store (the writer stores them in the
        database; `held_return` puts them back if it cannot)."""
        with self._lock:
            return [self._held.popleft() for _ in range(min(count, len(self._held)))]

    def held_return(self, records: list[UsageRecord]) -> None:
        with self._lock:
            self._held.extendleft(reversed(records))

    def seal(self) -> None:
        """Close the active file (if it holds anything) so that it can be drained."""
        with self._lock:
            if self._active_fd is not None and self._active_bytes:
                os.close(self._active_fd)
                self._active_fd = None
                self._active_bytes = 0

    # --- requests in flight (the flusher thread) ---

    def in_flight_write(self, records: list[UsageRecord]) -> None:
        """Replace this process's snapshot of its running requests (atomically: a reader
        sees the old snapshot or the new one, never half of one)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._in_flight_lock_fd is None:
            # Locked under a hidden name, then renamed into view: no drainer ever sees it
            # unlocked (and takes this live process for a dead one).
            lock_path = self._in_flight_path(self._owner, ".lock")
            hidden = lock_path.with_name(f".{lock_path.name}.new")
            lock_fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            os.rename(hidden, lock_path)
            self._in_flight_lock_fd = lock_fd
        data = json.dumps(records, separators=(",", ":")).encode()
        if data == self._in_flight_written:
            return  # unchanged (nothing running, typically): no write at all
        path = self._in_flight_path(self._owner, ".json")
        temporary = path.with_name(f".{path.name}.new")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        self._in_flight_written = data

    def in_flight_clear(self) -> None:
        """This process has no requests in flight any more (a clean exit)."""
        self._in_flight_path(self._owner, ".json").unlink(missing_ok=True)
        self._in_flight_written = b""
        if self._in_flight_lock_fd is not None:
            self._in_flight_path(self._owner, ".lock").unlink(missing_ok=True)
            os.close(self._in_flight_lock_fd)
            self._in_flight_lock_fd = None

    def orphaned_in_flight(self, recover: Callable[[list[UsageRecord]], object]) -> int:
        """Give `recover` the snapshot of each dead process whose journal files are all
        drained, then delete it. Returns how many records were recovered."""
        recovered = 0
        for lock_path in sorted(self.directory.glob("inflight-*.lock")):
            owner = lock_path.name.removeprefix("inflight-").removesuffix(".lock")
            if owner == self._owner or any(path.name.startswith(f"{owner}-") for path in self._files()):
                continue  # ours, or its journal still waits: its finished records come first
            with self._locked(lock_path) as fd:
                if fd is None:
                    continue  # alive (or being recovered by another process)
                snapshot = self._in_flight_path(owner, ".json")
                try:
                    records = json.loads(snapshot.read_bytes())
                except FileNotFoundError:
                    records = []
                except ValueError:
                    logger.warning("Skipping an unreadable in-flight snapshot: %s", snapshot.name)
                    records = []
                records = [record for record in records if isinstance(record, dict)]
                if records:
                    recover(records)
                snapshot.unlink(missing_ok=True)
                lock_path.unlink(missing_ok=True)
                recovered += len(records)
        return recovered

    def _in_flight_path(self, owner: str, suffix: str) -> Path:
        return self.directory / f"inflight-{owner}{suffix}"

    # --- records the database refuses ---

    @property
    def dead_letter_path(self) -> Path:
        return self.directory / "dead" / "letters.jsonl"

    def dead_letter(self, record: UsageRecord, reason: str) -> None:
        self.dead_letter_path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"reason": reason, "record": record}, separators=(",", ":"), default=str) + "\n"
        fd = os.open(self.dead_letter_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def dead_letters(self) -> int:
        """How many records the database refused, kept for someone to look at."""
        try:
            with self.dead_letter_path.open("rb") as handle:
                return sum(1 for line in handle if line.strip())
        except FileNotFoundError:
            return 0

    # --- draining (the flusher thread, or a test) ---

    def drain(self, write: Callable[[list[UsageRecord]], object], *, batch_size: int = 500) -> int:
        """Give every drainable file's records to `write`, batch by batch, and
        delete each file once all its batches are written. Stops at the first
        failure (the file stays for the next attempt) by letting it propagate.
        Returns how many records were written."""
        written = 0
        for path in self._files():
            with self._locked(path) as fd:
                if fd is None:
                    continue
                records = self._read(fd, path)
                for start in range(0, len(records), batch_size):
                    write(records[start : start + batch_size])
                path.unlink(missing_ok=True)
                written += len(records)
        return written

    def pending(self) -> tuple[int, int]:
        """(files, bytes) waiting in the buffer, the active file included."""
        files = 0
        size = 0
        for path in self._files():
            try:
                size += path.stat().st_size
                files += 1
            except FileNotFoundError:
                continue
        return files, size

    def _files(self) -> list[Path]:
        try:
            return sorted(self.directory.glob("*.jsonl"))
        except FileNotFoundError:
            return []

    @staticmethod
    @contextmanager
    def _locked(path: Path) -> Iterator[int | None]:
        """The file's descriptor, exclusively locked; None if someone else holds it or it is gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Drained and deleted by someone else between our open and our lock?
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except (BlockingIOError, FileNotFoundError):
                same_file = False
            yield fd if same_file else None
        finally:
            os.close(fd)

    @staticmethod
    def _read(fd: int, path: Path) -> list[UsageRecord]:
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read()
        records: list[UsageRecord] = []
        for number, line in enumerate(_lines(data), start=1):
            try:
                record = json.loads(line)
            except ValueError:
                # Only a process killed in the middle of its write leaves this.
                logger.warning("Skipping a torn usage record: %s line %d", path.name, number)
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def _line(record: UsageRecord) -> bytes:
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


def _lines(data: bytes) -> Iterator[bytes]:
    for line in data.split(b"\n"):
        if line.strip():
            yield line
