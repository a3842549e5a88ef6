"""DRF's JSON parser with the nesting limit every other door has (core.bounded_json)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import IO, Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser
from rest_framework.utils import json as drf_json

from core.bounded_json import bounded_json_loads


class BoundedJSONParser(JSONParser):
    """As JSONParser, but a body nested deeper than JSON_MAX_DEPTH is `400 nesting_too_deep`
    (a ServiceError, which api.errors draws in the error shape) instead of a RecursionError."""

    def parse(
        self,
        stream: IO[bytes],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
        try:
            text = stream.read().decode(encoding)
            return bounded_json_loads(
                text,
                max_depth=settings.JSON_MAX_DEPTH,
                parse_constant=drf_json.strict_constant if self.strict else None,
            )
        except ValueError as exc:  # UnicodeDecodeError is one
            raise ParseError(f"JSON parse error - {exc}") from None
