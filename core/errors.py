"""Errors with stable codes, raised anywhere: text, audio, limits, storage, engines' callers.

`code` is part of the API contract: clients branch on it, so codes are never renamed.
`status_code` is the HTTP status the edge answers with, and the status a usage row
records for a WebSocket utterance. Nothing here knows about HTTP frameworks: api.errors
draws these in the JSON error shape, the WebSocket consumer as `error` events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import DatabaseError, DataError


class ServiceError(Exception):
    """A refusal or failure a client can act on: its status, its stable code, a sentence."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = details


def database_unavailable() -> ServiceError:
    return ServiceError(
        503,
        "database_unavailable",
        "The database is briefly unavailable; retry shortly.",
        headers={"Retry-After": "5"},
    )


def usage_unavailable() -> ServiceError:
    """Synthesis refused before any audio is made: its usage could not be recorded (the
    usage journal cannot be written: disk full, read-only, permission)."""
    return ServiceError(
        503,
        "usage_unavailable",
        "Usage cannot be recorded right now, so no audio is made; retry shortly.",
        headers={"Retry-After": "5"},
    )


def database_error(exc: DatabaseError) -> ServiceError:
    """The error for a database exception: a value the database refuses to store (a NUL
    byte, a lone surrogate, a number out of range) is the client's 400, never an outage;
    anything else (connection lost, timeout) is the 503 to retry."""
    if isinstance(exc, DataError):
        return ServiceError(
            400,
            "invalid_request",
            "A value in the request cannot be stored (control characters or out of range).",
        )
    return database_unavailable()
