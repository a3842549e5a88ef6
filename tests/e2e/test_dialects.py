"""The ElevenLabs- and Cartesia-compatible endpoints through Daphne, with a plain WebSocket
client and httpx: the wire shapes, character timings consistent with the audio sent, errors
in each dialect's own shape, and one usage row per utterance (docs/elevenlabs.md,
docs/cartesia.md). The frameworks' own plugins drive them in test_dialect_plugins.py."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import committed_tenant
from tests.support.waiting import wait_until
from usage.models import UsageLog

pytestmark = pytest.mark.slow

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
SENTENCES = "Thanks for calling. Your table is booked for eight. "


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv) -> Iterator[str]:
    with daphne_server(service_env(REDIS_URL=settings.REDIS_URL)) as base_url:
        yield base_url


def _ws(base_url: str, path: str) -> str:
    return base_url.replace("http://", "ws://") + path


async def _json(ws: ClientConnection, wait_s: float = 60) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), wait_s)
    assert isinstance(message, str), "every message of these dialects is JSON text"
    body: dict[str, Any] = json.loads(message)
    return body


async def _until_final(ws: ClientConnection, key: str = "isFinal") -> list[dict[str, Any]]:
    """Every message up to and including the one that carries `key`."""
    messages = []
    while True:
        body = await _json(ws)
        messages.append(body)
        if body.get(key):
            return messages


async def _refusal(ws: ClientConnection) -> tuple[dict[str, Any], int | None]:
    """The error a refused connection gets, and its close code."""
    body = await _json(ws, 30)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 30)
    return body, ws.close_code


def _rows(django_db_blocker: Any, tenant: Any) -> list[tuple[str, int, str]]:
    """The tenant's usage rows: (endpoint, status, error code or "")."""
    with django_db_blocker.unblock():
        return sorted(
            (row.endpoint, row.status_code, row.error_code or "")
            for row in UsageLog.objects.filter(tenant=tenant)
        )


def _check_alignment_matches_audio(messages: list[dict[str, Any]], sample_rate: int, text: str) -> None:
    """Each message's alignment lies within its own audio; all of them spell the text."""
    chars: list[str] = []
    for body in messages:
        audio = base64.b64decode(body.get("audio") or "")
        seconds = len(audio) / 2 / sample_rate
        alignment = body.get("alignment")
        if not alignment:
            continue
        assert alignment == body["normalizedAlignment"]
        assert (
            len(alignment["chars"]) == len(alignment["charStartTimesMs"]) == len(alignment["charDurationsMs"])
        )
        end_ms = max(
            s + d for s, d in zip(alignment["charStartTimesMs"], alignment["charDurationsMs"], strict=True)
        )
        assert end_ms <= seconds * 1000 + 2, "an alignment reaches past its message's audio"
        chars += alignment["chars"]
    assert "".join(chars).strip() == text.strip()


# --- ElevenLabs multi-stream-input and stream-input ---


@pytest.mark.django_db(transaction=True)
def test_multi_stream_input_speaks_contexts_with_alignment_and_one_row_each(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "el-multi", **UNLIMITED) as (tenant, issued):

        async def main() -> None:
            url = _ws(server, "/v1/text-to-speech/joe/multi-stream-input?output_format=pcm_16000&model_id=x")
            async with connect(url, additional_headers={"xi-api-key": issued.plaintext}) as ws:
                await ws.send(json.dumps({"text": " ", "context_id": "a", "voice_settings": {"speed": 1.0}}))
                for piece in ("Thanks for ", "calling. Your table ", "is booked for eight. "):
                    await ws.send(json.dumps({"text": piece, "context_id": "a"}))
                await ws.send(json.dumps({"text": "", "context_id": "a"}))  # a keep-alive, not an end
                await ws.send(json.dumps({"context_id": "a", "flush": True}))
                await ws.send(json.dumps({"context_id": "a", "close_context": True}))
                messages = await _until_final(ws)
                assert {body.get("contextId") for body in messages} == {"a"}
                assert messages[-1] == {"isFinal": True, "contextId": "a"}
                _check_alignment_matches_audio(messages[:-1], 16000, SENTENCES)
                # A second context on the same socket, then the socket closes on request.
                await ws.send(json.dumps({"text": "Goodbye. ", "context_id": "b", "flush": True}))
                await ws.send(json.dumps({"context_id": "b", "close_context": True}))
                second = await _until_final(ws)
                assert second[-1]["contextId"] == "b"
                assert any(body.get("audio") for body in second)
                await ws.send(json.dumps({"close_socket": True}))
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 30)

        asyncio.run(main())
        expected = [("elevenlabs-multi-stream", 200, "")] * 2
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="a row per context")


@pytest.mark.django_db(transaction=True)
def test_stream_input_takes_the_key_in_the_first_message_and_ends_on_empty_text(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "el-single", **UNLIMITED) as (tenant, issued):

        async def main() -> None:
            url = _ws(server, "/v1/text-to-speech/joe/stream-input?output_format=ulaw_8000")
            async with connect(url) as ws:
                await ws.send(json.dumps({"text": " ", "xi_api_key": issued.plaintext}))
                await ws.send(json.dumps({"text": "Hello there. "}))
                await ws.send(json.dumps({"text": ""}))
                messages = await _until_final(ws)
                assert messages[-1] == {"isFinal": True}
                assert all("contextId" not in body for body in messages)
                audio = b"".join(base64.b64decode(body.get("audio") or "") for body in messages)
                assert len(audio) > 8000 * 0.3  # mu-law: a byte a sample
                with pytest.raises(ConnectionClosed):  # stream-input is one context: the socket ends
                    await asyncio.wait_for(ws.recv(), 30)
                assert ws.close_code == 1000

        asyncio.run(main())
        expected = [("elevenlabs-stream-input", 200, "")]
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="the row")


@pytest.mark.django_db(transaction=True)
def test_elevenlabs_refusals_come_in_its_shape_and_close_the_socket(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "el-refuse", **UNLIMITED) as (tenant, issued):
        good = {"xi-api-key": issued.plaintext}

        async def refused(path: str, headers: dict[str, str]) -> tuple[dict[str, Any], int | None]:
            async with connect(_ws(server, path), additional_headers=headers) as ws:
                return await _refusal(ws)

        async def main() -> None:
            base = "/v1/text-to-speech/joe/multi-stream-input"
            bad_key = await refused(base, {"xi-api-key": "cwt_live_notakey"})
            assert bad_key == ({"message": "The API key is not valid.", "error": "invalid_api_key"}, 4001)
            unknown_voice = await refused("/v1/text-to-speech/nobody/multi-stream-input", good)
            assert unknown_voice[0]["error"] == "voice_not_found"
            assert unknown_voice[1] == 4400
            bad_format = await refused(f"{base}?output_format=wav_44100", good)
            assert bad_format[0]["error"] == "unsupported_format"
            assert bad_format[1] == 4400
            key_in_url = await refused(f"{base}?xi-api-key={issued.plaintext}", {})
            assert key_in_url[0]["error"] == "api_key_in_url"
            assert key_in_url[1] == 4400
            # A bad message is an error in the dialect's shape; the connection stays.
            async with connect(_ws(server, base + "?output_format=pcm_16000"), additional_headers=good) as ws:
                await ws.send("{not json")
                assert (await _json(ws))["error"] == "malformed_json"
                await ws.send(json.dumps({"text": "x" * (settings.WS_MAX_MESSAGE_BYTES + 1)}))
                assert (await _json(ws))["error"] == "message_too_large"
                await ws.send(json.dumps({"text": 7, "context_id": "a"}))
                assert (await _json(ws)) == {
                    "message": "`text` must be a string.",
                    "error": "invalid_message",
                    "contextId": "a",
                }
                await ws.send(json.dumps({"text": "Still here. ", "context_id": "a", "flush": True}))
                await ws.send(json.dumps({"context_id": "a", "close_context": True}))
                assert (await _until_final(ws))[-1] == {"isFinal": True, "contextId": "a"}

        asyncio.run(main())
        expected = [("elevenlabs-multi-stream", 200, "")]
        wait_until(
            lambda: _rows(django_db_blocker, tenant) == expected, what="one row: refusals are not utterances"
        )


@pytest.mark.django_db(transaction=True)
def test_inactivity_timeout_closes_an_idle_socket_and_a_keep_alive_holds_it_open(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "el-idle", **UNLIMITED) as (_tenant, issued):

        async def main() -> None:
            url = _ws(server, "/v1/text-to-speech/joe/multi-stream-input?inactivity_timeout=2")
            async with connect(url, additional_headers={"xi-api-key": issued.plaintext}) as ws:
                for _ in range(3):  # keep-alives every second: 3 s without a close
                    await asyncio.sleep(1)
                    await ws.send(json.dumps({"text": ""}))
                started = asyncio.get_running_loop().time()
                body, code = await _refusal(ws)
                assert (body["error"], code) == ("idle_timeout", 4008)
                assert asyncio.get_running_loop().time() - started >= 1.0

        asyncio.run(main())


@pytest.mark.django_db(transaction=True)
def test_an_utterance_over_its_text_limit_ends_with_an_error_a_final_and_a_row(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "el-long", **UNLIMITED) as (tenant, issued):

        async def main() -> None:
            url = _ws(server, "/v1/text-to-speech/joe/multi-stream-input?output_format=pcm_16000")
            async with connect(url, additional_headers={"xi-api-key": issued.plaintext}) as ws:
                await ws.send(json.dumps({"text": " ", "context_id": "a"}))
                piece = "word " * 2000
                for _ in range(settings.MAX_TEXT_CHARS // len(piece) + 1):
                    await ws.send(json.dumps({"text": piece, "context_id": "a"}))
                messages = await _until_final(ws)
                errors = [body for body in messages if "error" in body]
                assert [body["error"] for body in errors] == ["text_too_long"]
                assert messages[-1] == {"isFinal": True, "contextId": "a"}

        asyncio.run(main())
        expected = [("elevenlabs-multi-stream", 400, "text_too_long")]
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="the row")


# --- ElevenLabs HTTP ---


@pytest.mark.django_db(transaction=True)
def test_http_text_to_speech_with_timestamps_streams_lines_and_errors_in_elevenlabs_shape(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "el-http", **UNLIMITED) as (tenant, issued):
        headers = {"xi-api-key": issued.plaintext}
        body = {"text": SENTENCES.strip(), "model_id": "eleven_flash_v2_5"}
        url = f"{server}/v1/text-to-speech/joe/stream/with-timestamps?output_format=pcm_22050"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            assert response.status_code == 200
            lines = [json.loads(line) for line in response.iter_lines() if line]
        audio = b"".join(base64.b64decode(line["audio_base64"]) for line in lines)
        seconds = len(audio) / 2 / 22050
        alignments = [line["alignment"] for line in lines if line["alignment"]]
        chars = [char for alignment in alignments for char in alignment["characters"]]
        ends = [end for alignment in alignments for end in alignment["character_end_times_seconds"]]
        assert "".join(chars) == SENTENCES.strip()
        assert ends == sorted(ends)
        assert ends[-1] <= seconds + 0.002

        whole = httpx.post(f"{server}/v1/text-to-speech/joe", json=body, headers=headers, timeout=60)
        assert whole.status_code == 200
        assert whole.headers["Content-Type"] == "audio/mpeg"

        unknown = httpx.post(f"{server}/v1/text-to-speech/nobody", json=body, headers=headers, timeout=60)
        assert unknown.status_code == 404
        assert unknown.json()["detail"]["status"] == "voice_not_found"
        bad_key = httpx.post(f"{server}/v1/text-to-speech/joe", json=body, headers={"xi-api-key": "nope"})
        assert bad_key.status_code == 401
        assert bad_key.json()["detail"]["status"] == "invalid_api_key"
        assert bad_key.headers["X-Request-ID"]

        expected = sorted([("elevenlabs-tts", 200, "")] * 2 + [("elevenlabs-tts", 404, "voice_not_found")])
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="a row per request")


# --- Cartesia ---


def _cartesia_request(context_id: str, transcript: str, *, more: bool, **extra: Any) -> str:
    return json.dumps(
        {
            "context_id": context_id,
            "transcript": transcript,
            "continue": more,
            "model_id": "sonic-2",
            "voice": {"mode": "id", "id": "joe"},
            "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000},
            "add_timestamps": True,
            **extra,
        }
    )


@pytest.mark.django_db(transaction=True)
def test_cartesia_contexts_stream_chunks_word_timestamps_and_done_and_cancel_stops_at_once(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "cartesia", **UNLIMITED) as (tenant, issued):

        async def main() -> None:
            headers = {"X-API-Key": issued.plaintext, "Cartesia-Version": "2025-04-16"}
            async with connect(_ws(server, "/tts/websocket"), additional_headers=headers) as ws:
                await ws.send(_cartesia_request("one", "Thanks for calling.", more=True))
                await ws.send(_cartesia_request("one", " Your table is booked for eight.", more=False))
                messages = await _until_final(ws, "done")
                assert messages[-1] == {"type": "done", "done": True, "status_code": 200, "context_id": "one"}
                audio = b"".join(base64.b64decode(m["data"]) for m in messages if m["type"] == "chunk")
                seconds = len(audio) / 2 / 16000
                words: list[str] = []
                for body in messages:
                    if body["type"] == "timestamps":
                        stamps = body["word_timestamps"]
                        words += stamps["words"]
                        assert all(
                            0 <= s <= e <= seconds + 0.002
                            for s, e in zip(stamps["start"], stamps["end"], strict=True)
                        )
                assert " ".join(words) == "Thanks for calling. Your table is booked for eight."

                # Barge-in: cancel after the first chunk; `done` follows and nothing of it after.
                long_text = " ".join(f"Sentence number {n} goes on for a while." for n in range(30))
                await ws.send(_cartesia_request("two", long_text, more=False))
                while (await _json(ws))["type"] != "chunk":
                    pass
                await ws.send(json.dumps({"context_id": "two", "cancel": True}))
                after = await _until_final(ws, "done")
                assert after[-1]["context_id"] == "two"
                await ws.send(_cartesia_request("three", "Yes.", more=False))
                rest = await _until_final(ws, "done")
                assert {body["context_id"] for body in rest} == {"three"}, "audio of a cancelled context"

                # An unknown voice is an error for its context; the connection stays.
                bad = json.loads(_cartesia_request("four", "Hi.", more=False))
                bad["voice"]["id"] = "nobody"
                await ws.send(json.dumps(bad))
                error = await _json(ws)
                assert (error["type"], error["code"], error["status_code"], error["context_id"]) == (
                    "error",
                    "voice_not_found",
                    404,
                    "four",
                )

            async with connect(_ws(server, "/tts/websocket"), additional_headers={"X-API-Key": "x"}) as ws:
                body, code = await _refusal(ws)
                assert (body["type"], body["code"], body["status_code"], code) == (
                    "error",
                    "invalid_api_key",
                    401,
                    4001,
                )

        asyncio.run(main())
        expected = sorted(
            [
                ("cartesia-websocket", 200, ""),
                ("cartesia-websocket", 200, "cancelled"),
                ("cartesia-websocket", 200, ""),
                ("cartesia-websocket", 404, "voice_not_found"),
            ]
        )
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="a row per context")


# --- Estimated timings: XTTS streams a sentence in several chunks ---


@pytest.fixture(scope="module")
def xtts_server(xtts_checkpoint: Path, service_env: ServiceEnv) -> Iterator[str]:
    env = service_env(
        TTS_ENGINE="xtts",
        XTTS_MODEL_PATH=str(xtts_checkpoint),
        XTTS_DEVICE="cpu",
        XTTS_STREAM_CHUNK_TOKENS="4",  # several chunks a sentence
        XTTS_MAX_AUDIO_TOKENS="12",
        XTTS_DETERMINISTIC="1",
    )
    with daphne_server(env, startup_timeout=120) as base_url:
        yield base_url


@pytest.mark.django_db(transaction=True)
def test_xtts_chunks_carry_estimated_alignment_within_their_audio(
    xtts_server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "el-xtts", **UNLIMITED) as (tenant, issued):

        async def main() -> list[dict[str, Any]]:
            query = "output_format=pcm_24000&sync_alignment=false"
            url = _ws(xtts_server, f"/v1/text-to-speech/ana-florence/multi-stream-input?{query}")
            async with connect(url, additional_headers={"xi-api-key": issued.plaintext}) as ws:
                await ws.send(json.dumps({"text": SENTENCES, "context_id": "x", "flush": True}))
                await ws.send(json.dumps({"context_id": "x", "close_context": True}))
                return await _until_final(ws)

        messages = asyncio.run(main())
        audio_messages = [body for body in messages if body.get("audio")]
        assert len(audio_messages) > 2, "XTTS streamed each sentence in one chunk"
        _check_alignment_matches_audio(messages[:-1], 24000, SENTENCES)
        expected = [("elevenlabs-multi-stream", 200, "")]
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="the row")


@pytest.mark.django_db(transaction=True)
def test_inactivity_timeout_spares_a_socket_whose_context_still_holds_text(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "el-holding", **UNLIMITED) as (_tenant, issued):

        async def main() -> None:
            url = _ws(
                server,
                "/v1/text-to-speech/joe/multi-stream-input?inactivity_timeout=1&output_format=pcm_16000",
            )
            async with connect(url, additional_headers={"xi-api-key": issued.plaintext}) as ws:
                await ws.send(json.dumps({"text": " ", "context_id": "a"}))
                await ws.send(json.dumps({"text": "Your table is booked", "context_id": "a"}))
                # Three times the timeout without a message: the context waits with its text,
                # which is not inactivity. Nothing has been said yet (no clause has ended).
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(ws.recv(), 3)
                await ws.send(json.dumps({"context_id": "a", "flush": True}))
                await ws.send(json.dumps({"context_id": "a", "close_context": True}))
                messages = await _until_final(ws)
                assert any(body.get("audio") for body in messages)
                assert messages[-1] == {"isFinal": True, "contextId": "a"}

        asyncio.run(main())


@pytest.mark.django_db(transaction=True)
def test_elevenlabs_voice_settings_of_the_wrong_type_or_range_draw_invalid_voice_settings(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "el-settings", **UNLIMITED) as (tenant, issued):

        async def main() -> None:
            url = _ws(server, "/v1/text-to-speech/joe/multi-stream-input?output_format=pcm_16000")
            async with connect(url, additional_headers={"xi-api-key": issued.plaintext}) as ws:
                for bad in (
                    {"speed": "fast"},
                    {"speed": 9},
                    {"stability": 1.5},
                    {"similarity_boost": -0.1},
                    {"style": True},
                    {"use_speaker_boost": "yes"},
                    "loud",
                ):
                    await ws.send(json.dumps({"text": "Hello. ", "context_id": "a", "voice_settings": bad}))
                    body = await _json(ws)
                    assert (body["error"], body["contextId"]) == ("invalid_voice_settings", "a"), bad
                # Good settings (ElevenLabs' whole set) open the context; the connection stayed.
                good = {
                    "stability": 0.5,
                    "similarity_boost": 0.8,
                    "style": 0,
                    "use_speaker_boost": True,
                    "speed": 1.1,
                }
                await ws.send(
                    json.dumps({"text": "Hello. ", "context_id": "a", "voice_settings": good, "flush": True})
                )
                await ws.send(json.dumps({"context_id": "a", "close_context": True}))
                messages = await _until_final(ws)
                assert not [body for body in messages if "error" in body]
                assert any(body.get("audio") for body in messages)

        asyncio.run(main())
        with httpx.Client(timeout=60) as client:
            answer = client.post(
                f"{server}/v1/text-to-speech/joe",
                headers={"xi-api-key": issued.plaintext},
                json={"text": "Hello.", "voice_settings": {"stability": 2}},
            )
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_voice_settings"
        expected = [("elevenlabs-multi-stream", 200, "")]
        wait_until(lambda: _rows(django_db_blocker, tenant)[:1] == expected, what="the spoken context's row")


@pytest.mark.django_db(transaction=True)
def test_cartesia_flush_speaks_what_the_context_holds_before_it_ends(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "cartesia-flush", **UNLIMITED) as (_tenant, issued):

        async def main() -> None:
            headers = {"X-API-Key": issued.plaintext}
            async with connect(_ws(server, "/tts/websocket"), additional_headers=headers) as ws:
                # No sentence end: held until more comes, or a flush.
                await ws.send(_cartesia_request("f", "Your table is booked for", more=True))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(ws.recv(), 2)
                await ws.send(_cartesia_request("f", "", more=True, flush=True))
                chunk = await _json(ws)
                assert (chunk["type"], chunk["context_id"]) == ("chunk", "f")
                # The context is still open: more text, then its end.
                await ws.send(_cartesia_request("f", " eight.", more=False))
                messages = await _until_final(ws, "done")
                assert messages[-1]["type"] == "done"
                await ws.send(_cartesia_request("g", "Hi", more=True, flush="yes"))
                error = await _json(ws)
                assert (error["type"], error["code"]) == ("error", "invalid_message")

        asyncio.run(main())
