"""Request ids (every response carries X-Request-ID, every log line names it) and rate headers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import sentry_sdk
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware

from core.metrics import HTTP_DURATION, HTTP_REQUESTS
from core.request_ids import REQUEST_ID_HEADER, SANE_REQUEST_ID, current_request_id, new_request_id


def _annotate(request: HttpRequest, response: HttpResponseBase, request_id: str) -> None:
    """Headers every response carries: its request id and, once authenticated, the rate budget."""
    response[REQUEST_ID_HEADER] = request_id
    if (decision := getattr(request, "rate_limit", None)) is not None:
        for name, value in decision.headers().items():
            response.headers.setdefault(name, value)


def _assign_request_id(request: HttpRequest) -> str:
    offered = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = offered if SANE_REQUEST_ID.match(offered) else new_request_id()
    request.request_id = request_id  # type: ignore[attr-defined]
    current_request_id.set(request_id)
    sentry_sdk.set_tag("request_id", request_id)  # a no-op without SENTRY_DSN
    return request_id


class RequestIdMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponseBase | Awaitable[HttpResponseBase]:
        if self.is_async:
            return self.__acall__(request)
        started = time.perf_counter()
        request_id = _assign_request_id(request)
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        _annotate(request, response, request_id)
        _observe(request, response, time.perf_counter() - started)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        request_id = _assign_request_id(request)
        response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        _annotate(request, response, request_id)
        _observe(request, response, time.perf_counter() - started)
        return response


def _observe(request: HttpRequest, response: HttpResponseBase, elapsed: float) -> None:
    """API metrics, on the event loop (django-prometheus's middleware would take
    two thread hops per request here; it measures the admin side)."""
    match = request.resolver_match
    route = match.url_name if match is not None and match.url_name else "unmatched"
    HTTP_REQUESTS.labels(method=request.method or "", route=route, status=str(response.status_code)).inc()
    HTTP_DURATION.labels(route=route).observe(elapsed)


class InlineHooksMixin:
    """Run a Django middleware's process_request/process_response on the event loop.

    Django's MiddlewareMixin runs both hooks through sync_to_async in the one
    sync thread: two thread hops per middleware per request, and every request
    queueing behind whatever else holds that thread. Use this only for
    middleware whose hooks do no I/O (they read settings and headers).
    """

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = None
        if process_request := getattr(self, "process_request", None):
            response = process_request(request)
        if response is None:
            response = await self.get_response(request)  # type: ignore[attr-defined]
        if process_response := getattr(self, "process_response", None):
            response = process_response(request, response)
        assert isinstance(response, HttpResponseBase)
        return response


class InlineSecurityMiddleware(InlineHooksMixin, SecurityMiddleware):
    pass


class InlineXFrameOptionsMiddleware(InlineHooksMixin, XFrameOptionsMiddleware):
    pass
