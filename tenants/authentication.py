"""Bearer API key authentication, for DRF views, plain async views and WebSockets.

Every failure is a 401 with `WWW-Authenticate: Bearer` and a stable code:

    missing_api_key   no Authorization header, or not a Bearer one
    invalid_api_key   malformed, unknown, or wrong secret
    expired_api_key   past its expires_at (e.g. the old key after a rotation)
    revoked_api_key   revoked
    tenant_inactive   the tenant behind the key is deactivated
    invalid_token     a client token (tenants.tokens) that is malformed or not signed by us
    token_expired     a client token past its expiry

Two credentials in one request that differ (e.g. `xi-api-key` of one tenant and
`Authorization` of another) are `400 conflicting_credentials`, on every door: which one
would bill is nobody's guess.

A client token stands for its issuing key: it authenticates as that key's tenant, by the
key's own rule, and is then held to its scope (403, `token_scope`). Every credential used
from a browser must come from an origin the tenant allows (403, `origin_not_allowed`,
tenants.origins).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import parse_qs

import sentry_sdk
from cachetools import LRUCache
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest
from django.utils import timezone
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from core.errors import ServiceError
from tenants import keys, tokens
from tenants.models import ApiKey, Tenant
from tenants.origins import origin_allowed

logger = logging.getLogger(__name__)

# last_used_at is for humans deciding which keys to retire: minute precision
# is plenty, and it keeps a write off most requests.
LAST_USED_RESOLUTION = timedelta(seconds=60)
WWW_AUTHENTICATE_REALM = 'Bearer realm="callwaiting-tts"'


class ApiKeyError(ServiceError, exceptions.AuthenticationFailed):
    def __init__(self, code: str, message: str) -> None:
        challenge = WWW_AUTHENTICATE_REALM
        if code != "missing_api_key":
            challenge += ', error="invalid_token"'
        super().__init__(401, code, message, headers={"WWW-Authenticate": challenge})


@dataclass(frozen=True)
class Principal:
    tenant: Tenant
    api_key: ApiKey
    token: tokens.ClientToken | None = None  # set when a client token, not the key itself, was sent


@dataclass(frozen=True)
class _Credential:
    """A presented key or client token, parsed (no database yet)."""

    prefix: str
    secret: str | None  # None for a client token: its signature was the proof
    claims: tokens.ClientToken | None


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise ApiKeyError("missing_api_key", "Send your API key as 'Authorization: Bearer <key>'.")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiKeyError("missing_api_key", "Send your API key as 'Authorization: Bearer <key>'.")
    return token.strip()


# Every place a credential may come in, whichever door reads which: Bearer, ElevenLabs'
# `xi-api-key`, Cartesia's `X-API-Key`.
CREDENTIAL_HEADERS = ("authorization", "xi-api-key", "x-api-key")
# A credential in a URL is never accepted (URLs end up in logs): a query parameter is one if
# its name reads like a credential's (`token`, `api_key`, `xi-api-key`, `auth`...) or its
# value holds one of ours, whatever the name (`?k=cwt_...`).
_CREDENTIAL_NAME_PARTS = ("token", "key", "auth", "secret", "password")
CREDENTIAL_VALUE_MARKERS = ("cwt_", "cwtc_")


def query_credentials(query: Mapping[str, Sequence[str]]) -> set[str]:
    """The credentials in a parsed query string (empty values are no credential)."""
    return {
        value.strip()
        for name, values in query.items()
        for value in values
        if value.strip()
        and (
            any(part in name.lower() for part in _CREDENTIAL_NAME_PARTS)
            or any(marker in value for marker in CREDENTIAL_VALUE_MARKERS)
        )
    }


def credential_in_query_string(raw: bytes) -> bool:
    """Whether a raw query string (an ASGI scope's) carries a credential."""
    return bool(query_credentials(parse_qs(raw.decode("latin-1"))))


def conflicting_credentials() -> ServiceError:
    return ServiceError(
        400,
        "conflicting_credentials",
        "The request carries more than one credential (headers, query or first message) and they "
        "differ; send exactly one.",
    )


def credential_value(raw: str) -> str:
    """A presented credential's text: a Bearer's token, else the value itself."""
    scheme, _, rest = raw.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" and rest.strip() else raw.strip()


def credentials_presented(
    headers: Mapping[str, str], query: Mapping[str, list[str]]
) -> tuple[set[str], bool]:
    """The distinct credentials in a request's headers (lower-case names) and query, and
    whether any came in the query."""
    found = {credential_value(headers[name]) for name in CREDENTIAL_HEADERS if headers.get(name, "").strip()}
    in_query = query_credentials(query)
    return found | in_query, bool(in_query)


def require_one_credential(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> None:
    """400 conflicting_credentials when a request carries two credentials that differ; 400
    api_key_in_url for a credential in the query, alone or beside a header (never ignored)."""
    found, in_query = credentials_presented(headers, query)
    if len(found) > 1:
        raise conflicting_credentials()
    if in_query:
        raise ServiceError(
            400,
            "api_key_in_url",
            "Never put the API key in the URL (URLs end up in logs): send it in a header.",
        )


def _http_credentials_checked(request: HttpRequest) -> None:
    headers = {name: request.headers.get(name, "") for name in CREDENTIAL_HEADERS}
    require_one_credential(headers, {name: request.GET.getlist(name) for name in request.GET})


def _parse(token: str) -> _Credential:
    if tokens.is_client_token(token):
        try:
            claims = tokens.read(token)
        except tokens.TokenRejected as exc:
            raise ApiKeyError(exc.code, exc.message) from None
        return _Credential(prefix=claims.key_prefix, secret=None, claims=claims)
    parsed = keys.parse_key(token)
    if parsed is None:
        raise ApiKeyError("invalid_api_key", "The API key is not valid.")
    return _Credential(prefix=parsed.prefix, secret=parsed.secret, claims=None)


def _verify(api_key: ApiKey | None, credential: _Credential) -> Principal:
    if api_key is None:
        raise ApiKeyError("invalid_api_key", "The API key is not valid.")
    if credential.secret is not None and not keys.secret_matches(credential.secret, api_key.secret_hash):
        raise ApiKeyError("invalid_api_key", "The API key is not valid.")
    if (refusal := api_key.refusal()) is not None:
        raise ApiKeyError(refusal.code, refusal.message)
    return Principal(tenant=api_key.tenant, api_key=api_key, token=credential.claims)


def _last_used_is_stale(api_key: ApiKey) -> bool:
    return api_key.last_used_at is None or timezone.now() - api_key.last_used_at >= LAST_USED_RESOLUTION


class _PrincipalCache:
    """Recently verified keys, for API_KEY_CACHE_SECONDS: a database lookup costs
    a thread hop and a query (2-3 ms) on every request otherwise. The price is
    that a revocation or deactivation reaches a process within that many seconds.
    Expiry is still checked on every use.

    Entries past their time stay (up to max_entries) for one use only: while
    the database is unreachable, a key verified before the outage keeps working
    (no revocation could be read anyway), so a short outage does not silence
    every call in progress."""

    def __init__(self, max_entries: int = 10_000) -> None:
        # Each entry keeps its own deadline: a stale one still serves database outages.
        self._entries: LRUCache[str, tuple[float, Principal]] = LRUCache(maxsize=max_entries)
        self._lock = threading.Lock()

    @staticmethod
    def _slot(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def get(self, token: str) -> Principal | None:
        ttl = settings.API_KEY_CACHE_SECONDS
        if ttl <= 0:
            return None
        slot = self._slot(token)
        with self._lock:
            entry = self._entries.get(slot)
        if entry is None or entry[0] < time.monotonic():
            return None
        return _unexpired(entry[1])

    def get_stale(self, token: str) -> Principal | None:
        """The last verification of this key, however old (for database outages)."""
        with self._lock:
            entry = self._entries.get(self._slot(token))
        return None if entry is None else _unexpired(entry[1])

    def put(self, token: str, principal: Principal) -> None:
        ttl = settings.API_KEY_CACHE_SECONDS
        if ttl <= 0:
            return
        with self._lock:
            self._entries[self._slot(token)] = (time.monotonic() + ttl, principal)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _unexpired(principal: Principal) -> Principal:
    if principal.api_key.is_expired():
        raise ApiKeyError("expired_api_key", "This API key has expired; use the tenant's current key.")
    if principal.token is not None and principal.token.is_expired():
        raise ApiKeyError("token_expired", "This client token has expired; ask your server for a new one.")
    return principal


principal_cache = _PrincipalCache()


def _database_unavailable(token: str, exc: DatabaseError) -> Principal:
    if stale := principal_cache.get_stale(token):
        logger.warning("Database unavailable; trusting an earlier verification of key %s.", stale.api_key)
        return stale
    raise ServiceError(
        503,
        "database_unavailable",
        "The service cannot verify API keys right now; retry shortly.",
        headers={"Retry-After": "5"},
    ) from exc


def authenticate_token(token: str) -> Principal:
    if cached := principal_cache.get(token):
        return cached
    credential = _parse(token)
    try:
        api_key = ApiKey.objects.select_related("tenant").filter(prefix=credential.prefix).first()
        principal = _verify(api_key, credential)
        if _last_used_is_stale(principal.api_key):
            ApiKey.objects.filter(pk=principal.api_key.pk).update(last_used_at=timezone.now())
    except DatabaseError as exc:
        return _database_unavailable(token, exc)
    principal_cache.put(token, principal)
    return principal


async def aauthenticate_token(token: str) -> Principal:
    if cached := principal_cache.get(token):
        return cached
    credential = _parse(token)
    try:
        api_key = await ApiKey.objects.select_related("tenant").filter(prefix=credential.prefix).afirst()
        principal = _verify(api_key, credential)
        if _last_used_is_stale(principal.api_key):
            await ApiKey.objects.filter(pk=principal.api_key.pk).aupdate(last_used_at=timezone.now())
    except DatabaseError as exc:
        return _database_unavailable(token, exc)
    principal_cache.put(token, principal)
    return principal


def token_scope_error(message: str) -> ServiceError:
    return ServiceError(403, "token_scope", message)


def principal_authorize(principal: Principal, *, route: str | None, origin: str | None) -> None:
    """May this principal call `route` from this browser origin? 403 if not.

    `origin` is the request's Origin header (None from a server-side client; the service's
    own PUBLIC_BASE_URL is always allowed)."""
    token = principal.token
    if token is not None and not token.allows_route(route):
        raise token_scope_error(
            f"This client token may call only {', '.join(sorted(token.routes))}; not {route or 'this route'}."
        )
    if not origin_allowed(principal.tenant, token, origin):
        raise ServiceError(
            403,
            "origin_not_allowed",
            f"Requests from {origin} are not allowed for this tenant; add the origin to its allowed origins.",
        )


def principal_require_voice(principal: Principal, voice_id: str | None) -> None:
    """A client token scoped to voices speaks only with those (and must name one)."""
    token = principal.token
    if token is not None and not token.allows_voice(voice_id):
        assert token.voices is not None
        raise token_scope_error(
            f"This client token may use only the voices {', '.join(sorted(token.voices))}; "
            f"not {voice_id or 'the default voice'}."
        )


def _authorize_http(request: HttpRequest, principal: Principal) -> None:
    match = request.resolver_match
    principal_authorize(
        principal,
        route=match.url_name if match is not None else None,
        origin=request.headers.get("Origin"),
    )


async def aauthenticate_request(request: HttpRequest) -> Principal:
    """For plain async views; attaches the tenant to the request like the DRF class does."""
    _http_credentials_checked(request)
    principal = await aauthenticate_token(bearer_token(request.headers.get("Authorization")))
    request.tenant = principal.tenant  # type: ignore[attr-defined]
    request.principal = principal  # type: ignore[attr-defined]
    sentry_sdk.set_tag("tenant_id", str(principal.tenant.id))
    _authorize_http(request, principal)
    return principal


def request_tenant(request: Request) -> Tenant:
    """The tenant that authenticated this DRF request."""
    tenant = request.user
    if not isinstance(tenant, Tenant):
        raise ApiKeyError("missing_api_key", "Send your API key as 'Authorization: Bearer <key>'.")
    return tenant


class ApiKeyAuthentication(BaseAuthentication):
    """DRF authentication: `request.user` is the Tenant, `request.auth` the ApiKey."""

    def authenticate(self, request: Request) -> tuple[Tenant, ApiKey]:
        _http_credentials_checked(request._request)
        principal = authenticate_token(bearer_token(request.headers.get("Authorization")))
        request._request.tenant = principal.tenant  # type: ignore[attr-defined]
        request._request.principal = principal  # type: ignore[attr-defined]
        sentry_sdk.set_tag("tenant_id", str(principal.tenant.id))
        _authorize_http(request._request, principal)
        return principal.tenant, principal.api_key

    def authenticate_header(self, request: Request) -> str:
        return WWW_AUTHENTICATE_REALM
