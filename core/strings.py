"""Strings a client sends that end up in identifiers, enum fields, logs and usage rows.

Postgres refuses NUL in text, UTF-8 cannot carry a lone surrogate (JSON's "\\ud800"), and
other control characters forge log lines. Such characters are refused at the door
(`control_characters_in`) and, as a second line, replaced wherever a string is journaled
(`printable`), so that one bad value can never stop a record from being written.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the UTF-16 surrogates (unencodable on their own).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def control_characters_in(value: str) -> bool:
    return _UNSAFE.search(value) is not None


def printable(value: str, *, limit: int) -> str:
    """`value` cut to `limit` characters, each control character or surrogate as U+FFFD."""
    return _UNSAFE.sub("\ufffd", value[:limit])
