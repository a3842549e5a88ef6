"""A client token's text: signed claims that read back, that nothing can alter, and that the
log scan (tests/conftest.py) and the log redaction both recognise as a secret."""

from __future__ import annotations

import time

import pytest

from callwaiting_tts.logs import redact_secrets
from tenants import tokens
from tests.conftest import _SECRET_IN_LOG

WANTED = tokens.TokenRequest(
    ttl_seconds=120,
    routes=frozenset({"stream", "synthesize"}),
    voices=frozenset({"joe"}),
    origins=frozenset({"https://app.example.com"}),
)


def test_the_claims_read_back() -> None:
    text, minted = tokens.mint("abcd1234", WANTED, now=1_000_000)
    assert text.startswith("cwtc_")
    claims = tokens.read(text, now=1_000_000 + 119)
    assert claims == minted
    assert (claims.key_prefix, claims.expires_at) == ("abcd1234", 1_000_120)
    assert claims.allows_route("stream")
    assert not claims.allows_route("tokens")
    assert claims.allows_voice("joe")
    assert not claims.allows_voice(None)
    with pytest.raises(tokens.TokenRejected) as expired:
        tokens.read(text, now=1_000_000 + 120)
    assert expired.value.code == "token_expired"


def test_two_mints_differ_and_no_claim_can_be_changed() -> None:
    first, _ = tokens.mint("abcd1234", WANTED)
    second, _ = tokens.mint("abcd1234", WANTED)
    assert first != second  # each has its own id
    payload, _, signature = first.rpartition(":")
    middle = len(payload) // 2
    swapped = "A" if payload[middle] != "A" else "B"
    other_payload = f"{payload[:middle]}{swapped}{payload[middle + 1 :]}:{signature}"
    other_signature = first[:-1] + ("A" if first[-1] != "A" else "B")
    for altered in (other_payload, other_signature):
        with pytest.raises(tokens.TokenRejected) as rejected:
            tokens.read(altered)
        assert rejected.value.code == "invalid_token"


def test_logs_recognise_a_token_as_a_secret() -> None:
    text, _ = tokens.mint("abcd1234", WANTED, now=time.time())
    assert _SECRET_IN_LOG.search(f"GET /v1/stream?x=1 auth {text}")
    assert text not in redact_secrets(f"GET /v1/stream?token={text}")
