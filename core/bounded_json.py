"""JSON from clients, with a limit on how deeply it nests: one parse for every door
(HTTP bodies, DRF's parser, WebSocket messages).

Our messages nest two levels at most; a body of 100,000 nested arrays is only 200 KB,
and Python's parser gives up on it with a RecursionError (caught nowhere, a 500), while
a shallower one that parses could still exhaust the stack of whatever walks it later.

The check costs almost nothing on the hot path: a document cannot nest deeper than it
has opening brackets, and counting them is a C loop (bytes.count). Only a document with
more brackets than the limit (quoted ones included, so the count errs on the side of
checking) is walked, without recursion, after parsing. Measured on a 1 KB synthesis
body, 2 shared cores: json.loads about 4 to 6 us; the count about 0.3 to 1 us; the walk
about 0.5 to 1.5 us; scanning the raw bytes for brackets outside strings with a regex
about 38 us, so no scan.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from core.errors import ServiceError

NESTING_TOO_DEEP = "nesting_too_deep"


def nesting_too_deep(max_depth: int) -> ServiceError:
    return ServiceError(
        400,
        NESTING_TOO_DEEP,
        f"The JSON nests arrays and objects more than {max_depth} deep.",
        details={"limit": max_depth},
    )


def bounded_json_loads(
    data: bytes | str, *, max_depth: int, parse_constant: Callable[[str], Any] | None = None
) -> Any:
    """`json.loads`, refusing (400 nesting_too_deep) a document nested more than
    `max_depth` arrays or objects deep. Invalid JSON raises ValueError as json.loads does
    (UnicodeDecodeError, for bytes that are not UTF-8, is one)."""
    opening = (
        data.count(b"[") + data.count(b"{") if isinstance(data, bytes) else data.count("[") + data.count("{")
    )
    if opening <= max_depth:
        return json.loads(data, parse_constant=parse_constant)
    try:
        value = json.loads(data, parse_constant=parse_constant)
    except RecursionError:
        raise nesting_too_deep(max_depth) from None
    if _nests_deeper_than(value, max_depth):
        raise nesting_too_deep(max_depth)
    return value


def _nests_deeper_than(value: Any, max_depth: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        if depth > max_depth:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
