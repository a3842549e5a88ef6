"""Short-lived client tokens: what a tenant's backend hands a browser instead of its API key.

`POST /v1/tokens` (with the tenant's API key) mints `cwtc_<payload>:<signature>`: Django's
signing (HMAC-SHA256 under SECRET_KEY, its own salt) over a small JSON payload that names
the issuing key by its prefix, the expiry (a Unix time, at most CLIENT_TOKEN_MAX_SECONDS
ahead) and the scope: the routes it may call, optionally the voices it may speak with and
the browser origins it may be used from.

Stateless, not stored, because:

- minting is on the path of every page a tenant serves to its visitors: a signature costs
  microseconds and no database write, and there is no table of dead tokens to sweep;
- the token dies with its key anyway: every use loads the issuing key (through the same
  short principal cache as a key) and applies the key's own rule (`ApiKey.refusal`), so
  revoking the key, its expiry or the tenant's deactivation stop its tokens too, and an
  open WebSocket opened with one is closed by the existing live access re-check;
- the price is that one token cannot be revoked alone: its lifetime is short (minutes)
  for that reason, and a leaked token is stopped by rotating the key.

A token is checked where it is used (tenants.authentication): the signature before any
database lookup (a forged token costs nothing), then the expiry, then the key. Its scope
is checked per request: the route (URL name; never `tokens`, so a token cannot mint
tokens), the voice, and the browser `Origin`. An open WebSocket is authorised once, at its
`auth`: like OpenAI's ephemeral keys, it outlives its token's expiry (a call does not drop
at minute five) but not its key.

The payload is signed, not encrypted: it holds nothing secret (a key prefix, which the
admin and logs show anyway, and the scope its holder asked for). Logs never carry a token:
only its id (`jti`) may be named.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core import signing

TOKEN_NAMESPACE = "cwtc"  # noqa: S105  (a name, not a secret)
TOKEN_PREFIX = f"{TOKEN_NAMESPACE}_"
_SALT = "tenants.client-token.v1"

# The routes a token may be scoped to (URL names; `stream` is WS /v1/stream): speaking and
# listing voices. Minting tokens, uploading or deleting voices, usage and the tenant's own
# details stay with the API key.
TOKEN_ROUTES = frozenset({"stream", "synthesize", "synthesize-url", "audio-speech", "voice-list"})
DEFAULT_ROUTES = ("stream",)
MAX_SCOPE_ENTRIES = 50


class TokenRejected(Exception):
    """A presented token that is not good: a stable code and a sentence."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ScopeInvalid(ValueError):
    """A mint request's scope that cannot be granted; the message says why."""


@dataclass(frozen=True)
class ClientToken:
    key_prefix: str
    token_id: str  # the `jti`: names a token in logs and the usage it leads to
    expires_at: int  # Unix seconds
    routes: frozenset[str]
    voices: frozenset[str] | None  # None: any voice the tenant may use
    origins: frozenset[str] | None  # None: any of the tenant's allowed origins

    def is_expired(self, now: float | None = None) -> bool:
        return self.expires_at <= (time.time() if now is None else now)

    def allows_route(self, route: str | None) -> bool:
        return route is not None and route in self.routes

    def allows_voice(self, voice_id: str | None) -> bool:
        return self.voices is None or (voice_id is not None and voice_id in self.voices)


def normalise_origin(raw: str) -> str | None:
    """`scheme://host[:port]` in lower case, or None when `raw` is not a browser origin."""
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return None
    if parts.path not in {"", "/"} or parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = parts.hostname.lower()
    if ":" in host:  # IPv6
        host = f"[{host}]"
    default_port = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default_port else "")


def _string_set(value: Any, field: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ScopeInvalid(f"`{field}` must be a list of non-empty strings.")
    if len(value) > MAX_SCOPE_ENTRIES:
        raise ScopeInvalid(f"`{field}` holds at most {MAX_SCOPE_ENTRIES} entries.")
    return frozenset(value)


@dataclass(frozen=True)
class TokenRequest:
    """What a mint asks for, checked: lifetime and scope."""

    ttl_seconds: int
    routes: frozenset[str]
    voices: frozenset[str] | None
    origins: frozenset[str] | None

    @classmethod
    def from_body(cls, body: dict[str, Any], tenant_origins: Iterable[str]) -> TokenRequest:
        maximum = settings.CLIENT_TOKEN_MAX_SECONDS
        ttl = body.get("expires_in", settings.CLIENT_TOKEN_DEFAULT_SECONDS)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= maximum:
            raise ScopeInvalid(f"`expires_in` must be a whole number of seconds from 1 to {maximum}.")
        routes = _string_set(body.get("routes", list(DEFAULT_ROUTES)), "routes") or frozenset()
        if not routes:
            raise ScopeInvalid("`routes` must name at least one route.")
        if unknown := routes - TOKEN_ROUTES:
            raise ScopeInvalid(
                f"`routes` may hold only {', '.join(sorted(TOKEN_ROUTES))}; not {', '.join(sorted(unknown))}."
            )
        voices = _string_set(body.get("voices"), "voices")
        origins = _string_set(body.get("origins"), "origins")
        if origins is not None:
            normalised = {normalise_origin(origin) for origin in origins}
            if None in normalised:
                raise ScopeInvalid("`origins` must be browser origins such as https://app.example.com.")
            origins = frozenset(origin for origin in normalised if origin is not None)
            if outside := origins - set(tenant_origins):
                raise ScopeInvalid(
                    f"`origins` must be among the tenant's allowed origins; not {', '.join(sorted(outside))}."
                )
        return cls(ttl_seconds=ttl, routes=routes, voices=voices, origins=origins)


def mint(key_prefix: str, wanted: TokenRequest, now: float | None = None) -> tuple[str, ClientToken]:
    """The token's text (shown once, to the caller) and what it carries."""
    issued = int(time.time() if now is None else now)
    token = ClientToken(
        key_prefix=key_prefix,
        token_id=secrets.token_hex(8),
        expires_at=issued + wanted.ttl_seconds,
        routes=wanted.routes,
        voices=wanted.voices,
        origins=wanted.origins,
    )
    payload: dict[str, Any] = {
        "k": token.key_prefix,
        "j": token.token_id,
        "e": token.expires_at,
        "r": sorted(token.routes),
    }
    if token.voices is not None:
        payload["v"] = sorted(token.voices)
    if token.origins is not None:
        payload["o"] = sorted(token.origins)
    return TOKEN_PREFIX + signing.dumps(payload, salt=_SALT, compress=True), token


def is_client_token(raw: str) -> bool:
    return raw.startswith(TOKEN_PREFIX)


def read(raw: str, now: float | None = None) -> ClientToken:
    """The token's claims once its signature and expiry hold; TokenRejected otherwise."""
    try:
        payload = signing.loads(raw.removeprefix(TOKEN_PREFIX), salt=_SALT)
        token = ClientToken(
            key_prefix=str(payload["k"]),
            token_id=str(payload["j"]),
            expires_at=int(payload["e"]),
            routes=frozenset(payload["r"]),
            voices=frozenset(payload["v"]) if "v" in payload else None,
            origins=frozenset(payload["o"]) if "o" in payload else None,
        )
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        raise TokenRejected("invalid_token", "The client token is not valid.") from None
    if token.is_expired(now):
        raise TokenRejected("token_expired", "This client token has expired; ask your server for a new one.")
    return token
