"""What engines raise: refusals at admission, and failures while making audio."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class EngineConfigurationError(ImproperlyConfigured):
    """The engine cannot start with the configured settings (raised at start-up)."""


class EngineOverloaded(Exception):
    """The engine cannot take one more stream and keep the ones it holds real-time."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"The speech engine is at capacity; retry in {retry_after_s} s.")
        self.retry_after_s = retry_after_s


class EngineShareExceeded(EngineOverloaded):
    """One owner (a tenant) already runs its share of the engine's jobs; others may not."""

    def __init__(self, share: int) -> None:
        super().__init__(retry_after_s=1)
        self.args = (f"This tenant already runs {share} syntheses, its share of the engine; retry shortly.",)
        self.share = share


class CloningNotSupported(Exception):
    pass


class EngineFailure(Exception):
    """The engine failed while generating audio for one request."""
