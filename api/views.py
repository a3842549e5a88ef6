"""The one wrapper every plain async API view uses (DRF has no async views).

It authenticates first (so an unauthenticated caller learns nothing, not even
which methods exist), then throttles, answers other methods with 405, turns ServiceError and
validation errors into the project's error shape, and, for the synthesis
endpoints, meters the request: one usage row however it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.db import DatabaseError
from django.http import HttpRequest, StreamingHttpResponse
from django.http.multipartparser import MultiPartParserError
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt
from rest_framework import serializers

from api.errors import error_code_of, service_error_response, validation_message
from core.errors import ServiceError, database_error
from core.request_ids import request_id_for
from tenants.authentication import Principal, aauthenticate_request
from tenants.limits import athrottle_request
from usage.recorder import CLIENT_DISCONNECTED, STATUS_CLIENT_CLOSED, UsageMeter, metered_stream

logger = logging.getLogger(__name__)

INTERNAL_ERROR = ServiceError(500, "internal_error", "Something went wrong on our side; it has been logged.")

AsyncApiView = Callable[..., Awaitable[HttpResponseBase]]
ErrorRenderer = Callable[[HttpRequest, ServiceError], HttpResponseBase]


def async_api_view(
    *methods: str, usage_endpoint: str | None = None, render_error: ErrorRenderer = service_error_response
) -> Callable[[AsyncApiView], Callable[..., HttpResponseBase]]:
    """`usage_endpoint` names the endpoint in usage rows; views fill in the
    request's meter (`usage_meter_of(request)`) as they learn what it asks for.
    `render_error` draws errors in another shape (the OpenAI-compatible route)."""
    allowed = {method.upper() for method in methods}

    def decorator(view: AsyncApiView) -> Callable[..., HttpResponseBase]:
        async def answer(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            try:
                principal: Principal = await aauthenticate_request(request)
                await athrottle_request(request, principal.tenant)
                if request.method not in allowed:
                    raise ServiceError(
                        405,
                        "method_not_allowed",
                        f"Use {', '.join(sorted(allowed))}.",
                        headers={"Allow": ", ".join(sorted(allowed))},
                    )
                return await view(request, principal, *args, **kwargs)
            except ServiceError as exc:
                return render_error(request, exc)
            except serializers.ValidationError as exc:
                error = ServiceError(
                    400, "invalid_request", validation_message(exc.detail), details=exc.detail
                )
                return render_error(request, error)
            except TooManyFieldsSent:
                # Django's bound on form fields (DATA_UPLOAD_MAX_NUMBER_FIELDS): a SuspiciousOperation
                # the view never sees, which would otherwise be a 500 and a Sentry event.
                limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
                error = ServiceError(400, "too_many_fields", f"The form holds more than {limit} fields.")
                return render_error(request, error)
            except TooManyFilesSent:
                limit = settings.DATA_UPLOAD_MAX_NUMBER_FILES
                error = ServiceError(400, "too_many_files", f"The form holds more than {limit} files.")
                return render_error(request, error)
            except RequestDataTooBig:
                error = ServiceError(413, "request_too_large", "The request body is too large.")
                return render_error(request, error)
            except MultiPartParserError as exc:
                # A form body that does not parse (no boundary, broken parts): the client's.
                error = ServiceError(400, "malformed_request", f"The form body does not parse: {exc}.")
                return render_error(request, error)
            except DatabaseError as exc:
                return render_error(request, database_error(exc))
            except Exception:
                # A bug: logged (Sentry's logging integration sends it on) and answered in
                # the route's own error shape, so that e.g. OpenAI's SDKs raise their usual error.
                logger.exception("Unhandled error in %s %s", request.method, request.path)
                return render_error(request, INTERNAL_ERROR)

        @csrf_exempt
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if usage_endpoint is None:
                return await answer(request, *args, **kwargs)
            meter = UsageMeter(endpoint=usage_endpoint, request_id=request_id_for(request))
            request.usage_meter = meter  # type: ignore[attr-defined]
            try:
                response = await answer(request, *args, **kwargs)
            except asyncio.CancelledError:
                _meter_tenant(meter, request)
                meter.finish(STATUS_CLIENT_CLOSED, CLIENT_DISCONNECTED)
                raise
            except Exception:
                _meter_tenant(meter, request)
                meter.finish(500, "internal_error")
                raise
            _meter_tenant(meter, request)
            if isinstance(response, StreamingHttpResponse) and response.is_async:
                response.streaming_content = metered_stream(response.streaming_content, meter)  # type: ignore[arg-type]
            else:
                meter.finish(response.status_code, error_code_of(response))
            return response

        # Django's URL typing knows only sync views; it calls coroutine views correctly.
        return wrapper  # type: ignore[return-value]

    return decorator


def _meter_tenant(meter: UsageMeter, request: HttpRequest) -> None:
    """The tenant is known once the key is verified (even if the request is then refused)."""
    tenant = getattr(request, "tenant", None)
    if tenant is not None:
        meter.tenant_id = tenant.id
