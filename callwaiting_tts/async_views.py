"""The one wrapper every plain async API view uses (DRF has no async views).

It authenticates first (so an unauthenticated caller learns nothing, not even
which methods exist), answers other methods with 405, and turns ApiError and
validation errors into the project's error shape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt
from rest_framework import serializers

from callwaiting_tts.errors import ApiError, api_error_response, error_response, validation_message
from tenants.authentication import Principal, aauthenticate_request

AsyncApiView = Callable[..., Awaitable[HttpResponseBase]]


def async_api_view(*methods: str) -> Callable[[AsyncApiView], Callable[..., HttpResponseBase]]:
    allowed = {method.upper() for method in methods}

    def decorator(view: AsyncApiView) -> Callable[..., HttpResponseBase]:
        @csrf_exempt
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            try:
                principal: Principal = await aauthenticate_request(request)
                if request.method not in allowed:
                    return error_response(
                        request,
                        405,
                        "method_not_allowed",
                        f"Use {', '.join(sorted(allowed))}.",
                        headers={"Allow": ", ".join(sorted(allowed))},
                    )
                return await view(request, principal, *args, **kwargs)
            except ApiError as exc:
                return api_error_response(request, exc)
            except serializers.ValidationError as exc:
                return error_response(
                    request, 400, "invalid_request", validation_message(exc.detail), details=exc.detail
                )

        # Django's URL typing knows only sync views; it calls coroutine views correctly.
        return wrapper  # type: ignore[return-value]

    return decorator
