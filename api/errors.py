"""The one JSON error shape every endpoint answers with.

    {"error": {"code": "<stable_code>", "message": "<human text>", "request_id": "..."}}

`code` is part of the API contract: clients branch on it, so codes are never
renamed (core.errors). Field-level validation problems add `"details": {field: [messages]}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.db import DatabaseError
from django.http import Http404, HttpRequest, JsonResponse
from django.http.response import HttpResponseBase
from rest_framework import exceptions, status
from rest_framework.response import Response

from core.errors import ServiceError, database_error
from core.request_ids import REQUEST_ID_HEADER, request_id_for


def error_body(request: HttpRequest | None, code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    error["request_id"] = request_id_for(request) if request is not None else None
    return {"error": error}


def error_response(
    request: HttpRequest,
    status_code: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    details: Any = None,
) -> JsonResponse:
    """The error shape for plain (non-DRF) Django views, including the async ones."""
    response = JsonResponse(error_body(request, code, message, details), status=status_code)
    for name, value in (headers or {}).items():
        response[name] = value
    response[REQUEST_ID_HEADER] = request_id_for(request)
    response.error_code = code  # type: ignore[attr-defined]  # for usage metering
    return response


def error_code_of(response: HttpResponseBase) -> str | None:
    """The stable code of an error response made here; None for a success."""
    code = getattr(response, "error_code", None)
    if isinstance(code, str):
        return code
    return None if response.status_code < 400 else f"http_{response.status_code}"


def service_error_response(request: HttpRequest, error: ServiceError) -> JsonResponse:
    return error_response(
        request, error.status_code, error.code, error.message, headers=error.headers, details=error.details
    )


# Stable codes for DRF's own exceptions.
_DRF_CODES: dict[type[exceptions.APIException], str] = {
    exceptions.ParseError: "malformed_request",
    exceptions.NotAuthenticated: "missing_api_key",
    exceptions.AuthenticationFailed: "invalid_api_key",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "rate_limited",
    exceptions.ValidationError: "invalid_request",
}


def validation_message(detail: Any) -> str:
    """One readable sentence out of DRF's nested validation errors."""
    if isinstance(detail, dict):
        parts = []
        for field, problems in detail.items():
            text = validation_message(problems)
            parts.append(text if field == "non_field_errors" else f"{field}: {text}")
        return "; ".join(parts)
    if isinstance(detail, list):
        return " ".join(validation_message(item) for item in detail)
    return str(detail)


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    request = context.get("request")
    django_request = getattr(request, "_request", request)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    if isinstance(exc, DatabaseError):
        exc = database_error(exc)
    if not isinstance(exc, exceptions.APIException | ServiceError):
        return None  # a real bug: let Django's 500 handler (JSON, below) answer

    headers: dict[str, str] = {}
    if auth_header := getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = auth_header
    details: Any = None
    if isinstance(exc, ServiceError):
        code, message, details = exc.code, exc.message, exc.details
        headers.update(exc.headers)
    else:
        code = next((c for cls, c in _DRF_CODES.items() if isinstance(exc, cls)), "error")
        if isinstance(exc, exceptions.ValidationError):
            details = exc.detail
            message = validation_message(exc.detail)
        else:
            message = str(exc.detail)
    if wait := getattr(exc, "wait", None):
        headers["Retry-After"] = str(int(wait + 0.999))
    return Response(
        error_body(django_request, code, message, details),
        status=exc.status_code or status.HTTP_400_BAD_REQUEST,
        headers=headers,
    )


def not_found_view(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return error_response(request, 404, "not_found", "No such endpoint or object.")


def server_error_view(request: HttpRequest) -> JsonResponse:
    return error_response(
        request, 500, "internal_error", "Something went wrong on our side; it has been logged."
    )


def bad_request_view(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return error_response(request, 400, "bad_request", "The request could not be understood.")


def permission_denied_view(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return error_response(request, 403, "permission_denied", "You may not do this.")
