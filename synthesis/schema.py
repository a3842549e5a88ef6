"""OpenAPI description of the synthesis routes, which are plain async views drf-spectacular
cannot inspect: their request bodies, successes and the errors only they answer.

The errors every route shares (401, 405, 429, 503, malformed requests) are added to every
operation by callwaiting_tts.schema, which completes the document.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from synthesis.audio import _OPUS_RATES, SAMPLE_RATES, AudioFormat
from synthesis.elevenlabs_wire import DEFAULT_OUTPUT_FORMAT, OUTPUT_FORMATS
from synthesis.openai_api import MAX_INPUT_CHARS, OPENAI_VOICES, RESPONSE_FORMATS

ERROR = {"$ref": "#/components/schemas/Error"}
OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIError"}
# Media types of the audio formats (synthesis.audio.CONTENT_TYPES, parameters left off:
# pcm says its rate, encoding and channels in them; opus is `audio/ogg; codecs=opus`).
AUDIO_MEDIA_TYPES = {
    AudioFormat.WAV: "audio/wav",
    AudioFormat.PCM: "audio/pcm",
    AudioFormat.MP3: "audio/mpeg",
    AudioFormat.OPUS: "audio/ogg",
    AudioFormat.FLAC: "audio/flac",
    AudioFormat.MULAW: "audio/ulaw",
    AudioFormat.AAC: "audio/aac",
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_INTEGER_HEADER = {"schema": {"type": "integer"}}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def error_response(description: str, *, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": ERROR}}}
    if headers:
        answer["headers"] = headers
    return answer


def openai_error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": OPENAI_ERROR}}}


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string", "description": "Stable: clients branch on it."},
                "message": {"type": "string"},
                "request_id": {"type": ["string", "null"]},
                "details": {"description": "Per-field problems (`{field: [messages]}`) or a limit."},
            },
        }
    },
}
OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string", "description": "The same stable code as our own shape."},
            },
        }
    },
}


def _language() -> dict[str, Any]:
    return {
        "type": "string",
        "maxLength": 16,
        # Empty is unset, as null is.
        "pattern": "^([A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})*)?$",
        "description": "The voice's language if unset; one the engine speaks (else unsupported_language).",
    }


def synthesis_request_schema() -> dict[str, Any]:
    """The native body of /v1/synthesize, /v1/synthesize-url and /v1/twiml/play."""
    return {
        "type": "object",
        "required": ["text"],
        "properties": {
            "text": {
                "type": "string",
                "minLength": 1,
                "maxLength": settings.MAX_TEXT_CHARS,
                "description": "Plain text or SSML (`<speak>...`). Nothing speakable is 400 empty_text.",
            },
            "voice_id": {
                "type": ["string", "null"],
                "maxLength": 48,
                "pattern": "^[-a-zA-Z0-9_]*$",
                "description": "From GET /v1/voices; engine default if unset (unknown: 404 voice_not_found).",
            },
            "language": {**_language(), "type": ["string", "null"]},
            "format": {"type": ["string", "null"], "enum": [f.value for f in AudioFormat] + [None]},
            "sample_rate": {
                "type": ["integer", "null"],
                "enum": [*SAMPLE_RATES, None],
                "description": "Default 24000; mulaw is always 8000; opus takes "
                + ", ".join(map(str, _OPUS_RATES))
                + " (another rate for these: 400 unsupported_sample_rate).",
            },
            "speed": {"type": ["number", "null"], "minimum": 0.25, "maximum": 4.0, "default": 1.0},
            "streaming": {"type": ["boolean", "null"], "default": False},
        },
    }


_AUDIO_HEADERS = {
    "X-Audio-Format": {"schema": {"type": "string"}, "description": "The format sent."},
    "X-Sample-Rate": {"schema": {"type": "integer"}, "description": "Its sample rate."},
}


def _synthesis_errors() -> dict[str, Any]:
    return {
        "400": error_response(
            "empty_text, invalid_ssml, ssml_break_too_long, unsupported_format, unsupported_sample_rate, "
            "invalid_speed, unsupported_language, invalid_request, malformed_json, nesting_too_deep, "
            "malformed_request, audio_too_long (more audio than MAX_AUDIO_SECONDS_PER_REQUEST)"
        ),
        "404": error_response("voice_not_found"),
        "413": error_response("text_too_long, body_too_large"),
        "500": error_response("engine_error"),
    }


def synthesize_operation() -> dict[str, Any]:
    return {
        "operationId": "synthesize",
        "summary": "Turn text into speech, streamed or as a whole file",
        "tags": ["synthesis"],
        "security": [{"ApiKey": []}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": synthesis_request_schema()}},
        },
        "responses": {
            "200": {
                "description": "Audio. Streamed responses are chunked; whole ones carry Content-Length "
                "and X-Audio-Duration (seconds).",
                "headers": {
                    **_AUDIO_HEADERS,
                    "X-Audio-Duration": {"schema": {"type": "string"}, "description": "Whole files only."},
                },
                "content": {media_type: _BINARY for media_type in AUDIO_MEDIA_TYPES.values()},
            },
            **_synthesis_errors(),
        },
    }


STORED_AUDIO_ANSWER: dict[str, Any] = {
    "type": "object",
    "required": [
        "url",
        "expires_at",
        "format",
        "content_type",
        "duration_s",
        "bytes",
        "request_id",
        "cached",
    ],
    "properties": {
        "url": {"type": "string", "format": "uri", "description": "Signed; works until expires_at."},
        "expires_at": {"type": "string", "format": "date-time"},
        "format": {"type": "string", "enum": [f.value for f in AudioFormat]},
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
    "schema": {"type": "string", "maxLength": 255, "pattern": "^[\\x21-\\x7e]*$"},
    "description": "A retry with the same key and body gets the same answer; another body is 409.",
}


def _stored_audio_operation(operation_id: str, summary: str, success: dict[str, Any]) -> dict[str, Any]:
    operation = synthesize_operation()
    operation["requestBody"]["content"]["application/json"]["schema"]["properties"]["streaming"][
        "description"
    ] = "Ignored: the audio is stored whole."
    return {
        **operation,
        "operationId": operation_id,
        "summary": summary,
        "parameters": [_IDEMPOTENCY_HEADER],
        "responses": {
            **_synthesis_errors(),
            "200": success,
            "400": error_response(_synthesis_errors()["400"]["description"] + ", invalid_idempotency_key"),
            "409": error_response("idempotency_key_reused"),
        },
    }


def audio_speech_operation() -> dict[str, Any]:
    """OpenAI's speech API, in OpenAI's request and error shapes."""
    return {
        "operationId": "audio_speech",
        "summary": "OpenAI-compatible speech (POST /v1/audio/speech): OpenAI clients work unchanged",
        "tags": ["openai"],
        "security": [{"ApiKey": []}],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["model", "input", "voice"],
                        "properties": {
                            "model": {"type": "string", "minLength": 1, "description": "Any name works."},
                            "input": {"type": "string", "minLength": 1, "maxLength": MAX_INPUT_CHARS},
                            "voice": {
                                "oneOf": [
                                    {
                                        "type": "string",
                                        "minLength": 1,
                                        "maxLength": 48,
                                        "pattern": "^[-a-zA-Z0-9_]+$",
                                        "description": "One of OpenAI's voices ("
                                        + ", ".join(sorted(OPENAI_VOICES))
                                        + ") or one of ours.",
                                    },
                                    {
                                        "type": "object",
                                        "required": ["id"],
                                        "properties": {
                                            "id": {
                                                "type": "string",
                                                "minLength": 1,
                                                "maxLength": 48,
                                                "pattern": "^[-a-zA-Z0-9_]+$",
                                            }
                                        },
                                    },
                                ]
                            },
                            "response_format": {
                                "type": ["string", "null"],
                                "enum": [*RESPONSE_FORMATS, None],
                                "default": "mp3",
                            },
                            "speed": {"type": "number", "minimum": 0.25, "maximum": 4.0, "default": 1.0},
                            "stream_format": {"type": ["string", "null"], "enum": ["audio", "sse", None]},
                            "instructions": {
                                "type": ["string", "null"],
                                "description": "Accepted and ignored: neither engine takes style prompts.",
                            },
                        },
                    }
                }
            },
        },
        "responses": {
            "200": {
                "description": "Audio, streamed as it is made; with stream_format sse, Server-Sent Events "
                "(`speech.audio.delta` with base64 audio, then `speech.audio.done` with usage).",
                "headers": _AUDIO_HEADERS,
                "content": {
                    **{AUDIO_MEDIA_TYPES[AudioFormat(name)]: _BINARY for name in RESPONSE_FORMATS},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            "400": openai_error_response(
                "invalid_request, empty_text, unsupported_format, audio_too_long, ... (as /v1/synthesize)"
            ),
            "404": openai_error_response("voice_not_found"),
            "413": openai_error_response("text_too_long, body_too_large"),
            "500": openai_error_response("engine_error"),
        },
    }


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
                        "name": {"type": "string", "minLength": 1, "maxLength": 200},
                        "language": {"type": "string", "minLength": 1, "maxLength": 16},
                        "voice_id": {"type": "string", "maxLength": 48, "pattern": "^[-a-zA-Z0-9_]+$"},
                    },
                }
            }
        },
    },
    "responses": {
        "201": {
            "description": "The new voice.",
            "content": json_content({"type": "object"}),
        },
        "400": error_response("invalid_audio, invalid_request, too_many_fields, too_many_files"),
        "403": error_response("permission_denied"),
        "409": error_response("voice_exists"),
        "413": error_response("upload_too_large"),
        "422": error_response("audio_too_short, audio_too_long, cloning_not_supported"),
    },
}
VOICE_DELETE_OPERATION: dict[str, Any] = {
    "operationId": "voice_delete",
    "summary": "Delete one of your cloned voices and its stored audio",
    "tags": ["voices"],
    "security": [{"ApiKey": []}],
    "parameters": [
        {
            "name": "voice_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": "^[-a-zA-Z0-9_]+$"},
        }
    ],
    "responses": {
        "204": {"description": "Deleted."},
        "404": error_response("voice_not_found"),
        "409": error_response("voice_unavailable"),
    },
}
AUDIO_DOWNLOAD_OPERATION: dict[str, Any] = {
    "operationId": "audio_download",
    "summary": "Stored audio behind a signed, expiring link (from /v1/synthesize-url); no API key",
    "tags": ["synthesis"],
    "security": [],
    "parameters": [
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "expires", "in": "query", "required": True, "schema": {"type": "string"}},
        {"name": "signature", "in": "query", "required": True, "schema": {"type": "string"}},
        {"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}},
        {
            "name": "Range",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "One byte range (`bytes=0-99`, `bytes=100-`, `bytes=-500`); others get the whole.",
        },
        {"name": "If-Range", "in": "header", "required": False, "schema": {"type": "string"}},
    ],
    "responses": {
        "200": {
            "description": "The audio, with ETag, Last-Modified and Cache-Control until the link expires.",
            "content": {media_type: _BINARY for media_type in AUDIO_MEDIA_TYPES.values()},
        },
        "206": {
            "description": "Partial content: the bytes `Content-Range` names.",
            "content": {media_type: _BINARY for media_type in AUDIO_MEDIA_TYPES.values()},
            "headers": {"Content-Range": {"schema": {"type": "string"}}},
        },
        "304": {"description": "Not modified (If-None-Match)."},
        "416": error_response(
            "range_not_satisfiable: the range starts past the end",
            headers={"Content-Range": {"schema": {"type": "string"}}},
        ),
        "403": error_response("invalid_signature, link_expired"),
        "404": error_response("not_found: the audio no longer exists"),
        "503": error_response("database_unavailable", headers={"Retry-After": _INTEGER_HEADER}),
    },
}


def elevenlabs_operation(operation_id: str, summary: str, answer: dict[str, Any]) -> dict[str, Any]:
    """ElevenLabs' text to speech (docs/elevenlabs.md): its request, its `detail` next to our
    `error` in every error, `xi-api-key` or Bearer."""
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": "ElevenLabs-compatible (docs/elevenlabs.md): the key as `xi-api-key` or Bearer; "
        'errors carry ElevenLabs\' `{"detail": {"status", "message"}}` next to the `error` object.',
        "tags": ["elevenlabs"],
        "security": [{"ApiKey": []}],
        "parameters": [
            {
                "name": "voice_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "maxLength": 48, "pattern": "^[-a-zA-Z0-9_]+$"},
                "description": "One of our voice ids (GET /v1/voices).",
            },
            {
                "name": "output_format",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": DEFAULT_OUTPUT_FORMAT},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["text"],
                        "properties": {
                            "text": {"type": "string", "minLength": 1, "maxLength": settings.MAX_TEXT_CHARS},
                            "model_id": {"type": ["string", "null"], "description": "Any name works."},
                            "language_code": {"type": ["string", "null"]},
                            "voice_settings": {
                                "type": ["object", "null"],
                                "properties": {"speed": {"type": "number", "minimum": 0.25, "maximum": 4.0}},
                            },
                        },
                    }
                }
            },
        },
        "responses": {"200": answer, **_synthesis_errors()},
    }


_ELEVENLABS_AUDIO = {
    "description": "Audio in the asked output_format (streamed as it is made on /stream).",
    "headers": _AUDIO_HEADERS,
    "content": {"audio/pcm": _BINARY, "audio/ulaw": _BINARY, "audio/mpeg": _BINARY},
}


def add_synthesis_paths(paths: dict[str, Any]) -> None:
    paths["/v1/synthesize"] = {"post": synthesize_operation()}
    paths["/v1/synthesize-url"] = {
        "post": _stored_audio_operation(
            "synthesize_url",
            "Synthesize (or find in the phrase cache) and answer a signed, expiring audio URL",
            {
                "description": "The stored audio.",
                "content": json_content(STORED_AUDIO_ANSWER),
            },
        )
    }
    paths["/v1/twiml/play"] = {
        "post": _stored_audio_operation(
            "twiml_play",
            "The same, answered as TwiML <Response><Play>URL</Play></Response>",
            {"description": "TwiML.", "content": {"text/xml": {"schema": {"type": "string"}}}},
        )
    }
    paths["/v1/audio/speech"] = {"post": audio_speech_operation()}
    paths["/v1/text-to-speech/{voice_id}"] = {
        "post": elevenlabs_operation(
            "elevenlabs_tts", "ElevenLabs-compatible speech, whole", _ELEVENLABS_AUDIO
        )
    }
    paths["/v1/text-to-speech/{voice_id}/stream"] = {
        "post": elevenlabs_operation(
            "elevenlabs_tts_stream", "ElevenLabs-compatible speech, streamed", _ELEVENLABS_AUDIO
        )
    }
    paths["/v1/text-to-speech/{voice_id}/stream/with-timestamps"] = {
        "post": elevenlabs_operation(
            "elevenlabs_tts_stream_timestamps",
            "ElevenLabs-compatible speech with character timings, streamed as JSON lines",
            {
                "description": "JSON lines: `audio_base64`, `alignment` and `normalized_alignment` "
                "(`characters`, `character_start_times_seconds`, `character_end_times_seconds`).",
                "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
            },
        )
    }
    paths["/v1/audio/{name}"] = {"get": AUDIO_DOWNLOAD_OPERATION}
    paths["/v1/voices/upload"] = {"post": VOICE_UPLOAD_OPERATION}
    paths["/v1/voices/{voice_id}"] = {"delete": VOICE_DELETE_OPERATION}
