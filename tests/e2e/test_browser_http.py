"""What a browser needs of the HTTP API, over real HTTP against Daphne: CORS preflights and
headers for the tenants' origins (django-cors-headers, tenants.origins), byte ranges on
signed audio links (local disk here, moto's S3 for presigned links), client tokens as a
Bearer. tests/e2e/test_browser.py drives the same from headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tenants.models import Tenant
from tenants.services import IssuedKey
from tests.support.servers import ServiceEnv, daphne_server, moto_s3_server, s3_client
from tests.support.tenants import committed_tenant

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

APP_ORIGIN = "https://app.example.com"
OTHER_ORIGIN = "https://other-tenant.example.com"
UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}


@pytest.fixture(scope="module")
def tenants(django_db_blocker: Any, test_database_url: str) -> Iterator[tuple[IssuedKey, IssuedKey]]:
    with (
        committed_tenant(django_db_blocker, "cors", allowed_origins=[APP_ORIGIN], **UNLIMITED) as (_t, mine),
        committed_tenant(django_db_blocker, "cors-other", allowed_origins=[OTHER_ORIGIN], **UNLIMITED) as (
            _o,
            other,
        ),
    ):
        yield mine, other


@pytest.fixture(scope="module")
def base_url(service_env: ServiceEnv, tenants: tuple[IssuedKey, IssuedKey]) -> Iterator[str]:
    with daphne_server(service_env(CORS_ORIGINS_CACHE_SECONDS="0")) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def preflight(base_url: str, origin: str, path: str = "/v1/synthesize") -> httpx.Response:
    return httpx.options(
        f"{base_url}{path}",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_a_preflight_from_a_tenants_origin_is_answered_without_a_credential(base_url: str) -> None:
    for origin in (APP_ORIGIN, OTHER_ORIGIN):  # the union: a preflight names no tenant
        response = preflight(base_url, origin)
        assert response.status_code == 200
        assert response.headers["Access-Control-Allow-Origin"] == origin
        assert "authorization" in response.headers["Access-Control-Allow-Headers"]
        assert "POST" in response.headers["Access-Control-Allow-Methods"]
        assert response.headers["X-Request-ID"]
        assert "origin" in response.headers["Vary"].lower()


def test_a_preflight_from_an_unknown_origin_gets_no_cors_headers(base_url: str) -> None:
    response = preflight(base_url, "https://evil.example")
    assert "Access-Control-Allow-Origin" not in response.headers
    # OPTIONS that is not a preflight keeps the method policy: 405 in the error shape.
    response = httpx.options(f"{base_url}/v1/voices")
    assert response.status_code in {401, 405}
    assert response.json()["error"]["code"] in {"missing_api_key", "method_not_allowed"}


def test_the_real_request_is_held_to_its_own_tenants_origins(
    base_url: str, tenants: tuple[IssuedKey, IssuedKey]
) -> None:
    mine, _other = tenants
    allowed = httpx.get(f"{base_url}/v1/voices", headers={**bearer(mine.plaintext), "Origin": APP_ORIGIN})
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    exposed = allowed.headers["Access-Control-Expose-Headers"]
    for name in ("X-Request-ID", "X-Audio-Format", "X-Sample-Rate", "Content-Range", "Accept-Ranges"):
        assert name in exposed
    # Another tenant's origin passes the preflight (the union) but not this tenant's check.
    refused = httpx.get(f"{base_url}/v1/voices", headers={**bearer(mine.plaintext), "Origin": OTHER_ORIGIN})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "origin_not_allowed"
    assert refused.headers["X-Request-ID"] == refused.json()["error"]["request_id"]


def test_a_client_token_is_a_bearer_for_synthesis_with_cors_headers(
    base_url: str, tenants: tuple[IssuedKey, IssuedKey]
) -> None:
    mine, _other = tenants
    minted = httpx.post(
        f"{base_url}/v1/tokens",
        json={"routes": ["synthesize"], "expires_in": 60},
        headers=bearer(mine.plaintext),
    )
    assert minted.status_code == 201, minted.text
    token = minted.json()["token"]
    response = httpx.post(
        f"{base_url}/v1/synthesize",
        json={"text": "From a page.", "format": "pcm"},
        headers={**bearer(token), "Origin": APP_ORIGIN},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Access-Control-Allow-Origin"] == APP_ORIGIN
    assert response.headers["X-Audio-Format"] == "pcm"
    assert len(response.content) > 10_000


# --- Byte ranges on signed links -----------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_link(base_url: str, tenants: tuple[IssuedKey, IssuedKey]) -> tuple[str, bytes]:
    mine, _other = tenants
    answer = httpx.post(
        f"{base_url}/v1/synthesize-url",
        json={"text": f"Range me {uuid.uuid4().hex[:6]}.", "format": "mp3"},
        headers=bearer(mine.plaintext),
        timeout=60,
    ).json()
    whole = httpx.get(answer["url"])
    assert whole.status_code == 200
    assert whole.headers["Accept-Ranges"] == "bytes"
    assert len(whole.content) == answer["bytes"] > 1000
    return answer["url"], whole.content


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-99", 0, 99), ("bytes=100-", 100, None), ("bytes=-50", -50, None), ("bytes=10-10", 10, 10)],
)
def test_a_range_is_206_with_just_those_bytes(
    signed_link: tuple[str, bytes], header: str, start: int, end: int | None
) -> None:
    url, whole = signed_link
    expected = whole[start:] if end is None else whole[start : end + 1]
    response = httpx.get(url, headers={"Range": header})
    assert response.status_code == 206
    assert response.content == expected
    first = start % len(whole)
    assert response.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(whole)}"
    assert response.headers["Content-Length"] == str(len(expected))


def test_curl_range_0_99_answers_206_with_100_bytes(signed_link: tuple[str, bytes]) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed here (the ranges themselves are tested above)")
    url, whole = signed_link
    result = subprocess.run(
        [curl, "-sS", "-H", "Range: bytes=0-99", "-o", "-", "-w", "\n%{http_code}", url],
        capture_output=True,
        timeout=30,
        check=True,
    )
    body, _, status = result.stdout.rpartition(b"\n")
    assert (status, len(body), body) == (b"206", 100, whole[:100])


def test_an_unsatisfiable_range_is_416_and_odd_ones_get_the_whole(signed_link: tuple[str, bytes]) -> None:
    url, whole = signed_link
    response = httpx.get(url, headers={"Range": f"bytes={len(whole)}-"})
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{len(whole)}"
    assert response.json()["error"]["code"] == "range_not_satisfiable"
    for ignored in ("bytes=0-1,5-9", "items=0-5", "bytes=9-2", "bytes=x-"):
        response = httpx.get(url, headers={"Range": ignored})
        assert (response.status_code, response.content) == (200, whole), ignored
    # If-Range naming another version: the whole, not a piece of something else.
    response = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": '"not-this-one"'})
    assert (response.status_code, response.content) == (200, whole)
    etag = httpx.head(url).headers["ETag"]
    response = httpx.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert (response.status_code, response.content) == (206, whole[:10])
    head = httpx.head(url, headers={"Range": "bytes=0-99"})
    assert (head.status_code, head.headers["Content-Length"], head.content) == (206, "100", b"")


def test_on_s3_a_presigned_link_answers_ranges_itself(
    service_env: ServiceEnv, tenants: tuple[IssuedKey, IssuedKey]
) -> None:
    bucket = "ranges-test"
    issued, _other = tenants
    with moto_s3_server() as endpoint:
        s3_client(endpoint).create_bucket(Bucket=bucket)
        env = service_env(
            S3_BUCKET=bucket, S3_ENDPOINT_URL=endpoint, S3_ACCESS_KEY_ID="test", S3_SECRET_ACCESS_KEY="test"
        )
        with daphne_server(env) as url:
            answer = httpx.post(
                f"{url}/v1/synthesize-url",
                json={"text": "From the bucket, in pieces."},
                headers=bearer(issued.plaintext),
                timeout=60,
            ).json()
        assert answer["url"].startswith(f"{endpoint}/{bucket}/")
        whole = httpx.get(answer["url"]).content
        piece = httpx.get(answer["url"], headers={"Range": "bytes=0-99"})
        assert (piece.status_code, piece.content) == (206, whole[:100])


def test_tenant_fixture_origins_are_stored_normalised(tenants: tuple[IssuedKey, IssuedKey]) -> None:
    mine, _other = tenants
    assert Tenant.objects.get(pk=mine.api_key.tenant_id).allowed_origins == [APP_ORIGIN]
