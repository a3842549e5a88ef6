"""Log formatting: plain lines for people, or JSON lines (LOG_FORMAT=json) for log pipelines.

Every record carries the request id (RequestIdLogFilter). Request logs add
counts and ids as `extra` fields; no log line carries a tenant's text, and none
carries a secret from a URL (SecretRedactingFilter): a signed audio link's
signature, or a key a client put in a query string, is written as REDACTED. Our own
credentials are also redacted by their value, wherever they appear (a parameter of any
name, `?k=`, a path segment, a message): an API key keeps its public prefix
(`cwt_k3j9x0aa_REDACTED`), a client token becomes `cwtc_REDACTED`.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from core.request_ids import current_request_id

# What every LogRecord has; anything else on a record came in through `extra`.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


# A query parameter whose name says it holds a secret: a signed link's `signature`
# (ours) or `X-Amz-Signature`/`X-Amz-Credential`/`X-Amz-Security-Token` (S3's),
# and `key`, `api_key`, `xi-api-key`, `token`, `access_token`, `sig`, ... Broad on
# purpose: blanking a harmless parameter costs nothing.
_SECRET_QUERY_PARAMETER = re.compile(
    r"(?P<name>[?&;][\w.%-]*(?:key|token|sig|secret|passw|credential|auth)[\w.%-]*=)[^&;#\s\"'<>\\]*",
    re.IGNORECASE,
)
REDACTED = "REDACTED"
# Our key (`cwt_<prefix>_<secret>`) and client token (`cwtc_<payload>:<signature>`) formats,
# raw or percent-encoded (`%5F` for `_`), with whatever URL-safe characters follow.
_CREDENTIAL_VALUE = re.compile(r"cwt(?P<token>c?)(?:_|%5[Ff])(?P<rest>[A-Za-z0-9_.:%\-]*)")
# Our own metric names (`cwt_usage_records_lost_total`) are words in lower case; a key's
# secret (token_urlsafe) never is.
_METRIC_NAME = re.compile(r"[a-z]+(?:_[a-z]+)*")
_KEY_PARTS = re.compile(r"(?P<prefix>[a-z0-9]{8})(?:_|%5[Ff])(?P<secret>.*)", re.DOTALL)


def _redact_credential(match: re.Match[str]) -> str:
    rest = match["rest"]
    if not match["token"] and _METRIC_NAME.fullmatch(rest):
        return match[0]
    if match["token"]:
        return f"cwtc_{REDACTED}"
    if parts := _KEY_PARTS.fullmatch(rest):
        # The prefix is public (the admin shows it): it names the key; only the secret goes.
        return f"cwt_{parts['prefix']}_" + (REDACTED if parts["secret"] else "")
    return f"cwt_{REDACTED}" if rest else match[0]


def redact_secrets(text: str) -> str:
    """`text` with the value of every secret-bearing query parameter in it replaced, and
    every key or client token of ours, wherever it is."""
    if "cwt" in text:
        text = _CREDENTIAL_VALUE.sub(_redact_credential, text)
    return _SECRET_QUERY_PARAMETER.sub(rf"\g<name>{REDACTED}", text)


class SecretRedactingFilter(logging.Filter):
    """On the root handlers: every line, whoever logs it (Django, Daphne, ours), is redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_secrets(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        for key, value in list(record.__dict__.items()):
            if key in _STANDARD_ATTRIBUTES or value is None or isinstance(value, bool | int | float):
                continue
            if isinstance(value, dict | list | tuple):
                # Redaction never touches a quote, so the JSON stays JSON.
                value = json.loads(redact_secrets(json.dumps(value, default=str)))
            else:
                # An object in `extra` (Django's log_response passes the request) is
                # written as its str(), query string and all: redact that instead.
                value = redact_secrets(str(value))
            setattr(record, key, value)
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text, so a traceback is written as redacted here.
            record.exc_text = redact_secrets(logging.Formatter().formatException(record.exc_info))
        return True


class RequestIdLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # A record may name its own request (a WebSocket utterance's); else the current one.
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
