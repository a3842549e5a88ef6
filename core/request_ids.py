"""Request ids: every response carries X-Request-ID, every log line and usage row names it."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from django.http import HttpRequest

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is echoed only if it is short and plain, so that it cannot
# inject anything into logs or headers.
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

current_request_id: ContextVar[str] = ContextVar("current_request_id", default="-")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_for(request: HttpRequest) -> str:
    """The id already given to this request, or a fresh one for code outside the middleware."""
    existing = getattr(request, "request_id", None)
    if isinstance(existing, str):
        return existing
    return new_request_id()
