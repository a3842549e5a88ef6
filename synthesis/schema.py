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


_STORED_AUDIO_ANSWER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "format": "uri", "description": "Signed; works until expires_at."},
        "expires_at": {"type": "string", "format": "date-time"},
        "format": {"type": "string"},
        "content_type": {"type": "string"},
        "duration_s": {"type": "number"},
        "bytes": {"type": "integer"},
        "request_id": {"type": "string"},
        "cached": {"type": "boolean", "description": "Answered from the phrase cache, no synthesis."},
    },
}
_IDEMPOTENCY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 255},
    "description": "A retry with the same key and body gets the same answer; another body is 409.",
}


def _stored_audio_operation(operation_id: str, summary: str, success: dict[str, Any]) -> dict[str, Any]:
    return {
        **SYNTHESIZE_OPERATION,
        "operationId": operation_id,
        "summary": summary,
        "parameters": [_IDEMPOTENCY_HEADER],
        "responses": {
            **{code: value for code, value in SYNTHESIZE_OPERATION["responses"].items() if code != "200"},
            "200": success,
            "409": _error_response("idempotency_key_reused"),
        },
    }


SYNTHESIZE_URL_OPERATION = _stored_audio_operation(
    "synthesize_url",
    "Synthesize (or find in the phrase cache) and answer a signed, expiring audio URL",
    {"description": "The stored audio.", "content": {"application/json": {"schema": _STORED_AUDIO_ANSWER}}},
)
TWIML_PLAY_OPERATION = _stored_audio_operation(
    "twiml_play",
    "The same, answered as TwiML <Response><Play>URL</Play></Response>",
    {"description": "TwiML.", "content": {"text/xml": {"schema": {"type": "string"}}}},
)
VOICE_UPLOAD_OPERATION: dict[str, Any] = {
    "operationId": "voice_upload",
    "summary": "Clone a voice from a 3-60 s reference recording (needs the upload permission)",
    "tags": ["voices"],
    "security": [{"ApiKey": []}],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "name", "language"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "WAV, FLAC, Ogg or MP3.",
                        },
                        "name": {"type": "string"},
                        "language": {"type": "string"},
                        "voice_id": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
                    },
                }
            }
        },
    },
    "responses": {
        "201": {"description": "The new voice."},
        "400": _error_response("invalid_audio, invalid_request"),
        "403": _error_response("permission_denied"),
        "409": _error_response("voice_exists"),
        "413": _error_response("upload_too_large"),
        "422": _error_response("audio_too_short, audio_too_long, cloning_not_supported"),
    },
}
VOICE_DELETE_OPERATION: dict[str, Any] = {
    "operationId": "voice_delete",
    "summary": "Delete one of your cloned voices and its stored audio",
    "tags": ["voices"],
    "security": [{"ApiKey": []}],
    "parameters": [{"name": "voice_id", "in": "path", "required": True, "schema": {"type": "string"}}],
    "responses": {"204": {"description": "Deleted."}, "404": _error_response("voice_not_found")},
}


def add_async_views(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: the plain async views, which it cannot inspect."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    paths = result.setdefault("paths", {})
    paths["/v1/synthesize"] = {"post": SYNTHESIZE_OPERATION}
    paths["/v1/synthesize-url"] = {"post": SYNTHESIZE_URL_OPERATION}
    paths["/v1/twiml/play"] = {"post": TWIML_PLAY_OPERATION}
    paths["/v1/voices/upload"] = {"post": VOICE_UPLOAD_OPERATION}
    paths["/v1/voices/{voice_id}"] = {"delete": VOICE_DELETE_OPERATION}
    return result
