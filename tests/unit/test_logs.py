"""Secrets in URLs are redacted by the root handlers' filter, whatever logs them and however."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from callwaiting_tts.logs import JsonFormatter, SecretRedactingFilter, redact_secrets

SIGNED = "/v1/audio/tenants/t/phrases/p.wav?expires=1795964731&signature=c2lnbmF0dXJl_value"
S3_SIGNED = (
    "https://bucket.s3.amazonaws.com/p.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20261129&X-Amz-Security-Token=tok3n&X-Amz-Signature=abc123"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SIGNED, "/v1/audio/tenants/t/phrases/p.wav?expires=1795964731&signature=REDACTED"),
        (
            S3_SIGNED,
            "https://bucket.s3.amazonaws.com/p.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=REDACTED&X-Amz-Security-Token=REDACTED&X-Amz-Signature=REDACTED",
        ),
        (
            '"GET /v1/health?key=k1&api_key=k2&xi-api-key=k3&token=k4&access_token=k5&sig=k6&lang=en" 200',
            '"GET /v1/health?key=REDACTED&api_key=REDACTED&xi-api-key=REDACTED&token=REDACTED'
            '&access_token=REDACTED&sig=REDACTED&lang=en" 200',
        ),
        ("/v1/stream?API_KEY=Secret#frag", "/v1/stream?API_KEY=REDACTED#frag"),
        ("/v1/voices/key-holder?voice=joe", "/v1/voices/key-holder?voice=joe"),  # a path, not a parameter
        ("no url at all: key=value", "no url at all: key=value"),
        # Our credentials by value, under any parameter name, in a path, percent-encoded.
        (
            "GET /v1/health?k=cwt_k3j9x0aa_Ab3Ab3Ab3Ab3Ab3Ab3Ab3Ab3Ab3Ab3Zz&lang=en",
            "GET /v1/health?k=cwt_k3j9x0aa_REDACTED&lang=en",
        ),
        (
            "GET /v1/voices/cwt_k3j9x0aa_Ab3Ab3Ab3Ab3Ab3Ab3Ab3Ab3Ab3Ab3Zz/x",
            "GET /v1/voices/cwt_k3j9x0aa_REDACTED/x",
        ),
        (
            "GET /v1/x?foo=cwt%5Fk3j9x0aa%5FAb3Ab3Ab3Ab3Ab3Ab3Ab3Ab3Ab3Ab3Zz",
            "GET /v1/x?foo=cwt_k3j9x0aa_REDACTED",
        ),
        ("GET /v1/x?foo=cwtc_.eJyrVkpOLFGyUko2:1tQ:sig-_x&a=1", "GET /v1/x?foo=cwtc_REDACTED&a=1"),
        ("/v1/audio/cwtc%5F.eJy:abc", "/v1/audio/cwtc_REDACTED"),
        ("a malformed cwt_NOTAKEYsecret", "a malformed cwt_REDACTED"),
        ("key cwt_k3j9x0aa_… verified", "key cwt_k3j9x0aa_… verified"),  # the admin's name for a key
        ("cwt_k3j9x0aa_REDACTED", "cwt_k3j9x0aa_REDACTED"),  # idempotent
        # Our metric names are not keys.
        ('cwt_connections_cut_total{reason="x"} 3', 'cwt_connections_cut_total{reason="x"} 3'),
        ("cwt_usage_records_lost_total", "cwt_usage_records_lost_total"),
    ],
)
def test_redact_secrets_blanks_secret_query_parameters_only(text: str, expected: str) -> None:
    assert redact_secrets(text) == expected


@pytest.fixture
def root_handler_output() -> Iterator[io.StringIO]:
    """What the root logger's own handler (from settings.LOGGING) writes, for the test."""
    [handler] = [
        handler
        for handler in logging.getLogger().handlers
        if any(isinstance(f, SecretRedactingFilter) for f in handler.filters)
    ]
    assert isinstance(handler, logging.StreamHandler)
    output = io.StringIO()
    previous = handler.setStream(output)
    try:
        yield output
    finally:
        handler.setStream(previous)


def test_the_root_handler_redacts_messages_arguments_extras_and_tracebacks(
    root_handler_output: io.StringIO,
) -> None:
    class Request:
        def __str__(self) -> str:
            return f"<ASGIRequest: GET '{SIGNED}'>"

    log = logging.getLogger("django.request")
    log.warning("Forbidden: %s", SIGNED, extra={"request": Request(), "links": [SIGNED]})
    try:
        raise ValueError(f"cannot fetch {S3_SIGNED}")
    except ValueError:
        logging.getLogger("callwaiting_tts.test").exception("Failed on %s", "/v1/tenant?token=t0ken")
    written = root_handler_output.getvalue()
    assert "Forbidden: /v1/audio/tenants/t/phrases/p.wav?expires=1795964731&signature=REDACTED" in written
    assert "Failed on /v1/tenant?token=REDACTED" in written
    assert "ValueError: cannot fetch" in written
    for secret in ("c2lnbmF0dXJl_value", "AKIAEXAMPLE", "tok3n", "abc123", "t0ken"):
        assert secret not in written


def test_json_lines_keep_their_structure_when_redacted() -> None:
    record = logging.makeLogRecord(
        {"msg": "fetched %s", "args": (SIGNED,), "request": object(), "links": {"audio": SIGNED}, "count": 3}
    )
    assert SecretRedactingFilter().filter(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"].endswith("signature=REDACTED")
    assert entry["links"] == {"audio": SIGNED.replace("c2lnbmF0dXJl_value", "REDACTED")}
    assert entry["count"] == 3
