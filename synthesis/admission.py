"""One request model and one admission path for every synthesis entry point.

Each entry point parses its own wire shape into a `SynthesisRequest`: the native JSON of
/v1/synthesize, /v1/synthesize-url and /v1/twiml/play, OpenAI's JSON (synthesis.openai_api),
a WebSocket `start` or `synthesize` (synthesis.stream). `synthesis_admit` then admits it
in one fixed order:

    usage journal -> rate limit -> plan (text, output, voice, language, output budget)
    -> quota -> stream lease

The first refuses everything while usage cannot be recorded (usage_unavailable): no
audio is made that could not be billed.

HTTP requests are rate limited by the view decorator before the body is read (every API
route is), so they skip the first step here; a WebSocket utterance is a request of its own
and takes it here. The usage meter learns what the request asked for in one place, and
every other error becomes its stable code in one place (`service_error_for`).

Parsing is by hand: it runs on every request of the hot path, where a DRF serializer
costs about 1 ms against about 50 us for this.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError

from core.errors import ServiceError, database_error, usage_unavailable
from core.strings import control_characters_in
from engines import EngineFailure, EngineOverloaded, EngineShareExceeded
from engines.text import Segment
from synthesis.services import SynthesisPlan, SynthesisSetup, output_budget, synthesis_setup, text_segments
from tenants.limits import StreamLease, arate_limit_check, stream_lease_acquire
from tenants.models import Tenant
from usage.quotas import quota_check, quota_estimate, quota_reserve
from usage.recorder import UsageMeter, usage_recordable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthesisRequest:
    """What a caller asks for, whichever door it came through."""

    # The whole text; None for a WebSocket utterance, whose text arrives in pieces later.
    text: str | None
    voice_id: str | None = None
    language: str | None = None
    audio_format: str | None = None
    sample_rate: int | None = None
    speed: float = 1.0
    streaming: bool = False


# The fields of a native request: (name, accepted types, required).
_NATIVE_FIELDS: tuple[tuple[str, tuple[type, ...], bool], ...] = (
    ("text", (str,), True),
    ("voice_id", (str,), False),
    ("language", (str,), False),
    ("format", (str,), False),
    ("sample_rate", (int,), False),
    ("speed", (int, float), False),
    ("streaming", (bool,), False),
)
# A WebSocket `start` (or `synthesize`, whose text is checked by the consumer).
_UTTERANCE_FIELDS: tuple[tuple[str, tuple[type, ...], bool], ...] = (
    ("voice_id", (str,), False),
    ("language", (str,), False),
    ("format", (str,), False),
    ("sample_rate", (int,), False),
    ("speed", (int, float), False),
    ("stream_sid", (str,), False),
)


def field_problems(
    payload: Mapping[str, Any], fields: tuple[tuple[str, tuple[type, ...], bool], ...]
) -> dict[str, list[str]]:
    """Each field that is missing or of the wrong type, with why. JSON null is absent."""
    problems: dict[str, list[str]] = {}
    for name, types, required in fields:
        value = payload.get(name)
        if value is None:
            if required:
                problems[name] = ["This field is required."]
        # bool is an int in Python; a number field must not take true/false.
        elif not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            problems[name] = [f"Must be a {' or '.join(t.__name__ for t in types)}."]
    return problems


def invalid_request(problems: dict[str, list[str]]) -> ServiceError:
    message = "; ".join(f"{name}: {' '.join(reasons)}" for name, reasons in problems.items())
    return ServiceError(400, "invalid_request", message, details=problems)


# The request's identifier and enum fields, by their wire names: they are looked up in the
# database and journaled in usage records, so a control character is refused here, for
# every door, before either happens.
_IDENTIFIER_FIELDS = (("voice_id", "voice_id"), ("language", "language"), ("audio_format", "format"))


def identifier_problems(request: SynthesisRequest) -> dict[str, list[str]]:
    problems: dict[str, list[str]] = {}
    for attribute, wire_name in _IDENTIFIER_FIELDS:
        value = getattr(request, attribute)
        if isinstance(value, str) and control_characters_in(value):
            problems[wire_name] = ["Must not contain control characters."]
    return problems


def native_request(payload: Mapping[str, Any]) -> SynthesisRequest:
    """The JSON body of /v1/synthesize, /v1/synthesize-url and /v1/twiml/play."""
    if problems := field_problems(payload, _NATIVE_FIELDS):
        raise invalid_request(problems)
    if payload.get("format") == "":
        # Absent or null means wav; an empty name is no format (the schema's enum says so too).
        raise ServiceError(400, "unsupported_format", "format is empty; leave it out (or null) for wav.")
    return SynthesisRequest(
        text=payload["text"],
        voice_id=payload.get("voice_id") or None,
        language=payload.get("language") or None,
        audio_format=payload.get("format") or "wav",
        sample_rate=payload.get("sample_rate"),
        speed=float(payload["speed"]) if payload.get("speed") is not None else 1.0,
        streaming=bool(payload.get("streaming") or False),
    )


def utterance_request(message: Mapping[str, Any], *, twilio: bool) -> SynthesisRequest:
    """A WebSocket `start` or `synthesize`; Twilio mode is 8 kHz mu-law whatever was asked."""
    if problems := field_problems(message, _UTTERANCE_FIELDS):
        raise invalid_request(problems)
    return SynthesisRequest(
        text=None,
        voice_id=message.get("voice_id") or None,
        language=message.get("language") or None,
        audio_format="mulaw" if twilio else message.get("format") or "pcm",
        sample_rate=8000 if twilio else message.get("sample_rate"),
        speed=float(message["speed"]) if message.get("speed") is not None else 1.0,
        streaming=True,
    )


@dataclass
class Admission:
    """An admitted request: checked, counted against its limits, holding its lease."""

    setup: SynthesisSetup
    # The plan of the whole text; None for a WebSocket utterance (planned piece by piece).
    plan: SynthesisPlan | None
    # Held by a streamed HTTP answer until its body ends; the caller releases it.
    lease: StreamLease | None


async def synthesis_admit(
    *,
    tenant: Tenant,
    request: SynthesisRequest,
    meter: UsageMeter | None,
    rate_limit: bool = False,
    lease: bool = False,
) -> Admission:
    """Admit a synthesis or raise the ServiceError that refuses it (the meter records why).

    `rate_limit`: spend the tenant's request budget here (WebSocket utterances).
    `lease`: take one of the tenant's concurrent streams (streamed HTTP answers).
    """
    if problems := identifier_problems(request):
        raise invalid_request(problems)
    if meter is not None:
        meter.tenant_id = tenant.id
        meter.input_chars = len(request.text or "")
        meter.format = request.audio_format or ""
        meter.voice_id = request.voice_id or ""
        meter.streaming = request.streaming
        if not usage_recordable():  # a flag: no disk access on the hot path
            raise usage_unavailable()
    if rate_limit:
        decision = await arate_limit_check(tenant)
        if decision is not None and (refusal := decision.refusal()) is not None:
            raise refusal
    # The text first: it is the commonest mistake, and checking it costs no lookup.
    segments: list[Segment] | None = text_segments(request.text) if request.text is not None else None
    setup = await synthesis_setup(
        tenant=tenant,
        voice_id=request.voice_id,
        language=request.language,
        audio_format=request.audio_format,
        sample_rate=request.sample_rate,
        speed=request.speed,
    )
    plan = None
    if segments is not None:
        # Its breaks and estimated audio within the limits: a 400 before any audio is made.
        output_budget(setup.speed).spend(segments)
        plan = setup.plan_segments(segments)
    if meter is not None:
        meter.format = setup.spec.format.value
        meter.voice_id = setup.voice.voice_id
    if meter is None:
        await quota_check(tenant)  # nothing to settle a reservation with (warm_cache)
    else:
        # Settled by the meter when the request ends, whichever way it ends.
        estimate = quota_estimate(segments, setup.speed) if segments is not None else 0.0
        meter.quota_reservation = await quota_reserve(
            tenant, estimate, record_id=meter.id, created_at=meter.created_at
        )
    # Last: from here the caller owns the lease and releases it however the request ends.
    held = await stream_lease_acquire(tenant) if lease else None
    if meter is not None:
        meter.open()  # admitted: a row now follows whatever happens to this process
    return Admission(setup=setup, plan=plan, lease=held)


def service_error_for(exc: Exception, *, request_id: str) -> ServiceError:
    """The error a client sees for any exception raised while admitting or running a
    synthesis: refusals keep their code, a database outage is a 503 to retry, engine errors
    have their own codes, and anything else (a bug) is a 500. Faults (engine errors and
    bugs) are logged here, so that no door can answer one without a trace."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, DatabaseError):
        return database_error(exc)
    if isinstance(exc, EngineShareExceeded):
        return ServiceError(
            429, "engine_share_exceeded", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        )
    if isinstance(exc, EngineOverloaded):
        return ServiceError(
            503, "engine_overloaded", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        )
    logger.error("Synthesis %s failed", request_id, exc_info=exc)
    if isinstance(exc, EngineFailure):
        return ServiceError(500, "engine_error", f"The speech engine failed: {exc}")
    return ServiceError(500, "internal_error", "Something went wrong on our side; it has been logged.")
