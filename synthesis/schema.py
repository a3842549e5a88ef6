"""OpenAPI description of the plain async views, which drf-spectacular cannot see."""

from __future__ import annotations

from typing import Any

from synthesis.audio import SAMPLE_RATES, AudioFormat

_ERROR = {"$ref": "#/components/schemas/Error"}
_AUDIO_TYPES = ("audio/wav", "audio/pcm", "audio/mpeg", "audio/ogg", "audio/flac", "audio/ulaw")


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


SYNTHESIZE_OPERATION: dict[str, Any] = {
    "operationId": "synthesize",
    "summary": "Turn text into speech, streamed or as a whole file",
    "tags": ["synthesis"],
    "security": [{"ApiKey": []}],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["text"],
                    "properties": {
                        "text": {"type": "string", "description": "Plain text or SSML (<speak>...)."},
                        "voice_id": {
                            "type": "string",
                            "description": "From GET /v1/voices; engine default if unset.",
                        },
                        "language": {"type": "string", "description": "The voice's language if unset."},
                        "format": {
                            "type": "string",
                            "enum": [f.value for f in AudioFormat],
                            "default": "wav",
                        },
                        "sample_rate": {
                            "type": "integer",
                            "enum": list(SAMPLE_RATES),
                            "description": "Default 24000; mulaw is 8000; opus: 8000, 16000, 24000, 48000.",
                        },
                        "speed": {"type": "number", "minimum": 0.25, "maximum": 4.0, "default": 1.0},
                        "streaming": {"type": "boolean", "default": False},
                    },
                }
            }
        },
    },
    "responses": {
        "200": {
            "description": "Audio. Streamed responses are chunked; whole ones carry Content-Length "
            "and X-Audio-Duration (seconds).",
            "content": {
                content_type: {"schema": {"type": "string", "format": "binary"}}
                for content_type in (
                    "audio/wav",
                    "audio/pcm",
                    "audio/mpeg",
                    "audio/ogg",
                    "audio/flac",
                    "audio/ulaw",
                )
            },
        },
        "400": _error_response("Bad input: empty_text, invalid_ssml, unsupported_format, ..."),
        "401": _error_response("Missing or bad API key."),
        "404": _error_response("voice_not_found"),
        "413": _error_response("text_too_long"),
        "503": _error_response("engine_overloaded (with Retry-After)."),
    },
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "request_id": {"type": "string"},
                "details": {"type": "object"},
            },
        }
    },
}


def add_async_views(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    result.setdefault("paths", {})["/v1/synthesize"] = {"post": SYNTHESIZE_OPERATION}
    return result
