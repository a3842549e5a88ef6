"""An ASGI handler for the API: the same URLs, a lean, event-loop-only middleware stack."""

from __future__ import annotations

from django.conf import settings
from django.core.handlers.asgi import ASGIHandler


class ApiASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        # BaseHandler.load_middleware reads settings.MIDDLEWARE and takes no
        # list; swap the setting while it builds the chain. This runs once, in
        # asgi.py at import, before any request thread exists.
        full_stack = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async=is_async)
        finally:
            settings.MIDDLEWARE = full_stack
