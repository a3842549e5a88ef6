"""Metering: a UsageMeter per request, its record spooled at the end, a flusher writing rows.

The request path only ever appends a line to the spool (usage/spool.py): never a
database call, so logging cannot delay audio or fail a request. A background
thread per process (UsageFlusher) moves spooled records into UsageLog rows and
the monthly quota counters in one transaction, retrying with backoff while the
database is away.

A journal that cannot be written loses nothing silently: the record is held in memory
(bounded by USAGE_HELD_RECORDS; what overflows is logged whole and counted), new
synthesis is refused at admission (`usage_recordable`, 503 usage_unavailable) before any
audio is made, and the flusher probes the journal until it takes the held records again,
or writes them straight to the database meanwhile.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from django.conf import settings
from django.db import DatabaseError, DataError, IntegrityError, close_old_connections, transaction
from django.http import HttpRequest

from core.metrics import USAGE_DEAD_LETTERS, USAGE_JOURNAL_FAILURES, USAGE_RECORDS_LOST, synthesis_observed
from core.strings import printable
from tenants.models import Tenant
from usage.models import UsageLog
from usage.quota_holds import QuotaReservation
from usage.quotas import current_month, quota_counters_add, quota_rows_written
from usage.spool import Appended, UsageRecord, UsageSpool

logger = logging.getLogger(__name__)
request_log = logging.getLogger("callwaiting.requests")
_LOGGED_FIELDS = (
    "tenant_id",
    "endpoint",
    "status_code",
    "error_code",
    "latency_ms",
    "total_ms",
    "audio_seconds",
    "audio_bytes",
    "input_chars",
    "voice_id",
    "format",
    "cached",
    "streaming",
)

# Endpoint names in usage rows (stable: the dashboard groups by them).
SYNTHESIZE = "synthesize"
SYNTHESIZE_URL = "synthesize-url"
TWIML_PLAY = "twiml-play"
AUDIO_SPEECH = "audio-speech"  # the OpenAI-compatible endpoint
STREAM = "stream"
# The ElevenLabs- and Cartesia-compatible endpoints (synthesis.elevenlabs, synthesis.stream).
ELEVENLABS_TTS = "elevenlabs-tts"
ELEVENLABS_STREAM = "elevenlabs-stream-input"
ELEVENLABS_MULTI_STREAM = "elevenlabs-multi-stream"
CARTESIA_STREAM = "cartesia-websocket"

# error_code of a request the client abandoned (hung up, or cancelled a
# WebSocket utterance): not a failure of ours.
CLIENT_DISCONNECTED = "client_disconnected"
CANCELLED = "cancelled"
# The status recorded when the client left before any response was sent.
STATUS_CLIENT_CLOSED = 499
# error_code of a request cut short by the server process: killed (its row is written by
# the next process from the in-flight snapshot) or stopped past the shutdown grace.
INTERRUPTED = "interrupted"


@dataclass(eq=False)
class UsageMeter:
    """What one request used, filled in as it runs; `finish` records it once."""

    endpoint: str
    request_id: str
    tenant_id: uuid.UUID | None = None
    input_chars: int = 0
    audio_bytes: int = 0
    audio_seconds: float = 0.0
    streaming: bool = False
    voice_id: str = ""
    format: str = ""
    cached: bool = False
    # Seconds of audio in what has been sent so far (the encoder's clock).
    audio_clock: Callable[[], float] | None = None
    # A streamed body that is not the audio itself (SSE events) counts its audio itself.
    counts_own_audio: bool = False
    # The request's claim on its tenant's quota (admission makes it), settled by `finish`.
    quota_reservation: QuotaReservation | None = None
    # The code of a limit that ended a streamed body early but cleanly (audio_too_long),
    # read when the body ends: its row carries it, with status 200 (the status that was sent).
    cut_short: Callable[[], str | None] | None = None
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)
    first_audio_at: float | None = None
    finished: bool = False

    def audio_sent(self, nbytes: int, audio_seconds: float | None = None) -> None:
        if nbytes and self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
        self.audio_bytes += nbytes
        if audio_seconds is not None:
            self.audio_seconds = audio_seconds
        elif self.audio_clock is not None:
            self.audio_seconds = self.audio_clock()

    def open(self) -> None:
        """Count this request as in flight: from now on a process killed under it still
        leaves its row (the in-flight snapshot), until `finish` records how it ended."""
        if self.tenant_id is not None and not self.finished:
            with _in_flight_lock:
                _in_flight[self.id] = self

    def finish(self, status_code: int, error_code: str | None = None) -> None:
        """Spool this request's record. Only the first call counts; a request
        without a tenant (failed authentication) has no one to bill and no row."""
        if self.finished or self.tenant_id is None:
            return
        self.finished = True
        with _in_flight_lock:
            _in_flight.pop(self.id, None)
        record = self.record(status_code, error_code)
        if self.quota_reservation is not None:
            # Before the record is spooled: the writer's mark of its row must come after.
            self.quota_reservation.settle(0.0 if self.cached else self.audio_seconds)
        if settings.USAGE_RECORDS:
            usage_record_spool(record)
        synthesis_observed(
            tenant_id=record["tenant_id"],
            endpoint=self.endpoint,
            audio_format=record["format"],
            status=status_code,
            error_code=error_code,
            cached=self.cached,
            first_audio_s=None if record["latency_ms"] is None else record["latency_ms"] / 1000,
            total_s=record["total_ms"] / 1000,
            audio_seconds=self.audio_seconds,
            audio_bytes=self.audio_bytes,
        )
        # One line per request for the logs: counts and ids, never the text.
        request_log.info(
            "%s %s %s",
            self.endpoint,
            status_code,
            error_code or "ok",
            extra={"request_id": record["request_id"], **{key: record[key] for key in _LOGGED_FIELDS}},
        )
        usage_flusher_start()

    @property
    def interrupted_status(self) -> int:
        """The status of this request if the process ended now: 200 once audio went out."""
        return 200 if self.first_audio_at is not None else 503

    def interrupted_record(self) -> UsageRecord:
        """The record of this request if the process ended now: what was sent so far."""
        return self.record(self.interrupted_status, INTERRUPTED)

    def record(self, status_code: int, error_code: str | None = None) -> UsageRecord:
        """The spooled form of this request's usage, as it stands now."""
        elapsed_ms = (time.perf_counter() - self.started) * 1000
        first_ms = None if self.first_audio_at is None else (self.first_audio_at - self.started) * 1000
        return {
            "id": str(self.id),
            "tenant_id": str(self.tenant_id),  # finish() records only metered tenants
            "request_id": printable(self.request_id, limit=128),
            "endpoint": self.endpoint,
            "input_chars": self.input_chars,
            "audio_bytes": self.audio_bytes,
            "audio_seconds": round(self.audio_seconds, 4),
            "latency_ms": None if first_ms is None else round(first_ms, 2),
            "total_ms": round(elapsed_ms, 2),
            "streaming": self.streaming,
            "voice_id": printable(self.voice_id, limit=64),
            "format": printable(self.format, limit=16),
            "cached": self.cached,
            "status_code": status_code,
            "error_code": None if error_code is None else printable(error_code, limit=64),
            "created_at": self.created_at.isoformat(),
        }


# Requests admitted and not yet finished, by meter id (event loop writes, flusher reads).
_in_flight: dict[uuid.UUID, UsageMeter] = {}
_in_flight_lock = threading.Lock()


def in_flight_meters() -> list[UsageMeter]:
    with _in_flight_lock:
        return list(_in_flight.values())


def usage_meter_of(request: HttpRequest) -> UsageMeter | None:
    meter = getattr(request, "usage_meter", None)
    return meter if isinstance(meter, UsageMeter) else None


async def metered_stream(body: AsyncGenerator[bytes, None], meter: UsageMeter) -> AsyncIterator[bytes]:
    """A streamed response body that counts what passes and records the request
    when the stream ends: completed, failed, or abandoned by the client."""
    error_code: str | None = None
    try:
        async with aclosing(body):  # closing it stops the engine and frees the stream's lease
            async for chunk in body:
                if not meter.counts_own_audio:
                    meter.audio_sent(len(chunk))
                yield chunk
    except BaseException as exc:
        # GeneratorExit or CancelledError: the client went away mid-stream.
        error_code = CLIENT_DISCONNECTED if not isinstance(exc, Exception) else "engine_error"
        if isinstance(exc, Exception):
            # The headers are gone: re-raising makes the server abort the body, so the client
            # sees it cut short. This line is the trace that names the request.
            logger.error("Stream %s failed mid-body", meter.request_id, exc_info=exc)
        raise
    finally:
        if error_code is None and meter.cut_short is not None:
            error_code = meter.cut_short()
        meter.finish(200, error_code)


# --- the spool and the writer --------------------------------------------------

_spools: dict[Path, UsageSpool] = {}
_spools_lock = threading.Lock()


def usage_spool() -> UsageSpool:
    directory = Path(settings.USAGE_SPOOL_DIR)
    with _spools_lock:
        spool = _spools.get(directory)
        if spool is None:
            spool = _spools[directory] = UsageSpool(directory, held_limit=settings.USAGE_HELD_RECORDS)
        return spool


def usage_record_spool(record: UsageRecord) -> Appended:
    """Journal one record; one the journal cannot take is held in memory and counted, and
    one the full held store cannot take either is logged whole (its last trace) and counted."""
    outcome = usage_spool().append(record)
    if outcome is not Appended.JOURNALED:
        USAGE_JOURNAL_FAILURES.inc()
    if outcome is Appended.LOST:
        USAGE_RECORDS_LOST.inc()
        logger.error("Usage record lost: the journal fails and the held store is full: %s", record)
    return outcome


def usage_recordable() -> bool:
    """Whether a request admitted now can have its usage recorded (admission asks)."""
    return not settings.USAGE_RECORDS or usage_spool().writable


def _row(record: UsageRecord) -> UsageLog:
    """A spooled record as a row: its keys are UsageLog's field names (UsageMeter.record)."""
    return UsageLog(
        **{
            **record,
            "id": uuid.UUID(record["id"]),
            "tenant_id": uuid.UUID(record["tenant_id"]),
            "created_at": datetime.fromisoformat(record["created_at"]),
        }
    )


# A record the database refuses however often it is tried: a value it cannot store, a
# reference it rejects, or a record that is not a usage record at all. Outages
# (OperationalError, InterfaceError) are not here: those records wait in the spool.
BAD_RECORD_ERRORS: tuple[type[Exception], ...] = (DataError, IntegrityError, ValueError, KeyError, TypeError)


def usage_records_write(records: list[UsageRecord], *, spool: UsageSpool | None = None) -> int:
    """Store spooled records as rows, once each, and add their new audio to the quota
    counters in the same transaction (so the two never disagree). A batch the database
    refuses is written record by record, and each record it still refuses goes to the
    dead-letter file (of `spool`, or the process's), so one bad record never holds back
    the others. Returns how many rows were new."""
    try:
        return _rows_write(records)
    except BAD_RECORD_ERRORS as exc:
        if len(records) == 1:
            usage_dead_letter(records[0], exc, spool=spool)
            return 0
    written = 0
    for record in records:
        try:
            written += _rows_write([record])
        except BAD_RECORD_ERRORS as exc:
            usage_dead_letter(record, exc, spool=spool)
    return written


def usage_dead_letter(record: UsageRecord, exc: Exception, *, spool: UsageSpool | None = None) -> None:
    reason = f"{type(exc).__name__}: {exc}"[:500]
    logger.error(
        "Usage record %s refused by the database; moved to the dead letters: %s", record.get("id"), reason
    )
    USAGE_DEAD_LETTERS.inc()
    (spool or usage_spool()).dead_letter(record, reason)


def _rows_write(records: list[UsageRecord]) -> int:
    rows = [_row(record) for record in records]
    with transaction.atomic():
        known_tenants = set(
            Tenant.objects.filter(id__in={row.tenant_id for row in rows}).values_list("id", flat=True)
        )
        already_stored = set(
            UsageLog.objects.filter(id__in=[row.id for row in rows]).values_list("id", flat=True)
        )
        new_rows: dict[uuid.UUID, UsageLog] = {}
        for row in rows:
            # The first record of an id wins: a request's real end before its in-flight snapshot.
            if row.tenant_id in known_tenants and row.id not in already_stored and row.id not in new_rows:
                new_rows[row.id] = row
        if orphans := sum(row.tenant_id not in known_tenants for row in rows):
            logger.warning("Dropped %d usage records of deleted tenants.", orphans)
        UsageLog.objects.bulk_create(new_rows.values())
        new_audio: dict[tuple[uuid.UUID, date], float] = defaultdict(float)
        for row in new_rows.values():
            if not row.cached and row.audio_seconds > 0:
                new_audio[(row.tenant_id, current_month(row.created_at))] += row.audio_seconds
        quota_counters_add(new_audio)
    quota_rows_written((row.id, row.tenant_id, current_month(row.created_at)) for row in new_rows.values())
    return len(new_rows)


def usage_flush() -> int:
    """Write everything spooled so far, in this thread, then the requests that dead
    processes left in flight (as `interrupted`); raises DatabaseError if the database is
    away (the records stay spooled)."""
    spool = usage_spool()
    if not spool.writable:
        spool.probe()  # the held records into the journal, if it takes them again
    written = _held_write(spool)
    spool.seal()
    written += spool.drain(usage_records_write, batch_size=settings.USAGE_FLUSH_BATCH)
    if spool.orphaned_in_flight(_interrupted_spool):
        spool.seal()
        written += spool.drain(usage_records_write, batch_size=settings.USAGE_FLUSH_BATCH)
    return written


def _held_write(spool: UsageSpool) -> int:
    """Records the journal could not take, straight to the database (the disk may stay
    broken for long); a batch the database cannot take goes back to the held store."""
    written = 0
    while batch := spool.held_take(settings.USAGE_FLUSH_BATCH):
        try:
            written += usage_records_write(batch, spool=spool)
        except BaseException:
            spool.held_return(batch)
            raise
    return written


def _interrupted_spool(records: list[UsageRecord]) -> None:
    logger.warning(
        "Recording %d request(s) left running by a process that died, as interrupted.", len(records)
    )
    for record in records:
        usage_record_spool(record)


def usage_in_flight_snapshot() -> None:
    """Replace this process's in-flight snapshot (the flusher calls it a few times a second)."""
    usage_spool().in_flight_write([meter.interrupted_record() for meter in in_flight_meters()])


def usage_in_flight_interrupt() -> int:
    """At exit: record every request still running as interrupted (cut by a shutdown past
    its grace period). Returns how many there were."""
    meters = in_flight_meters()
    for meter in meters:
        meter.finish(meter.interrupted_status, INTERRUPTED)
    return len(meters)


# --- the flusher thread -----------------------------------------------------------

MAX_BACKOFF_SECONDS = 10.0


class UsageFlusher(threading.Thread):
    """Writes the spool to the database every `interval` (backing off while it is away),
    starting at once: what a killed process left is written at start-up, not on the first
    request. Between flushes it keeps the in-flight snapshot current."""

    def __init__(self, interval: float, in_flight_interval: float) -> None:
        super().__init__(name="usage-flusher", daemon=True)
        self.interval = interval
        self.in_flight_interval = in_flight_interval
        self._stopping = threading.Event()
        self.outage_since: float | None = None
        self.rows_written = 0
        self._snapshot_failing = False

    def run(self) -> None:
        backoff = self.interval
        next_flush = time.monotonic()
        self._journal_once(probe=True)  # a journal that cannot be written is known at start-up
        while True:
            self._journal_once()
            if time.monotonic() >= next_flush:
                if self._flush_once():
                    backoff = self.interval
                else:
                    backoff = min(max(backoff, 1.0) * 2, MAX_BACKOFF_SECONDS)
                next_flush = time.monotonic() + backoff
            self._snapshot_once()
            pause = min(self.in_flight_interval, max(0.0, next_flush - time.monotonic()))
            if self._stopping.wait(pause):
                break
        self._flush_once()  # the last records of a process shutting down

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self.join(timeout)

    def _journal_once(self, *, probe: bool = False) -> None:
        """Every turn (a few times a second): while the journal fails, try it again, so that
        admission resumes as soon as it works; while it works, look for a full or read-only
        disk (a statvfs), so that readiness says so before a record is held."""
        if not settings.USAGE_RECORDS:
            return
        spool = usage_spool()
        try:
            if probe or not spool.writable:
                spool.probe()
            else:
                spool.check()
        except Exception:
            logger.exception("The usage journal probe failed; it will retry.")

    def _snapshot_once(self) -> None:
        try:
            usage_in_flight_snapshot()
        except Exception:
            # Once per failure, not a few times a second while the disk stays full.
            if not self._snapshot_failing:
                logger.exception("Could not write the in-flight usage snapshot; will retry.")
            self._snapshot_failing = True
        else:
            self._snapshot_failing = False

    def _flush_once(self) -> bool:
        try:
            close_old_connections()
            self.rows_written += usage_flush()
        except DatabaseError as exc:
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                logger.warning(
                    "Usage rows are being kept in the spool: the database is unavailable (%s).", exc
                )
            close_old_connections()
            return False
        except Exception:
            logger.exception("The usage flusher failed; it will retry.")
            return False
        if self.outage_since is not None:
            logger.info(
                "The database is back: buffered usage rows written after %.1f s.",
                time.monotonic() - self.outage_since,
            )
            self.outage_since = None
        return True


_flusher: UsageFlusher | None = None
_flusher_lock = threading.Lock()


def usage_flusher_start() -> UsageFlusher | None:
    """Start this process's flusher (once). USAGE_FLUSH_SECONDS=0 starts none:
    the tests flush by hand with usage_flush()."""
    global _flusher
    if _flusher is not None and _flusher.is_alive():
        return _flusher
    if settings.USAGE_FLUSH_SECONDS <= 0:
        return None
    with _flusher_lock:
        if _flusher is None or not _flusher.is_alive():
            _flusher = UsageFlusher(settings.USAGE_FLUSH_SECONDS, settings.USAGE_IN_FLIGHT_SECONDS)
            _flusher.start()
            atexit.register(_at_exit, _flusher)
    return _flusher


def _at_exit(flusher: UsageFlusher) -> None:
    """A server stopping (SIGTERM): requests the shutdown cut past its grace period get
    their rows, then the last records are written (or stay spooled for the next process),
    and nothing is left in flight."""
    if cut := usage_in_flight_interrupt():
        logger.warning("Recorded %d request(s) cut by the shutdown as interrupted.", cut)
    flusher.stop()
    usage_spool().in_flight_clear()


def usage_flusher() -> UsageFlusher | None:
    return _flusher
