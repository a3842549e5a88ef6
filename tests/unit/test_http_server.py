"""Daphne's own error pages, as our request class draws them: the JSON error shape with a
stable code and X-Request-ID (a crashed application is rare enough that only this reaches it;
the refusals Twisted makes before Daphne are tested through a server, in
tests/e2e/test_api_contract.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.web.http_headers import Headers

from callwaiting_tts.http_server import BoundedRequest


def _error_page(status: int, headers: Headers) -> tuple[dict[str, Any], dict[str, Any]]:
    request = BoundedRequest.__new__(BoundedRequest)  # no connection: only basic_error runs
    request.requestHeaders = headers
    replies: list[dict[str, Any]] = []
    request.handle_reply = replies.append
    request.basic_error(status, b"Whatever", "Exception inside application.")
    start, body = replies
    return start, body


@pytest.mark.parametrize(
    ("status", "code"), [(400, "malformed_request"), (500, "internal_error"), (503, "server_timeout")]
)
def test_daphne_error_pages_are_json_in_the_error_shape(status: int, code: str) -> None:
    start, body = _error_page(status, Headers())
    headers = dict(start["headers"])
    assert start["status"] == status
    assert headers[b"Content-Type"] == b"application/json"
    error = json.loads(body["body"])["error"]
    assert error["code"] == code
    assert error["message"]
    assert headers[b"X-Request-ID"].decode() == error["request_id"]


def test_daphne_error_pages_keep_a_plain_client_request_id_and_replace_an_odd_one() -> None:
    start, _body = _error_page(500, Headers({b"X-Request-ID": [b"call-42"]}))
    assert dict(start["headers"])[b"X-Request-ID"] == b"call-42"
    start, _body = _error_page(500, Headers({b"X-Request-ID": [b"bad id\xff"]}))
    assert dict(start["headers"])[b"X-Request-ID"] != b"bad id\xff"
