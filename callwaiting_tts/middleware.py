"""Request ids (every response carries X-Request-ID, every log line names it), the Host check
(ALLOWED_HOSTS on every route, callwaiting_tts.hosts), rate headers, CORS for the tenants'
browser origins, and the one method policy (HEAD wherever GET is; 405 naming the documented
methods)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import SplitResult

import sentry_sdk
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from corsheaders.middleware import CorsMiddleware
from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from django.http.response import HttpResponseBase
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils.cache import patch_vary_headers

from api.errors import error_response
from core.metrics import HTTP_DURATION, HTTP_REQUESTS
from core.request_ids import REQUEST_ID_HEADER, SANE_REQUEST_ID, current_request_id, new_request_id
from tenants.origins import preflight_origins

logger = logging.getLogger(__name__)


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


class DualModeMiddleware:
    """A middleware that runs sync or async, whichever the handler chain is: its
    `__call__` hands an async chain to its own `__acall__`."""

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
        return self.call_sync(request)

    def call_sync(self, request: HttpRequest) -> HttpResponseBase:
        raise NotImplementedError

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        raise NotImplementedError


class RequestIdMiddleware(DualModeMiddleware):
    def call_sync(self, request: HttpRequest) -> HttpResponseBase:
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


class AllowedHostsMiddleware(DualModeMiddleware):
    """ALLOWED_HOSTS for every route: `400 invalid_host` before anything reads the request.
    Second in both stacks, after the request id (which the error carries)."""

    def call_sync(self, request: HttpRequest) -> HttpResponseBase:
        if (refused := _host_refusal(request)) is not None:
            return refused
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if (refused := _host_refusal(request)) is not None:
            return refused
        response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        return response


def _host_refusal(request: HttpRequest) -> HttpResponseBase | None:
    try:
        request.get_host()  # validates against ALLOWED_HOSTS (and caches nothing wrong)
    except DisallowedHost:
        logger.warning(
            "Refused a request for host %r (not in ALLOWED_HOSTS).", request.META.get("HTTP_HOST", "")[:200]
        )
        return error_response(
            request, 400, "invalid_host", "This service does not answer for that Host; use its own address."
        )
    return None


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


class TenantCorsMiddleware(CorsMiddleware):
    """django-cors-headers with the tenants' origins (tenants.origins) as its allow list.

    It answers preflights and adds the CORS headers for any origin some active tenant
    allows; whether this request's tenant allows it is decided after authentication
    (tenants.authentication), which refuses it otherwise. A request without Origin (every
    server-side client) reads nothing from the database."""

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if "HTTP_ORIGIN" not in request.META:
            # A server-side client (the hot path): nothing of CORS applies, but a cache must
            # still not hand this answer (without CORS headers) to a browser's request.
            response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
            if "Vary" in response:
                patch_vary_headers(response, ("origin",))
            else:
                response["Vary"] = "origin"
            return response
        await preflight_origins.refresh_if_stale()
        return await super().__acall__(request)

    def origin_found_in_white_lists(self, origin: str, url: SplitResult) -> bool:
        return preflight_origins.allows(origin)


def _documented_allow(allow: str) -> str:
    """An `Allow` header as the API documents it: HEAD wherever GET is, never OPTIONS
    (DRF lists OPTIONS on its views; it is refused like any undocumented method)."""
    methods = {method.strip().upper() for method in allow.split(",") if method.strip()}
    methods.discard("OPTIONS")
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


class MethodMiddleware(DualModeMiddleware):
    """One method policy for every route: HEAD is GET without its body, wherever GET is
    allowed; a 405 names exactly the documented methods in `Allow`.

    HEAD reaches each view as GET, so that no view (DRF's, Django's, the async ones)
    needs its own HEAD; `request.META["REQUEST_METHOD"]` still says HEAD for a view that
    can skip work (the signed download does not read the file). Methods a route does not
    document, OPTIONS and TRACE among them, are refused by the view (after authentication
    on the routes that need a key) with 405 and the JSON error shape.
    """

    def call_sync(self, request: HttpRequest) -> HttpResponseBase:
        head = _as_get(request)
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        return _finish(response, head=head)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        head = _as_get(request)
        response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        return _finish(response, head=head)


def _as_get(request: HttpRequest) -> bool:
    if request.method != "HEAD":
        return False
    request.method = "GET"
    return True


def _finish(response: HttpResponseBase, *, head: bool) -> HttpResponseBase:
    if "Allow" in response:
        response["Allow"] = _documented_allow(response["Allow"])
    if head and isinstance(response, HttpResponse):
        # The GET's headers (Content-Length included, as HTTP allows for HEAD), no body.
        length = response.get("Content-Length", str(len(response.content)))
        response.content = b""
        response["Content-Length"] = length
    return response
