from __future__ import annotations

import io
import json
from typing import Any

import pytest
from rest_framework.exceptions import ParseError

from api.parsers import BoundedJSONParser
from core.bounded_json import bounded_json_loads
from core.errors import ServiceError


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "document",
    [
        '{"text": "Hi.", "voice": {"id": "joe"}}',
        '{"text": "[[[[{{{{ brackets inside a string are text ]]]]"}',
        nested(32),
        json.dumps({"a": [[{"b": [1, 2, {"c": []}]}]]}),
    ],
)
def test_documents_within_the_limit_parse_as_json_loads_does(document: str) -> None:
    for data in (document, document.encode()):
        assert bounded_json_loads(data, max_depth=32) == json.loads(document)


@pytest.mark.parametrize(
    "document",
    [
        nested(33),  # just over: parses, then the walk refuses it
        nested(900),  # deep, still under the parser's recursion limit
        nested(100_000),  # the parser itself gives up
        '{"a":' * 50_000,  # unclosed as well as deep
        json.dumps({"ok": 1, "deep": json.loads(nested(40))}),
    ],
)
def test_documents_nested_deeper_than_the_limit_are_a_400_with_their_code(document: str) -> None:
    for data in (document, document.encode()):
        with pytest.raises(ServiceError) as raised:
            bounded_json_loads(data, max_depth=32)
        assert (raised.value.status_code, raised.value.code) == (400, "nesting_too_deep")


@pytest.mark.parametrize("data", [b"{", b"[1,]", b"\xff\xfe", b"{" * 3 + b"}"])
def test_invalid_json_raises_value_error_as_json_loads_does(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  (json.loads' own errors)
        bounded_json_loads(data, max_depth=32)


def test_drf_routes_parse_bodies_with_the_same_limit(settings: Any) -> None:
    settings.JSON_MAX_DEPTH = 4
    parser = BoundedJSONParser()
    assert parser.parse(io.BytesIO(b'{"a": [[1]]}')) == {"a": [[1]]}
    with pytest.raises(ServiceError) as raised:
        parser.parse(io.BytesIO(nested(100_000).encode()))
    assert raised.value.code == "nesting_too_deep"
    with pytest.raises(ParseError):
        parser.parse(io.BytesIO(b'{"a": NaN}'))
