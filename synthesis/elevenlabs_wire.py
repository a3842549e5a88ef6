"""ElevenLabs' wire formats, shared by its HTTP routes (synthesis.elevenlabs) and its
WebSockets (synthesis.stream.elevenlabs): output formats, voice settings, alignment."""

from __future__ import annotations

from typing import Any

from core.errors import ServiceError
from engines.alignment import CharTimings
from engines.text import MAX_RATE, MIN_RATE

API_KEY_HEADER = "xi-api-key"
DEFAULT_OUTPUT_FORMAT = "mp3_44100_128"
_PCM_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
_MP3_FORMATS = (
    "mp3_22050_32",
    "mp3_44100_32",
    "mp3_44100_64",
    "mp3_44100_96",
    "mp3_44100_128",
    "mp3_44100_192",
)
OUTPUT_FORMATS = (*(f"pcm_{rate}" for rate in _PCM_RATES), "ulaw_8000", *_MP3_FORMATS)


def output_format(name: str | None) -> tuple[str, int]:
    """ElevenLabs' `output_format` as our (format, sample rate); the MP3 bit rate is the encoder's."""
    name = name or DEFAULT_OUTPUT_FORMAT
    if name not in OUTPUT_FORMATS:
        raise ServiceError(
            400,
            "unsupported_format",
            f"output_format {name!r} is not offered; use one of: {', '.join(OUTPUT_FORMATS)}.",
            details={"output_format": [f"One of: {', '.join(OUTPUT_FORMATS)}."]},
        )
    kind, rate = name.split("_")[:2]
    return {"pcm": "pcm", "ulaw": "mulaw", "mp3": "mp3"}[kind], int(rate)


# ElevenLabs' voice settings and their ranges. Only `speed` changes our audio (ElevenLabs'
# range is 0.7 to 1.2; ours, the engine's, is wider); the others are checked as ElevenLabs
# checks them, so that a client's mistake is an error here too rather than silence.
_UNIT_SETTINGS = ("stability", "similarity_boost", "style")


def voice_settings_checked(voice_settings: Any) -> dict[str, Any]:
    """ElevenLabs' `voice_settings` (an object, or null for none), or 400
    invalid_voice_settings naming each bad field. Fields it does not know are ignored."""
    if voice_settings is None:
        return {}
    if not isinstance(voice_settings, dict):
        raise ServiceError(
            400,
            "invalid_voice_settings",
            "`voice_settings` must be an object.",
            details={"voice_settings": ["An object."]},
        )
    problems: dict[str, list[str]] = {}

    def number(name: str, low: float, high: float) -> None:
        value = voice_settings.get(name)
        if value is None:
            return
        if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
            problems[f"voice_settings.{name}"] = [f"A number from {low:g} to {high:g}."]

    for name in _UNIT_SETTINGS:
        number(name, 0.0, 1.0)
    number("speed", MIN_RATE, MAX_RATE)
    boost = voice_settings.get("use_speaker_boost")
    if boost is not None and not isinstance(boost, bool):
        problems["voice_settings.use_speaker_boost"] = ["true or false."]
    if problems:
        raise ServiceError(
            400,
            "invalid_voice_settings",
            f"Invalid voice_settings: {', '.join(sorted(problems))}.",
            details=problems,
        )
    return voice_settings


def speed_of(voice_settings: Any) -> float:
    """`voice_settings.speed` (checked by voice_settings_checked); 1 otherwise."""
    speed = voice_settings.get("speed") if isinstance(voice_settings, dict) else None
    if isinstance(speed, int | float) and not isinstance(speed, bool):
        return float(speed)
    return 1.0


def alignment_ms(timings: CharTimings, offset_ms: int) -> dict[str, list[Any]]:
    """The WebSocket's `alignment`: times relative to the message's own audio, as ElevenLabs'
    ("relative to the returned chunk, not the full audio response")."""
    shifted = timings.shifted(offset_ms)
    return {
        "chars": shifted.chars,
        "charStartTimesMs": shifted.starts_ms,
        "charDurationsMs": shifted.durations_ms,
    }


def alignment_seconds(timings: CharTimings) -> dict[str, list[Any]]:
    """The HTTP `alignment`: start and end seconds of each character from the audio's start."""
    return {
        "characters": timings.chars,
        "character_start_times_seconds": [start / 1000 for start in timings.starts_ms],
        "character_end_times_seconds": [
            (start + duration) / 1000
            for start, duration in zip(timings.starts_ms, timings.durations_ms, strict=True)
        ],
    }
