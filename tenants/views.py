from datetime import UTC, datetime
from typing import Any

from drf_spectacular.utils import OpenApiExample, extend_schema
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from core.errors import ServiceError
from tenants import tokens
from tenants.authentication import request_tenant
from tenants.models import ApiKey
from tenants.serializers import (
    ClientTokenInputSerializer,
    ClientTokenOutputSerializer,
    TenantOutputSerializer,
)


@extend_schema(responses=TenantOutputSerializer, summary="The calling tenant and its limits")
@api_view(["GET"])
def tenant_detail(request: Request) -> Response:
    serializer = TenantOutputSerializer(request_tenant(request), context={"api_key": request.auth})
    return Response(serializer.data)


@extend_schema(
    request=ClientTokenInputSerializer,
    responses={201: ClientTokenOutputSerializer},
    summary="Mint a short-lived client token for a browser",
    description="With the tenant's API key (a client token cannot mint tokens). The token stands for "
    "that key until it expires: same limits, quota and usage, and it stops when the key is revoked. "
    "Send it as `Authorization: Bearer <token>` or in the WebSocket's first `auth` message.",
    examples=[
        OpenApiExample(
            "Stream only, 5 minutes, one voice, from one site",
            value={
                "expires_in": 300,
                "routes": ["stream"],
                "voices": ["joe"],
                "origins": ["https://app.example.com"],
            },
            request_only=True,
        )
    ],
)
@api_view(["POST"])
def token_mint(request: Request) -> Response:
    tenant = request_tenant(request)
    # A token presented here is refused before (its routes never include this one).
    body: Any = request.data  # {} for an empty body
    if not isinstance(body, dict):
        raise ServiceError(400, "invalid_request", "The request body must be a JSON object.")
    try:
        wanted = tokens.TokenRequest.from_body(body, tenant.allowed_origins)
    except tokens.ScopeInvalid as exc:
        raise ServiceError(400, "invalid_request", str(exc)) from None
    api_key = request.auth
    assert isinstance(api_key, ApiKey)  # ApiKeyAuthentication's
    text, token = tokens.mint(api_key.prefix, wanted)
    answer = {
        "token": text,
        "token_id": token.token_id,
        "expires_at": datetime.fromtimestamp(token.expires_at, UTC).isoformat().replace("+00:00", "Z"),
        "expires_in": wanted.ttl_seconds,
        "routes": sorted(token.routes),
        "voices": None if token.voices is None else sorted(token.voices),
        "origins": None if token.origins is None else sorted(token.origins),
    }
    response = Response(answer, status=201)
    response["Cache-Control"] = "no-store"  # a live credential: no cache keeps a copy
    return response
