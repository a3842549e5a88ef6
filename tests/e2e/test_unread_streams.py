"""A streamed HTTP response whose client never reads, through a real Daphne: the server
holds a bounded buffer (the socket's), the engine waits, and after HTTP_STREAM_STALL_SECONDS
the stream is cut and what it held (its stream lease, its usage row) is released."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers import ServiceEnv, daphne_process
from tests.support.tenants import bearer, committed_tenant
from tests.support.waiting import wait_until
from usage.models import UsageLog

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

METRICS_TOKEN = "scrape-token-for-unread-streams"
READERS = 3
# Minutes of speech at 48 kHz PCM (96 KB a second): whole, each answer is some 20 MB; three
# used to grow the server by 60 MB and more. Bounded, they hold the sockets' buffers.
LONG = " ".join(f"Sentence number {n} of an answer that keeps going for a long while." for n in range(60))
# The process's growth while the streams wait: their buffers, and what the engine's renders
# and the allocator keep, which alone varied from 40 to 64 MB between runs on a loaded
# machine: a guard against gross growth (58 MB for ONE request was measured before
# backpressure). The exact measure of what is buffered is HANDED_OVER_MAX_BYTES.
RSS_ALLOWANCE = 160 * 1024 * 1024
# What a cut stream handed to its socket (its usage row counts it): the sockets' buffers and
# a chunk in flight (3.5 MB measured), never the whole answer of some 20 MB. Exact, unlike memory.
HANDED_OVER_MAX_BYTES = 6 * 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stalled_cuts(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    found = re.search(r'^cwt_connections_cut_total\{reason="stream_stalled"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def paused(base_url: str) -> int:
    return int(httpx.get(f"{base_url}/v1/health", timeout=10).json()["streams"]["paused_for_slow_reader"])


def never_reading_request(base_url: str, key: str, request_id: str, text: str = LONG) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.connect((host, int(port)))
    body = json.dumps({"text": text, "format": "pcm", "sample_rate": 48000, "streaming": True}).encode()
    sock.sendall(
        f"POST /v1/synthesize HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nX-Request-ID: {request_id}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


@pytest.fixture
def server(service_env: ServiceEnv) -> Iterator[tuple[Any, str]]:
    # Long enough that every stream is seen waiting at once before the first is cut (the
    # engine fills the three sockets at different times on a loaded machine).
    env = service_env(HTTP_STREAM_STALL_SECONDS="20", METRICS_TOKEN=METRICS_TOKEN)
    with daphne_process(env) as (process, base_url):
        yield process, base_url


def test_clients_that_never_read_hold_a_bounded_buffer_and_are_cut_releasing_their_leases(
    server: tuple[Any, str], django_db_blocker: Any
) -> None:
    process, base_url = server
    limits = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0}
    with committed_tenant(django_db_blocker, "unread", max_concurrent_streams=READERS, **limits) as (
        tenant,
        issued,
    ):
        # The engine's own memory for this many streams at this rate is not the buffers':
        # three read whole first, at once, so that the baseline has it.
        warm = [
            never_reading_request(base_url, issued.plaintext, f"warm-{n}", LONG[:400]) for n in range(READERS)
        ]
        for sock in warm:
            with sock:
                sock.settimeout(60)
                while sock.recv(65536):
                    pass
        before = rss(process.pid)
        cuts_before = stalled_cuts(base_url)
        sockets = [never_reading_request(base_url, issued.plaintext, f"unread-{n}") for n in range(READERS)]
        try:
            # Each stream fills its socket and waits: the server stops making its audio.
            wait_until(lambda: paused(base_url) >= READERS, what="every stream to wait for its reader")
            held = rss(process.pid) - before
            print(f"held {held / 2**20:.1f} MiB for {READERS} unread streams")
            assert held < RSS_ALLOWANCE, f"{held / 2**20:.0f} MiB held for {READERS} unread streams"
            # After HTTP_STREAM_STALL_SECONDS without progress, each is cut.
            wait_until(
                lambda: stalled_cuts(base_url) >= cuts_before + READERS and paused(base_url) == 0,
                what="the stalled streams to be cut",
                timeout_s=60,
            )
        finally:
            for sock in sockets:
                sock.close()

        def rows() -> list[UsageLog]:
            with django_db_blocker.unblock():
                return list(UsageLog.objects.filter(tenant_id=tenant.id))

        wait_until(lambda: len(rows()) == 2 * READERS, what="a usage row for each cut stream", timeout_s=60)
        unread = sorted((row for row in rows() if row.request_id.startswith("unread-")), key=str)
        assert sorted(row.request_id for row in unread) == [f"unread-{n}" for n in range(READERS)]
        handed_over = [row.audio_bytes for row in unread]
        print(f"handed to the sockets before the cut: {handed_over} bytes")
        assert all(0 < size < HANDED_OVER_MAX_BYTES for size in handed_over), handed_over
        # Their leases are free: the tenant's full cap streams again.
        with httpx.Client(base_url=base_url, timeout=60) as client:
            for _ in range(READERS):
                with client.stream(
                    "POST",
                    "/v1/synthesize",
                    json={"text": "Free again.", "format": "pcm", "streaming": True},
                    headers=bearer(issued.plaintext),
                ) as response:
                    assert response.status_code == 200, response.read()
