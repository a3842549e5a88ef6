"""The OpenAPI document's last step (a drf-spectacular postprocessing hook): the routes it
cannot inspect, and the answers every route can give whatever its view.

drf-spectacular describes the DRF views from their serializers (health, tenant, usage,
voices). The async views are described in synthesis.schema; /v1/ready here. Then every
operation gets the refusals that come from outside its view: 405 (with `Allow`), a
request Twisted cannot parse (400 malformed_request, 431), a Host not served (400
invalid_host), a body over the limit (413
body_too_large), a database outage (503 database_unavailable), and for the routes that
need a key, 401 (with `WWW-Authenticate`) and 429 (with `Retry-After` and the
`X-RateLimit-*` headers). Each in the route's own error shape.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.views import SpectacularJSONAPIView, SpectacularSwaggerView
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from synthesis.schema import (
    ERROR_SCHEMA,
    OPENAI_ERROR_SCHEMA,
    add_synthesis_paths,
    error_response,
    openai_error_response,
)

_INT_HEADER = {"schema": {"type": "integer"}}
RATE_HEADERS = {
    "X-RateLimit-Limit": {**_INT_HEADER, "description": "Requests allowed in the tightest window."},
    "X-RateLimit-Remaining": {**_INT_HEADER, "description": "Requests left in it."},
    "X-RateLimit-Reset": {**_INT_HEADER, "description": "Seconds until it refills."},
    "X-RateLimit-Policy": {"schema": {"type": "string"}, "description": "`<limit>;w=<window seconds>`"},
}
_RETRY_AFTER = {"Retry-After": {**_INT_HEADER, "description": "Seconds to wait before retrying."}}

_READY_CHECK = {
    "type": "object",
    "required": ["ok"],
    "properties": {"ok": {"type": "boolean"}, "ms": {"type": "number"}, "error": {"type": "string"}},
}
_READY_BODY = {
    "type": "object",
    "required": ["status", "failed", "degraded", "checks"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "degraded", "unavailable"]},
        "failed": {"type": "array", "items": {"type": "string"}},
        "degraded": {"type": "array", "items": {"type": "string"}},
        "checks": {"type": "object", "additionalProperties": _READY_CHECK},
    },
}
READY_OPERATION: dict[str, Any] = {
    "operationId": "ready",
    "summary": "Readiness: may this process take traffic? (503 names what fails)",
    "tags": ["operations"],
    "security": [],
    "responses": {
        "200": {
            "description": "Ready (or degraded).",
            "content": {"application/json": {"schema": _READY_BODY}},
        },
        "503": {"description": "Not ready.", "content": {"application/json": {"schema": _READY_BODY}}},
    },
}


def _common_responses(method: str, operation: dict[str, Any], openai: bool) -> dict[str, Any]:
    shape = openai_error_response if openai else error_response
    allow = {"Allow": {"schema": {"type": "string"}, "description": "The documented methods."}}
    responses: dict[str, Any] = {
        "400": shape(
            "malformed_request: the request line, headers or body framing do not parse; "
            "invalid_host: a Host not in ALLOWED_HOSTS"
        ),
        "405": {**shape("method_not_allowed"), "headers": allow},
        "431": shape("headers_too_large: too many or too long request headers"),
    }
    if method in ("post", "put", "patch"):
        responses["413"] = shape("body_too_large")
    # drf-spectacular leaves `security` off a public operation; ours say [] for none.
    secured = bool(operation.get("security"))
    if secured:
        responses["401"] = {
            **shape("missing_api_key, invalid_api_key, invalid_token, token_expired"),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        }
        responses["400"] = shape(
            responses["400"]["description"] + "; conflicting_credentials: two credentials that differ "
            "(Authorization, xi-api-key, X-API-Key, a key in the query); api_key_in_url: a key or token in "
            "the query"
        )
        # A client token outside its scope, or a browser origin the tenant does not allow.
        responses["403"] = shape("token_scope, origin_not_allowed")
        responses["429"] = {
            **shape("rate_limited, stream_limit, quota_exceeded, engine_share_exceeded"),
            "headers": {**_RETRY_AFTER, **RATE_HEADERS},
        }
        responses["503"] = {
            **shape("database_unavailable, engine_overloaded, usage_unavailable"),
            "headers": _RETRY_AFTER,
        }
    return responses


def complete_schema(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS)."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schemas["OpenAIError"] = OPENAI_ERROR_SCHEMA
    paths = result.setdefault("paths", {})
    add_synthesis_paths(paths)
    paths["/v1/ready"] = {"get": READY_OPERATION}
    for path, operations in paths.items():
        for method, operation in operations.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = operation["responses"]
            extra = _common_responses(method, operation, openai=path == "/v1/audio/speech")
            for status, answer in extra.items():
                if status in responses:
                    existing = responses[status]
                    existing["description"] += "; " + answer["description"]
                    existing.setdefault("content", answer.get("content"))
                    if "headers" in answer:
                        existing.setdefault("headers", {}).update(answer["headers"])
                else:
                    responses[status] = answer
            if operation.get("security"):
                # The rate budget rides on every answer to an authenticated request.
                for status, answer in responses.items():
                    if status.startswith("2"):
                        answer.setdefault("headers", {}).update(RATE_HEADERS)
            operation["responses"] = dict(sorted(responses.items()))
    result["paths"] = dict(sorted(paths.items()))
    return result


class JsonErrorsMixin:
    """The schema's and the docs' views answer errors (a 405) as every other route does:
    JSON in the error shape, not the schema's media type or an HTML page."""

    def handle_exception(self, exc: Exception) -> Response:
        request: Any = self.request  # type: ignore[attr-defined]
        request.accepted_renderer = JSONRenderer()
        request.accepted_media_type = "application/json"
        response: Response = super().handle_exception(exc)  # type: ignore[misc]
        return response


class SchemaView(JsonErrorsMixin, SpectacularJSONAPIView):
    pass


class DocsView(JsonErrorsMixin, SpectacularSwaggerView):
    pass
