"""Operations: /metrics, the Sentry scrubber, JSON logs, /v1/ready, SIGTERM, and a real Prometheus."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from tests.support.servers import (
    ROOT,
    RedisServer,
    ServiceEnv,
    daphne_process,
    daphne_server,
    free_port,
    manage,
    postgres_server,
)
from tests.support.tenants import TenantFactory, bearer, committed_tenant

METRICS_TOKEN = "scrape-token-for-tests"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _scrape(client: Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {METRICS_TOKEN}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return _samples(response.content.decode())


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- /metrics ------------------------------------------------------------------------------


def test_metrics_need_their_token(db: None, settings: Any) -> None:
    client = Client()
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics").status_code == 404  # not configured: not there
    settings.METRICS_TOKEN = METRICS_TOKEN
    for header in (None, "Bearer wrong", f"Token {METRICS_TOKEN}"):
        refused = client.get("/metrics", headers={"Authorization": header} if header else {})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_metrics_token"
        assert refused["WWW-Authenticate"].startswith("Bearer")


def test_metrics_count_what_the_service_did(
    settings: Any, make_tenant: TenantFactory, api_client: APIClient
) -> None:
    settings.METRICS_TOKEN = METRICS_TOKEN
    scraper = Client()
    _tenant, issued = make_tenant(rate_limit_minute=3, rate_limit_hour=0, quota_minutes=0)
    key = bearer(issued.plaintext)
    before = _scrape(scraper)

    whole = api_client.post(
        "/v1/synthesize", {"text": "Counted once.", "format": "pcm"}, format="json", headers=key
    )
    assert whole.status_code == 200
    bad = api_client.post("/v1/synthesize", {"text": ""}, format="json", headers=key)
    assert bad.status_code == 400
    url = api_client.post("/v1/synthesize-url", {"text": "Counted once."}, format="json", headers=key)
    assert url.status_code == 200
    limited = api_client.post("/v1/synthesize", {"text": "One too many."}, format="json", headers=key)
    assert limited.status_code == 429

    after = _scrape(scraper)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    ok = {"endpoint": "synthesize", "format": "pcm", "status": "200", "cached": "false"}
    assert delta("cwt_synthesis_requests_total", **ok) == 1
    assert (
        delta(
            "cwt_synthesis_requests_total", endpoint="synthesize", format="wav", status="400", cached="false"
        )
        == 1
    )
    assert (
        delta(
            "cwt_synthesis_requests_total",
            endpoint="synthesize-url",
            format="wav",
            status="200",
            cached="false",
        )
        == 1
    )
    assert delta("cwt_limit_refusals_total", reason="rate_limited") == 1
    assert delta("cwt_time_to_first_audio_seconds_count", endpoint="synthesize") == 1
    assert delta("cwt_time_to_first_audio_seconds_bucket", endpoint="synthesize", le="+Inf") == 1
    buckets = {
        dict(labels)["le"] for name, labels in after if name == "cwt_time_to_first_audio_seconds_bucket"
    }
    assert {"0.025", "5.0"} <= buckets  # resolves 25 ms to 5 s
    assert delta("cwt_synthesis_duration_seconds_count", endpoint="synthesize") == 3  # the 200, 400 and 429
    assert delta("cwt_audio_bytes_total", endpoint="synthesize") == len(whole.content)
    assert delta("cwt_audio_seconds_total", endpoint="synthesize") == pytest.approx(
        float(whole["X-Audio-Duration"]), abs=1e-3
    )
    assert delta("cwt_audio_bytes_total", endpoint="synthesize-url") == url.json()["bytes"]
    assert delta("cwt_http_requests_total", method="POST", route="synthesize", status="200") == 1
    assert delta("cwt_engine_busy_seconds_total") > 0
    assert _value(after, "cwt_engine_jobs_in_flight") == 0
    assert _value(after, "cwt_active_streams") == 0
    assert _value(after, "cwt_usage_spool_bytes") > 0  # this test run flushes by hand
    assert _value(after, "cwt_gpu_memory_bytes") == 0
    # django-prometheus's HTTP and database basics are there too
    assert any(name.startswith("django_http_requests_total_by_method") for name, _ in after)
    assert any(name.startswith("django_db_execute_total") for name, _ in after)
    # labels carry no text and no tenant unless asked for
    assert not any("Counted once" in str(labels) or "tenant" in dict(labels) for _, labels in after)


# --- Sentry ----------------------------------------------------------------------------------


class _Envelopes(BaseHTTPRequestHandler):
    received: list[bytes] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            import gzip

            body = gzip.decompress(body)
        type(self).received.append(body)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


_SENTRY_SCRIPT = """
import sys
import sentry_sdk
from callwaiting_tts.sentry import sentry_init

sentry_init(sys.argv[1], release="test", traces_sample_rate=0.0, environment="test")
secret = "PLEASE HOLD WHILE I CHECK YOUR PRESCRIPTION"
sentry_sdk.set_tag("tenant_id", "tenant-123")
sentry_sdk.set_tag("request_id", "req-456")
sentry_sdk.add_breadcrumb(category="synthesis", message="text received", data={"text": secret})

def speak(text):
    raise ValueError("engine failed")

with sentry_sdk.new_scope() as scope:
    scope.add_event_processor(lambda event, hint: {**event, "request": {
        "method": "POST", "url": "http://service/v1/synthesize", "data": {"text": secret},
        "query_string": "text=" + secret, "cookies": {"session": secret},
        "headers": {"Authorization": "Bearer cwt_abcdefgh_secretsecret", "User-Agent": "agent/1.0"}},
        "extra": {"text": secret}})
    try:
        speak(secret)
    except ValueError:
        sentry_sdk.capture_exception()
sentry_sdk.flush(5)
"""


def test_the_sentry_scrubber_sends_no_text_through_the_real_sdk() -> None:
    _Envelopes.received = []
    server = HTTPServer(("127.0.0.1", 0), _Envelopes)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dsn = f"http://publickey@127.0.0.1:{server.server_address[1]}/1"
        result = subprocess.run(
            [sys.executable, "-c", _SENTRY_SCRIPT, dsn], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    finally:
        server.shutdown()
    sent = b"".join(_Envelopes.received).decode()
    assert '"ValueError"' in sent  # the event arrived, with its exception
    assert "speak" in sent  # and its stack trace
    assert '"tenant_id":"tenant-123"' in sent.replace(" ", "")
    assert '"request_id":"req-456"' in sent.replace(" ", "")
    assert "PRESCRIPTION" not in sent
    assert "secretsecret" not in sent
    assert "agent/1.0" in sent  # harmless headers stay


# --- JSON logs ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_json_logs_carry_ids_and_counts_but_no_text(service_env: ServiceEnv, django_db_blocker: Any) -> None:
    env = service_env(LOG_FORMAT="json")
    with committed_tenant(django_db_blocker, "logs", rate_limit_minute=0, rate_limit_hour=0) as (
        tenant,
        issued,
    ):
        with daphne_server(env) as base_url:
            response = httpx.post(
                f"{base_url}/v1/synthesize",
                json={"text": "A private sentence about an appointment."},
                headers={**bearer(issued.plaintext), "X-Request-ID": "log-check-1"},
                timeout=60,
            )
            assert response.status_code == 200
        log = "".join(path.read_text() for path in Path(env["CWT_TEST_LOG_DIR"]).glob("daphne-*.log"))
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    [entry] = [
        e for e in entries if e.get("request_id") == "log-check-1" and e["logger"] == "callwaiting.requests"
    ]
    assert entry["tenant_id"] == str(tenant.id)
    assert (entry["endpoint"], entry["status_code"]) == ("synthesize", 200)
    assert entry["latency_ms"] > 0
    assert entry["input_chars"] == len("A private sentence about an appointment.")
    assert "appointment" not in log


# --- Readiness ------------------------------------------------------------------------------------


def _ready(base_url: str) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{base_url}/v1/ready", timeout=10)
    return response.status_code, response.json()


@pytest.mark.slow
def test_ready_follows_postgres_and_redis_down_and_back(
    service_env: ServiceEnv, redis_server: RedisServer
) -> None:
    with postgres_server() as postgres:
        env = service_env(DATABASE_URL=postgres.url, REDIS_URL=redis_server.url)
        manage("migrate", "--noinput", env=env)
        with daphne_server(env) as base_url:
            status, body = _ready(base_url)
            assert (status, body["failed"]) == (200, [])
            assert set(body["checks"]) == {"database", "storage", "redis", "engine", "usage_journal"}
            assert body["checks"]["engine"]["warm_up_s"] > 0

            postgres.stop()
            status, body = _ready(base_url)
            assert (status, body["failed"]) == (503, ["database"])
            assert httpx.get(f"{base_url}/v1/health").status_code == 200  # alive, just not ready
            postgres.start()
            status, body = _ready(base_url)
            assert (status, body["failed"]) == (200, [])

            # Redis is shared by every pod: its loss degrades them all, and taking them all
            # out of the load balancer would stop the speech that still works.
            redis_server.stop()
            status, body = _ready(base_url)
            assert (status, body["status"], body["failed"], body["degraded"]) == (
                200,
                "degraded",
                [],
                ["redis"],
            )
            redis_server.start()
            status, body = _ready(base_url)
            assert (status, body["status"], body["degraded"]) == (200, "ready", [])


# --- SIGTERM ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_sigterm_lets_a_running_stream_finish_then_exits(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    text = " ".join(f"Sentence {n} of an answer that must be heard to the end." for n in range(12))
    body = {"text": text, "format": "pcm"}
    limits = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
    with committed_tenant(django_db_blocker, "sigterm", **limits) as (_tenant, issued):
        headers = bearer(issued.plaintext)
        with daphne_process(service_env()) as (process, base_url):
            whole = httpx.post(f"{base_url}/v1/synthesize", json=body, headers=headers, timeout=60).content
            received = bytearray()
            with httpx.stream(
                "POST",
                f"{base_url}/v1/synthesize",
                json={**body, "streaming": True},
                headers=headers,
                timeout=60,
            ) as response:
                chunks = response.iter_raw()
                received += next(chunks)
                process.send_signal(signal.SIGTERM)
                time.sleep(0.5)
                # draining: no new connections, not ready
                with pytest.raises(httpx.TransportError):
                    httpx.get(f"{base_url}/v1/health", timeout=2)
                for chunk in chunks:
                    received += chunk
            assert process.wait(timeout=30) == 0
    assert bytes(received) == whole  # the running stream was heard to its end


# --- A real Prometheus --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Prometheus is not installed (apt install prometheus)"
)
def test_a_real_prometheus_scrapes_the_service(service_env: ServiceEnv, tmp_path: Path) -> None:
    with daphne_server(service_env(METRICS_TOKEN=METRICS_TOKEN)) as base_url:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: callwaiting-tts\n"
            f"    authorization: {{credentials: {METRICS_TOKEN}}}\n"
            f"    static_configs: [{{targets: ['{base_url.removeprefix('http://')}']}}]\n"
        )
        port = free_port()
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            api = f"http://127.0.0.1:{port}/api/v1"
            deadline = time.monotonic() + 60
            while True:
                try:
                    targets = httpx.get(f"{api}/targets", timeout=2).json()["data"]["activeTargets"]
                    if targets and targets[0]["health"] == "up":
                        break
                except (httpx.TransportError, KeyError, ValueError):
                    pass
                assert time.monotonic() < deadline, (
                    f"the target never came up: {targets if 'targets' in dir() else None}"
                )
                time.sleep(0.5)
            query = httpx.get(
                f"{api}/query", params={"query": "cwt_engine_busy_seconds_total"}, timeout=5
            ).json()
            assert query["data"]["result"], query
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=20)
