"""Sentry error reporting (SENTRY_DSN): Django and Channels context, tenant and
request ids as tags (set where they become known: callwaiting_tts.middleware and
tenants.authentication), and nothing of what tenants say.

Events can carry request bodies, local variables of every frame, log messages
and breadcrumbs; any of them may hold the text being spoken. `scrub_event` keeps
the stack trace and the ids and drops the rest.
"""

from __future__ import annotations

from typing import Any

import sentry_sdk
from sentry_sdk.integrations.asyncio import AsyncioIntegration
from sentry_sdk.integrations.django import DjangoIntegration
from sentry_sdk.integrations.logging import LoggingIntegration

_KEPT_REQUEST_FIELDS = ("method", "url")
_KEPT_HEADERS = frozenset({"user-agent", "content-type", "content-length", "x-request-id"})


def scrub_event(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """before_send: remove request bodies, query strings, cookies, credentials,
    frame locals and breadcrumb payloads."""
    request = event.get("request")
    if isinstance(request, dict):
        headers = request.get("headers") or {}
        kept = {name: value for name, value in headers.items() if name.lower() in _KEPT_HEADERS}
        event["request"] = {field: request[field] for field in _KEPT_REQUEST_FIELDS if field in request}
        if kept:
            event["request"]["headers"] = kept
    for exception in (event.get("exception") or {}).get("values") or []:
        # An exception's message can quote its input (e.g. a parse error on the text).
        if isinstance(exception, dict):
            for frame in (exception.get("stacktrace") or {}).get("frames") or []:
                frame.pop("vars", None)
    for thread in (event.get("threads") or {}).get("values") or []:
        for frame in (thread.get("stacktrace") or {}).get("frames") or []:
            frame.pop("vars", None)
    event.pop("extra", None)
    breadcrumbs = event.get("breadcrumbs")
    values = breadcrumbs.get("values") if isinstance(breadcrumbs, dict) else breadcrumbs
    for crumb in values or []:
        if isinstance(crumb, dict):
            crumb.pop("data", None)
    return event


def sentry_init(dsn: str, *, release: str, traces_sample_rate: float, environment: str | None) -> None:
    sentry_sdk.init(
        dsn=dsn,
        release=release,
        environment=environment,
        traces_sample_rate=traces_sample_rate,
        send_default_pii=False,
        include_local_variables=False,
        max_request_body_size="never",
        before_send=scrub_event,  # type: ignore[arg-type]
        before_send_transaction=scrub_event,  # type: ignore[arg-type]
        integrations=[
            DjangoIntegration(),
            AsyncioIntegration(),  # Channels consumers and the engine's tasks
            LoggingIntegration(),
        ],
    )
