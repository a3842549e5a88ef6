"""Schema-driven fuzzing: schemathesis, every check, over the OpenAPI document that Daphne
serves at /v1/openapi.json, once with a valid key and once without one. Zero failures: every
answer is declared (status, media type, headers, body shape), none is a 500, what the schema
refuses the server refuses, and what the schema allows the server takes.

The cases are generated at collection, before any server runs, from the document this
process generates; the first test holds the live server's document to be that same one.

A schema cannot say everything the server checks: whether text is speakable or valid SSML,
which sample rates go with which format, which languages the loaded engine speaks, that `to`
comes after `from`, whether an upload is audio and the engine can clone. For those the
check that a schema-valid request is accepted is replaced by a narrower one: the refusal
must carry one of the codes listed here for its operation, and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer, committed_tenant

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

EXAMPLES = 20

_TEXT_CODES = {
    "empty_text",
    "invalid_ssml",
    "ssml_break_too_long",
    "unsupported_sample_rate",
    "unsupported_language",
    "audio_too_long",
}
# Per operation: the codes a schema-valid request may still be refused with (see above).
BEYOND_THE_SCHEMA: dict[str, set[str]] = {
    "POST /v1/synthesize": _TEXT_CODES,
    "POST /v1/synthesize-url": _TEXT_CODES,
    "POST /v1/twiml/play": _TEXT_CODES,
    "POST /v1/audio/speech": _TEXT_CODES,
    "GET /v1/usage": {"invalid_request"},  # `to` not after `from`, or over 400 days after it
    "POST /v1/tokens": {"invalid_request"},  # `origins` must be among the tenant's allowed origins
    "POST /v1/voices/upload": {"invalid_audio", "audio_too_short", "audio_too_long", "cloning_not_supported"},
}


def _document() -> dict[str, Any]:
    generator: Any = SchemaGenerator  # drf-spectacular's generator is untyped
    generated: dict[str, Any] = generator().get_schema(request=None, public=True)
    return generated


DOCUMENT = _document()
# 413 (a text or body over its limit) is a refusal as good as a 400.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "negative_data_rejection": {
                "expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429, "5xx"]
            }
        }
    }
)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)
fuzz_settings = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)


# The fuzzer is about the contract, not the engine: each request's audio is bounded (a
# 400 audio_too_long past it, which the schema declares), so that a long text of digits
# is a few seconds of engine work however busy the machine is, not several minutes.
FUZZ_MAX_AUDIO_SECONDS = "20"


@pytest.fixture(scope="module")
def fuzz_server(service_env: ServiceEnv) -> Iterator[str]:
    with daphne_server(service_env(MAX_AUDIO_SECONDS_PER_REQUEST=FUZZ_MAX_AUDIO_SECONDS)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def fuzz_key(django_db_blocker: Any, test_database_url: str) -> Iterator[str]:
    # Unlimited, and allowed to upload, so that no 429 or 403 hides what the fuzzer finds.
    limits = {
        "max_concurrent_streams": 100,
        "rate_limit_minute": 0,
        "rate_limit_hour": 0,
        "quota_minutes": 0,
        "permissions": ["upload"],
    }
    with committed_tenant(django_db_blocker, "fuzz", **limits) as (_tenant, issued):
        yield issued.plaintext


def _call(case: Any, base_url: str, headers: dict[str, str]) -> None:
    label = f"{case.method.upper()} {case.path}"
    beyond = BEYOND_THE_SCHEMA.get(label)
    excluded = [positive_data_acceptance] if beyond else []
    response = case.call_and_validate(
        base_url=base_url, headers=headers, timeout=60, excluded_checks=excluded
    )
    meta = case.meta
    positive = meta is not None and meta.generation.mode.is_positive
    if beyond and positive and response.status_code in (400, 413, 422):
        code = response.json()["error"]["code"]
        assert code in beyond, f"{label}: a schema-valid request was refused with {code}: {response.text}"


def test_the_fuzzed_document_is_the_one_the_server_serves(fuzz_server: str) -> None:
    live = httpx.get(f"{fuzz_server}/v1/openapi.json", timeout=30).json()
    assert live["paths"] == DOCUMENT["paths"]
    assert live["components"] == DOCUMENT["components"]


@schema.parametrize()
@fuzz_settings
@pytest.mark.timeout(300)
def test_every_operation_with_a_valid_key(case: Any, fuzz_server: str, fuzz_key: str) -> None:
    _call(case, fuzz_server, bearer(fuzz_key))


@schema.parametrize()
@fuzz_settings
@pytest.mark.timeout(300)
def test_every_operation_without_a_key(case: Any, fuzz_server: str) -> None:
    _call(case, fuzz_server, {})
