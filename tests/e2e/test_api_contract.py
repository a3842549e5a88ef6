"""The API's contract at the edges a schema cannot express, through Daphne: odd methods on
every route, malformed bodies of every content type, out-of-range query strings, signed
links in odd forms, and requests Twisted cannot parse. Whatever the input: no 500, and every
error is JSON in the error shape, with a stable code and an X-Request-ID header.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from django.urls import URLPattern, get_resolver

from synthesis.stored_audio import local_url_signature
from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer, committed_tenant

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

# Every /v1 route by URL name: a sample path, its documented methods, whether it needs a key.
ROUTES: dict[str, tuple[str, frozenset[str], bool]] = {
    "health": ("/v1/health", frozenset({"GET"}), False),
    "ready": ("/v1/ready", frozenset({"GET"}), False),
    "openapi-schema": ("/v1/openapi.json", frozenset({"GET"}), False),
    "docs": ("/v1/docs", frozenset({"GET"}), False),
    "audio-download": ("/v1/audio/tenants/x/phrases/y.wav", frozenset({"GET"}), False),
    "tenant-detail": ("/v1/tenant", frozenset({"GET"}), True),
    "tokens": ("/v1/tokens", frozenset({"POST"}), True),
    "usage": ("/v1/usage", frozenset({"GET"}), True),
    "voice-list": ("/v1/voices", frozenset({"GET"}), True),
    "synthesize": ("/v1/synthesize", frozenset({"POST"}), True),
    "synthesize-url": ("/v1/synthesize-url", frozenset({"POST"}), True),
    "twiml-play": ("/v1/twiml/play", frozenset({"POST"}), True),
    "audio-speech": ("/v1/audio/speech", frozenset({"POST"}), True),
    "voice-upload": ("/v1/voices/upload", frozenset({"POST"}), True),
    "voice-detail": ("/v1/voices/no-such-voice", frozenset({"DELETE"}), True),
    "elevenlabs-tts": ("/v1/text-to-speech/joe", frozenset({"POST"}), True),
    "elevenlabs-tts-stream": ("/v1/text-to-speech/joe/stream", frozenset({"POST"}), True),
    "elevenlabs-tts-stream-timestamps": (
        "/v1/text-to-speech/joe/stream/with-timestamps",
        frozenset({"POST"}),
        True,
    ),
}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")
JSON_ROUTES = (
    "/v1/synthesize",
    "/v1/synthesize-url",
    "/v1/twiml/play",
    "/v1/audio/speech",
    "/v1/text-to-speech/joe",
)


def allow_header(methods: frozenset[str]) -> str:
    return ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))


def assert_error(response: httpx.Response, status: int, code: str | set[str] | None = None) -> str:
    """The error shape (ours or OpenAI's: both have error.code), its code, and X-Request-ID."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers.get("X-Request-ID"), response.headers
    if response.request.method == "HEAD":
        return ""
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] in ({code} if isinstance(code, str) else code), error
    return str(error["code"])


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv) -> Iterator[str]:
    with daphne_server(service_env()) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def key(django_db_blocker: Any, test_database_url: str) -> Iterator[str]:
    limits = {
        "max_concurrent_streams": 100,
        "rate_limit_minute": 0,
        "rate_limit_hour": 0,
        "permissions": ["upload"],
    }
    with committed_tenant(django_db_blocker, "contract", **limits) as (_tenant, issued):
        yield issued.plaintext


@pytest.fixture(scope="module")
def client(server: str, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, headers=bearer(key), timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def anonymous(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


def test_the_route_table_names_every_api_route() -> None:
    names = {
        pattern.name
        for pattern in get_resolver().url_patterns
        if isinstance(pattern, URLPattern) and str(pattern.pattern).startswith("v1/")
    }
    assert names - {"bench-bare"} == set(ROUTES)


# --- Methods ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest.mark.timeout(120)
def test_undocumented_methods_are_405_with_allow_on_every_route(client: httpx.Client, name: str) -> None:
    path, documented, _secured = ROUTES[name]
    for method in METHODS:
        if method in documented or (method == "HEAD" and "GET" in documented):
            continue
        response = client.request(method, path)
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["Allow"] == allow_header(documented), (method, path)


@pytest.mark.parametrize(
    "name", sorted(name for name, (_, methods, _s) in ROUTES.items() if "GET" in methods)
)
def test_head_answers_like_get_without_a_body(client: httpx.Client, name: str) -> None:
    path = ROUTES[name][0]
    get, head = client.get(path), client.head(path)
    assert head.status_code == get.status_code
    assert head.content == b""
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert head.headers.get("X-Request-ID")
    if "Content-Length" in get.headers and name not in ("health", "ready"):  # these change by the call
        assert head.headers["Content-Length"] == get.headers["Content-Length"]


@pytest.mark.parametrize("name", sorted(name for name, (_, _m, secured) in ROUTES.items() if secured))
def test_without_a_key_every_method_is_401_first(anonymous: httpx.Client, name: str) -> None:
    path = ROUTES[name][0]
    for method in METHODS:
        response = anonymous.request(method, path)
        assert_error(response, 401, "missing_api_key")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_ready_takes_no_post_put_or_trace(anonymous: httpx.Client) -> None:
    for method in ("POST", "PUT", "TRACE", "OPTIONS"):
        assert_error(anonymous.request(method, "/v1/ready"), 405, "method_not_allowed")


# --- Bodies ----------------------------------------------------------------------------------

MALFORMED_BODIES: list[tuple[str, bytes, str, str]] = [
    ("broken json", b'{"text": "hi"', "application/json", "malformed_json"),
    ("a json array", b'["hi"]', "application/json", "malformed_json"),
    ("a json string", b'"hi"', "application/json", "malformed_json"),
    ("a json number", b"42", "application/json", "malformed_json"),
    ("json null", b"null", "application/json", "malformed_json"),
    ("empty", b"", "application/json", "malformed_json"),
    ("not utf-8", b'{"text": "\xff\xfe"}', "application/json", "malformed_json"),
    ("too deep", b'{"a": ' * 40 + b"1" + b"}" * 40, "application/json", "nesting_too_deep"),
    (
        "wrong field types",
        b'{"text": 5, "input": 5, "model": 5, "voice": 5}',
        "application/json",
        "invalid_request",
    ),
    ("a form", b"text=hi&input=hi", "application/x-www-form-urlencoded", "malformed_json"),
    (
        "multipart",
        b'--b\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n--b--\r\n',
        "multipart/form-data; boundary=b",
        "malformed_json",
    ),
    ("multipart without a boundary", b"text=hi", "multipart/form-data", "malformed_json"),
    ("plain text", b"hello there", "text/plain", "malformed_json"),
]


@pytest.mark.parametrize("path", JSON_ROUTES)
@pytest.mark.parametrize(("label", "body", "content_type", "code"), MALFORMED_BODIES)
def test_malformed_json_bodies_get_their_code(
    client: httpx.Client, path: str, label: str, body: bytes, content_type: str, code: str
) -> None:
    response = client.post(path, content=body, headers={"Content-Type": content_type})
    assert_error(response, 400, code)


UPLOAD_BODIES: list[tuple[str, bytes, str, str]] = [
    ("json", b'{"name": "x", "language": "en"}', "application/json", "invalid_request"),
    ("a form", b"name=x&language=en", "application/x-www-form-urlencoded", "invalid_request"),
    ("empty", b"", "multipart/form-data; boundary=b", "invalid_request"),
    ("multipart without a boundary", b"--b--\r\n", "multipart/form-data", "malformed_request"),
    ("multipart, bad boundary", b"x", "multipart/form-data; boundary=", "malformed_request"),
    (
        "multipart, no file",
        b'--b\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--b--\r\n',
        "multipart/form-data; boundary=b",
        "invalid_request",
    ),
    (
        "multipart, cut short",
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF',
        "multipart/form-data; boundary=b",
        "invalid_request",
    ),
]


@pytest.mark.parametrize(("label", "body", "content_type", "code"), UPLOAD_BODIES)
def test_malformed_upload_bodies_get_their_code(
    client: httpx.Client, label: str, body: bytes, content_type: str, code: str
) -> None:
    response = client.post("/v1/voices/upload", content=body, headers={"Content-Type": content_type})
    assert_error(response, 400, code)


# --- Query strings ---------------------------------------------------------------------------

USAGE_QUERIES = [
    "from=9999-99-99",
    "from=yesterday",
    "from=",
    "to=",
    "to=9999-12-31",
    "from=2026-01-02&to=2026-01-01T12:00:00",
    "from=2026-02-01&to=2026-01-01",
    "from=2024-01-01&to=2026-01-01",
    "to=2026-01-01T00:00:00%2B25:00",
    "from=%00",
    "from=" + "2" * 5000,
    "group_by=bogus",
    "group_by=",
    "group_by=day&group_by=bogus",
]


@pytest.mark.parametrize("query", USAGE_QUERIES)
def test_out_of_range_usage_queries_are_400_invalid_request(client: httpx.Client, query: str) -> None:
    response = client.get(f"/v1/usage?{query}")
    assert_error(response, 400, "invalid_request")
    assert response.json()["error"]["details"]


# --- Signed links ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signed_link(client: httpx.Client) -> tuple[str, str, str]:
    """(name, expires, signature) of a real stored phrase."""
    answer = client.post("/v1/synthesize-url", json={"text": "Contract test.", "format": "aac"})
    assert answer.status_code == 200, answer.text
    url = urlsplit(answer.json()["url"])
    query = parse_qs(url.query)
    return url.path.removeprefix("/v1/audio/"), query["expires"][0], query["signature"][0]


def test_a_signed_link_downloads_and_head_and_etag_work(
    anonymous: httpx.Client, signed_link: tuple[str, str, str]
) -> None:
    name, expires, signature = signed_link
    params = {"expires": expires, "signature": signature}
    get = anonymous.get(f"/v1/audio/{name}", params=params)
    assert get.status_code == 200
    assert get.headers["Content-Type"] == "audio/aac"
    head = anonymous.head(f"/v1/audio/{name}", params=params)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["Content-Length"] == str(len(get.content))
    again = anonymous.get(f"/v1/audio/{name}", params=params, headers={"If-None-Match": get.headers["ETag"]})
    assert again.status_code == 304


def _odd_links(name: str, expires: str, signature: str) -> list[tuple[str, str, str]]:
    """(label, path and query, expected code)."""
    far = "9" * 20
    past = str(int(time.time()) - 60)
    base = f"/v1/audio/{name}"
    return [
        ("no parameters", base, "invalid_signature"),
        ("no signature", f"{base}?expires={expires}", "invalid_signature"),
        ("no expires", f"{base}?signature={signature}", "invalid_signature"),
        ("empty values", f"{base}?expires=&signature=", "invalid_signature"),
        ("non-numeric expires", f"{base}?expires=soon&signature={signature}", "invalid_signature"),
        ("superscript digits", f"{base}?expires=%C2%B2&signature={signature}", "invalid_signature"),
        ("full-width digits", f"{base}?expires=%EF%BC%91&signature={signature}", "invalid_signature"),
        ("negative expires", f"{base}?expires=-1&signature={signature}", "invalid_signature"),
        ("21 digits", f"{base}?expires={far}9&signature={signature}", "invalid_signature"),
        ("bad signature", f"{base}?expires={expires}&signature={signature[:-2]}xx", "invalid_signature"),
        (
            "repeated, last wrong",
            f"{base}?expires={expires}&expires=1&signature={signature}",
            "invalid_signature",
        ),
        (
            "expired",
            f"{base}?expires={past}&signature={local_url_signature(name, int(past))}",
            "link_expired",
        ),
        (
            "traversal",
            "/v1/audio/tenants/%2e%2e/%2e%2e/settings.py?expires=1&signature=x",
            "invalid_signature",
        ),
        ("traversal, signed", _signed(f"{name}/../../x.wav", far), "invalid_signature"),
        ("a NUL", f"/v1/audio/{name}%00?expires={expires}&signature={signature}", "invalid_signature"),
        (
            "signed, missing",
            _signed("tenants/" + "0" * 36 + "/phrases/" + "a" * 64 + ".wav", far),
            "not_found",
        ),
    ]


def _signed(name: str, expires: str) -> str:
    return f"/v1/audio/{name}?expires={expires}&signature={local_url_signature(name, int(expires))}"


def test_signed_links_in_odd_forms_are_refused_in_the_error_shape(
    server: str, signed_link: tuple[str, str, str]
) -> None:
    for label, target, code in _odd_links(*signed_link):
        status = 404 if code == "not_found" else 403
        # A raw target: httpx would resolve the dot segments a traversal attempt needs.
        response = _raw_get(server, target)
        assert response[0] == status, (label, response)
        assert response[1].get("x-request-id"), label
        assert f'"code": "{code}"' in response[2] or f'"code":"{code}"' in response[2], (label, response)


def test_a_link_signed_far_ahead_or_repeated_still_works(
    anonymous: httpx.Client, signed_link: tuple[str, str, str]
) -> None:
    name, expires, signature = signed_link
    far = "9" * 20
    assert anonymous.get(_signed(name, far)).status_code == 200
    # Query parameters repeat as Django reads them: the last one counts.
    assert (
        anonymous.get(f"/v1/audio/{name}?expires=1&expires={expires}&signature={signature}").status_code
        == 200
    )


def _raw_get(server: str, target: str) -> tuple[int, dict[str, str], str]:
    return _raw(server, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())


def _raw(server: str, request: bytes) -> tuple[int, dict[str, str], str]:
    """Send bytes as they are; the status, headers (lower-cased) and body text of the answer."""
    host, port = urlsplit(server).hostname, urlsplit(server).port
    assert host is not None
    assert port is not None
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        field, _, value = line.partition(":")
        headers[field.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split()[1]), headers, body.decode("utf-8", "replace")


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + rest[:size], rest[size + 2 :]
    return out


# --- Requests Twisted cannot parse -----------------------------------------------------------

UNPARSEABLE = [
    ("bad content-length", b"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    (
        "negative content-length",
        b"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        400,
    ),
    (
        "two content-lengths",
        b"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
    ),
    (
        "bad chunk size",
        b"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        400,
    ),
    (
        "unknown transfer-encoding",
        b"POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
    ),
    ("header name with a space", b"GET /v1/health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400),
    ("header without a colon", b"GET /v1/health HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400),
    ("NUL in a header value", b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    ("request line without a target", b"GET\r\nHost: x\r\n\r\n", 400),
    ("unknown HTTP version", b"GET /v1/health HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    ("non-ASCII path", b"GET /v1/\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("non-ASCII query", b"GET /v1/usage?from=\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("binary garbage", b"\x00\x01\x02 garbage\r\n\r\n", 400),
    (
        "a header line over 16 KiB",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        431,
    ),
    (
        "over 500 headers",
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(600))
        + b"\r\n",
        431,
    ),
]


@pytest.mark.parametrize(("label", "request_bytes", "status"), UNPARSEABLE)
def test_requests_twisted_cannot_parse_get_the_error_shape(
    server: str, label: str, request_bytes: bytes, status: int
) -> None:
    code, headers, body = _raw(server, request_bytes)
    assert code == status
    assert headers["content-type"] == "application/json"
    assert headers.get("x-request-id")
    expected = "malformed_request" if status == 400 else "headers_too_large"
    assert f'"code": "{expected}"' in body
    assert f'"request_id": "{headers["x-request-id"]}"' in body
