"""Pure pieces of #21: the byte-range reading of signed downloads and the origin normalising."""

from __future__ import annotations

import pytest

from synthesis.stored_audio import ByteRange, RangeNotSatisfiable, requested_range
from tenants.tokens import normalise_origin


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", ByteRange(0, 99)),
        ("bytes=0-0", ByteRange(0, 0)),
        ("bytes=990-", ByteRange(990, 999)),
        ("bytes=990-5000", ByteRange(990, 999)),  # past the end: cut to it
        ("bytes=-10", ByteRange(990, 999)),
        ("bytes=-5000", ByteRange(0, 999)),
        ("Bytes = 5-6", ByteRange(5, 6)),
        (None, None),
        ("", None),
        ("bytes=0-1,5-9", None),  # several ranges: the whole
        ("items=0-5", None),
        ("bytes=9-2", None),
        ("bytes=-", None),
        ("bytes=x-1", None),
        ("bytes=²-3", None),
    ],
)
def test_requested_range(header: str | None, expected: ByteRange | None) -> None:
    assert requested_range(header, 1000) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=1000-", 1000), ("bytes=-0", 1000), ("bytes=0-", 0)])
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as raised:
        requested_range(header, size)
    assert raised.value.status_code == 416
    assert raised.value.headers["Content-Range"] == f"bytes */{size}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("https://app.example.com", "https://app.example.com"),
        ("HTTPS://App.Example.COM:443/", "https://app.example.com"),
        ("http://localhost:5173", "http://localhost:5173"),
        ("http://127.0.0.1:80", "http://127.0.0.1"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("null", None),
        ("file:///tmp/x.html", None),
        ("https://app.example.com/path", None),
        ("https://app.example.com?x=1", None),
        ("https://user@app.example.com", None),
        ("https://app.example.com:99999", None),
        ("app.example.com", None),
    ],
)
def test_normalise_origin(raw: str, expected: str | None) -> None:
    assert normalise_origin(raw) == expected
