"""Request bodies through a real Daphne: nobody without a key makes the server hold or parse much.

Twisted used to read every body whole and parse form and multipart bodies on the
event loop, before the application (and its authentication) saw the request.
"""

from __future__ import annotations

import io
import select
import socket
import subprocess
import threading
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers import ServiceEnv, daphne_process
from tests.support.tenants import bearer, committed_tenant

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

BODY_LIMIT = 1024 * 1024  # REQUEST_BODY_MAX_BYTES's default
UPLOAD_LIMIT = 3_000_000  # VOICE_UPLOAD_MAX_BYTES for this module's server
# Growth of the server's resident memory that a refused body may cause, at most
# (a 50 MB multipart body used to add about 600 MB).
RSS_ALLOWANCE = 50 * 1024 * 1024
# /v1/health must answer within this while bodies arrive (a 10 MB form body used
# to stall the event loop for 3 to 8 seconds). Generous: the test machine is shared.
HEALTH_TIMEOUT = 3.0


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log_dir: Path

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.base_url.removeprefix("http://").split(":")
        return host, int(port)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS for the server")

    def log(self) -> str:
        return "".join(path.read_text() for path in self.log_dir.glob("daphne-*.log"))


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv) -> Iterator[Server]:
    env = service_env(VOICE_UPLOAD_MAX_BYTES=str(UPLOAD_LIMIT), LOG_FORMAT="plain")
    with daphne_process(env) as (process, base_url):
        yield Server(process, base_url, Path(env["CWT_TEST_LOG_DIR"]))


@pytest.fixture(scope="module")
def uploader_key(django_db_blocker: Any, test_database_url: str) -> Iterator[str]:
    with committed_tenant(django_db_blocker, "uploader", permissions=["upload"]) as (_tenant, issued):
        yield issued.plaintext


@contextmanager
def health_polled(base_url: str) -> Iterator[list[str]]:
    """/v1/health asked again and again meanwhile; yields what each answer was."""
    answers: list[str] = []
    stop = threading.Event()
    first = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=HEALTH_TIMEOUT) as client:
            while not stop.is_set():
                try:
                    answers.append(str(client.get(f"{base_url}/v1/health").status_code))
                except httpx.HTTPError as exc:
                    answers.append(type(exc).__name__)
                first.set()
                stop.wait(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        assert first.wait(30), "/v1/health never answered"
        yield answers
    finally:
        stop.set()
        poller.join(timeout=30)


def multipart(fields: dict[str, str], file: bytes, content_type: str = "audio/wav") -> tuple[bytes, str]:
    boundary = "cwt-test-boundary-7d1f"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="ref.wav"\r\n'
        f"Content-Type: {content_type}\r\n\r\n".encode()
        + file
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def pcm_wav(seconds: float, rate: int = 44100) -> bytes:
    """A stereo 16-bit tone: large for its length (176 KB a second)."""
    frames = int(seconds * rate)
    tone = bytes((i * 7) % 251 for i in range(4096))
    data = (tone * (frames * 4 // len(tone) + 1))[: frames * 4]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(data)
    return buffer.getvalue()


def assert_refused(response: httpx.Response, code: str) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["request_id"] == response.headers["X-Request-ID"]


def test_a_10_mb_form_body_without_a_key_is_refused_unread(server: Server) -> None:
    body = b"field=value&" * (10 * 1024 * 1024 // 12)
    before = server.rss()
    with health_polled(server.base_url) as health:
        response = httpx.post(
            f"{server.base_url}/v1/synthesize",
            content=body,
            headers={"Content-Type": "application/x-www-form-urlencoded", "X-Request-ID": "form-flood-1"},
            timeout=60,
        )
        after = server.rss()
    assert_refused(response, "body_too_large")
    assert response.json()["error"]["request_id"] == "form-flood-1"
    assert after - before < RSS_ALLOWANCE
    assert health
    assert set(health) == {"200"}, health


def test_a_50_mb_multipart_body_without_a_key_is_refused_unread(server: Server) -> None:
    body, content_type = multipart({"name": "x", "language": "en"}, b"\0" * (50 * 1024 * 1024))
    before = server.rss()
    with health_polled(server.base_url) as health:
        for path in ("/v1/voices/upload", "/v1/synthesize", "/admin/login/"):
            response = httpx.post(
                f"{server.base_url}{path}", content=body, headers={"Content-Type": content_type}, timeout=60
            )
            assert_refused(response, "body_too_large")
        after = server.rss()
    assert after - before < RSS_ALLOWANCE
    assert health
    assert set(health) == {"200"}, health


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(server: Server) -> None:
    piece = b"field=value&" * 5000  # 60 KB
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    sent = 0
    answer = b""
    before = server.rss()
    with socket.create_connection(server.address, timeout=30) as sock:
        sock.sendall(
            b"POST /v1/synthesize HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        )
        # A client that would send for ever, reading whatever the server says between chunks.
        while sent < 100 * 1024 * 1024:
            sock.sendall(chunk)
            sent += len(piece)
            if select.select([sock], [], [], 0)[0]:
                break
        # Then the answer, and the server closes the connection (recv gives b"").
        while data := sock.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"code": "body_too_large"' in answer
    # Answered while the client was still sending (what it sent past the limit
    # was sitting in the sockets' buffers), and none of it kept.
    assert sent < 100 * 1024 * 1024
    assert server.rss() - before < RSS_ALLOWANCE


def test_a_body_within_the_limit_still_reaches_the_app(server: Server) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/synthesize",
        content=b"field=value&" * 50_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=30,
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"


def test_an_upload_with_a_key_may_be_larger_than_other_bodies(server: Server, uploader_key: str) -> None:
    audio = pcm_wav(12.0)  # 2.1 MB: over the default limit, within the upload's
    assert BODY_LIMIT < len(audio) < UPLOAD_LIMIT
    body, content_type = multipart({"name": "Front Desk", "language": "en"}, audio)
    response = httpx.post(
        f"{server.base_url}/v1/voices/upload",
        content=body,
        headers={"Content-Type": content_type, **bearer(uploader_key)},
        timeout=60,
    )
    # The view read the whole upload and got as far as the engine, which here cannot clone.
    assert response.status_code == 422, response.text
    assert response.reason_phrase == HTTPStatus(422).phrase  # Twisted's own table has none
    assert response.json()["error"]["code"] == "cloning_not_supported"

    without_key = httpx.post(
        f"{server.base_url}/v1/voices/upload",
        content=body,
        headers={"Content-Type": content_type},
        timeout=60,
    )
    assert_refused(without_key, "body_too_large")


def test_an_upload_over_its_own_limit_is_refused_before_it_is_read(server: Server, uploader_key: str) -> None:
    body, content_type = multipart({"name": "Front Desk", "language": "en"}, pcm_wav(20.0))  # 3.5 MB
    response = httpx.post(
        f"{server.base_url}/v1/voices/upload",
        content=body,
        headers={"Content-Type": content_type, **bearer(uploader_key)},
        timeout=60,
    )
    assert_refused(response, "upload_too_large")
    assert str(UPLOAD_LIMIT) in response.json()["error"]["message"]


def test_refused_bodies_are_in_the_access_log(server: Server) -> None:
    httpx.post(f"{server.base_url}/v1/synthesize", content=b"x" * (2 * BODY_LIMIT), timeout=30)
    log = server.log()
    assert '"POST /v1/synthesize" 413' in log
    assert "Refused a request body over 1048576 bytes for /v1/synthesize (body_too_large)" in log
