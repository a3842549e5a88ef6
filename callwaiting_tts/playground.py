"""GET /playground: a page to hear the voices, try SSML and formats, and see first-audio time.

The page holds no data and no credential of its own: the visitor pastes a client token
(POST /v1/tokens, minted by their server with their API key), and the page streams over
WS /v1/stream with it, as any web app would (static/callwaiting_tts/client.js). Staff signed
in to the admin may instead pick a tenant here and have a token minted for it server side
(POST /playground, CSRF-checked): from that tenant's newest usable key, for streaming only,
for CLIENT_TOKEN_DEFAULT_SECONDS. The token is shown in that answer only (never cached).

Minting is a power of its own, not of being staff: the user must hold "Can mint client
tokens" (tenants.mint_client_token, granted in the admin) and may mint only for tenants they
may view (tenants.view_tenant); anyone else's POST is a 403 in the JSON error shape, and the
page lists no tenant names to them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.conf import settings
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.shortcuts import render
from django.utils.cache import add_never_cache_headers

from api.errors import error_response
from tenants import tokens
from tenants.models import MINT_CLIENT_TOKEN, VIEW_TENANT, ApiKey, Tenant

SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
FORMATS = (("pcm", "PCM (plays as it arrives)"), ("wav", "WAV"), ("mp3", "MP3"), ("opus", "Opus (Ogg)"))


def _staff_token(tenant_id: str) -> tuple[str | None, str | None, str]:
    """(token, its expiry, an error): a streaming token from the tenant's newest usable key."""
    tenant = Tenant.objects.filter(pk=tenant_id, is_active=True).first() if tenant_id else None
    if tenant is None:
        return None, None, "Pick an active tenant."
    api_key = ApiKey.objects.usable().filter(tenant=tenant).order_by("-created_at").first()
    if api_key is None:
        return None, None, f"{tenant.name} has no usable API key: issue one in the admin first."
    wanted = tokens.TokenRequest(
        ttl_seconds=settings.CLIENT_TOKEN_DEFAULT_SECONDS,
        routes=frozenset({"stream"}),
        voices=None,
        origins=None,
    )
    text, token = tokens.mint(api_key.prefix, wanted)
    expires = datetime.fromtimestamp(token.expires_at, UTC).strftime("%H:%M:%S UTC")
    return text, expires, ""


def may_mint(request: HttpRequest) -> bool:
    """Staff holding the mint permission who may view tenants (has_perm is False for an
    inactive user; a superuser holds every permission)."""
    user = request.user
    return bool(user.is_authenticated and user.is_staff and user.has_perms([MINT_CLIENT_TOKEN, VIEW_TENANT]))


def playground(request: HttpRequest) -> HttpResponseBase:
    is_staff = bool(request.user.is_authenticated and request.user.is_staff)
    can_mint = may_mint(request)
    if request.method == "POST" and not can_mint:
        return error_response(
            request,
            403,
            "permission_denied",
            'Minting a token here needs the permission "Can mint client tokens" and the right to view '
            "tenants; ask an administrator to grant them in the admin.",
        )
    context: dict[str, object] = {
        "is_staff": is_staff,
        "can_mint": can_mint,
        "formats": FORMATS,
        "sample_rates": SAMPLE_RATES,
        "default_sample_rate": 24000,
        "token": "",
        "token_expires": None,
        "token_error": "",
    }
    if can_mint:
        context["tenants"] = list(Tenant.objects.filter(is_active=True).order_by("name").values("id", "name"))
        if request.method == "POST":
            context["chosen_tenant"] = request.POST.get("tenant", "")
            token, expires, error = _staff_token(str(context["chosen_tenant"]))
            context.update(token=token or "", token_expires=expires, token_error=error)
    response = render(request, "callwaiting_tts/playground.html", context)
    add_never_cache_headers(response)  # it may hold a live token
    return response
