"""Character timings that travel with their audio (engines.base.AudioChunk carries the words
of its chunk; every door reads them from there), through a real Daphne and Piper.

The cases that used to go wrong when timings were matched to audio by position:
- a first sentence longer than the quick first chunk (FIRST_CHUNK_WORDS): the ElevenLabs
  with-timestamps route put the whole sentence on the first chunk's audio, the next
  sentence on the second chunk's, and nothing on the third;
- a 1 ms SSML break, a chunk the encoder turns into no bytes at all: every later chunk got
  the word spans of the one before it, and the alignment spelled the markup's tags.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import committed_tenant

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
FIRST_CHUNK_WORDS = 4
LONG_FIRST = "Thanks for calling the booking line of the little harbour restaurant on the quay."
SECOND = "Your table is booked for eight."
# Characters may end a rounding step past their audio's end.
SLACK_S = 0.002


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv) -> Iterator[str]:
    with daphne_server(service_env(FIRST_CHUNK_WORDS=str(FIRST_CHUNK_WORDS))) as base_url:
        yield base_url


def _words(chars: list[str]) -> list[str]:
    return re.findall(r"\S+", "".join(chars))


def test_with_timestamps_puts_each_chunks_characters_on_that_chunks_audio(
    server: str, django_db_blocker: Any
) -> None:
    text = f"{LONG_FIRST} {SECOND}"
    with committed_tenant(django_db_blocker, "timings-http", **UNLIMITED) as (_tenant, issued):
        url = f"{server}/v1/text-to-speech/joe/stream/with-timestamps?output_format=pcm_16000"
        body = {"text": text, "model_id": "eleven_flash_v2_5"}
        with httpx.stream(
            "POST", url, json=body, headers={"xi-api-key": issued.plaintext}, timeout=120
        ) as answer:
            assert answer.status_code == 200
            lines = [json.loads(line) for line in answer.iter_lines() if line]
    heard: list[list[str]] = []
    start_s = 0.0
    for line in lines:
        end_s = start_s + len(base64.b64decode(line["audio_base64"])) / 2 / 16000
        if alignment := line["alignment"]:
            starts = alignment["character_start_times_seconds"]
            ends = alignment["character_end_times_seconds"]
            # Every character is timed inside the audio of the line that carries it.
            assert starts[0] >= start_s - SLACK_S
            assert ends[-1] <= end_s + SLACK_S
            heard.append(_words(alignment["characters"]))
        start_s = end_s
    assert " ".join(word for words in heard for word in words) == text
    # Three engine chunks: the quick opening, the rest of the first sentence, the second.
    first_words = LONG_FIRST.split()
    assert heard == [first_words[:FIRST_CHUNK_WORDS], first_words[FIRST_CHUNK_WORDS:], SECOND.split()]


def test_a_socket_after_a_one_millisecond_break_keeps_each_chunks_words_and_spells_no_markup(
    server: str, django_db_blocker: Any
) -> None:
    spoken = f"Hello. {SECOND} Goodbye now."
    document = f'<speak>Hello. <break time="1ms"/> {SECOND} Goodbye now.</speak>'
    with committed_tenant(django_db_blocker, "timings-ws", **UNLIMITED) as (_tenant, issued):

        async def main() -> list[dict[str, Any]]:
            url = (
                server.replace("http://", "ws://")
                + "/v1/text-to-speech/joe/stream-input?output_format=pcm_16000"
            )
            async with connect(url, additional_headers={"xi-api-key": issued.plaintext}) as ws:
                await ws.send(json.dumps({"text": " "}))
                await ws.send(json.dumps({"text": document, "flush": True}))
                await ws.send(json.dumps({"text": ""}))
                messages = []
                while not (message := json.loads(await asyncio.wait_for(ws.recv(), 120))).get("isFinal"):
                    assert "error" not in message, message
                    messages.append(message)
                return messages

        messages = asyncio.run(main())
    chars: list[str] = []
    for message in messages:
        if alignment := message.get("alignment"):
            seconds = len(base64.b64decode(message["audio"])) / 2 / 16000
            # Each message's times are its own (from the start of its audio), inside it.
            message_ends = [
                start + duration
                for start, duration in zip(
                    alignment["charStartTimesMs"], alignment["charDurationsMs"], strict=True
                )
            ]
            assert max(message_ends) <= seconds * 1000 + 2
            chars += alignment["chars"]
    assert _words(chars) == spoken.split()
