"""WS /v1/stream in-process, with Channels' WebsocketCommunicator against the real
ASGI application (Piper, Redis channel layer, Postgres). tests/e2e/test_stream_e2e.py
drives it through Daphne."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator

from tenants.models import Tenant
from tests.support.tenants import TenantFactory
from usage.models import UsageLog
from usage.recorder import usage_flush

# The consumer's ORM calls run in other threads: committed data, no test transaction.
pytestmark = pytest.mark.django_db(transaction=True)

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
LONG = " ".join(f"Part {n} of an answer the caller interrupts." for n in range(40))


@dataclass
class Received:
    """Everything a client got, in order."""

    events: list[dict[str, Any]] = field(default_factory=list)
    audio: dict[str, bytearray] = field(default_factory=dict)
    order: list[tuple[str, str]] = field(default_factory=list)  # ("audio"|event type, context_id)
    close_code: int | None = None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event.get("type") == kind]


class StreamClient:
    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator
        self.received = Received()

    async def send(self, **message: Any) -> None:
        await self.communicator.send_to(text_data=json.dumps(message))

    async def send_raw(self, *, text: str | None = None, binary: bytes | None = None) -> None:
        await self.communicator.send_to(text_data=text, bytes_data=binary)

    # Generous bounds (a loaded machine's first engine load, a long render): a hang still fails.
    async def next(self, wait_s: float = 60) -> tuple[str, Any]:
        message = await self.communicator.receive_output(wait_s)
        if message["type"] == "websocket.close":
            self.received.close_code = message.get("code")
            return "close", message.get("code")
        if message.get("bytes") is not None:
            from synthesis.stream.protocol import parse_labelled_frame

            context_id, audio = parse_labelled_frame(message["bytes"])
            self.received.audio.setdefault(context_id, bytearray()).extend(audio)
            self.received.order.append(("audio", context_id))
            return "audio", (context_id, audio)
        event = json.loads(message["text"])
        self.received.events.append(event)
        self.received.order.append((event.get("type") or event.get("event"), event.get("context_id")))
        return "event", event

    async def until(self, done: Callable[[str, Any], bool], wait_s: float = 90) -> None:
        async def wait() -> None:
            while True:
                kind, value = await self.next()
                if done(kind, value):
                    return

        await asyncio.wait_for(wait(), wait_s)

    async def until_event(self, kind: str, context_id: str | None = None) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def match(what: str, value: Any) -> bool:
            if what == "close":
                raise AssertionError(f"closed ({value}) while waiting for {kind}: {self.received.events}")
            if (
                what == "event"
                and value.get("type") == kind
                and (context_id is None or value.get("context_id") == context_id)
            ):
                found.append(value)
                return True
            return False

        await self.until(match)
        return found[0]

    async def nothing_more(self, seconds: float = 0.7) -> bool:
        return bool(await self.communicator.receive_nothing(seconds))


def _app() -> Any:
    from callwaiting_tts.asgi import application

    return application


def run_stream(
    scenario: Callable[[StreamClient], Awaitable[None]],
    *,
    key: str | None = None,
    path: str = "/v1/stream",
) -> Received:
    async def main() -> Received:
        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        communicator = WebsocketCommunicator(_app(), path, headers=headers)
        connected, _ = await communicator.connect()
        assert connected
        client = StreamClient(communicator)
        try:
            await scenario(client)
        finally:
            await communicator.disconnect()
        return client.received

    return asyncio.run(main())


@pytest.fixture
def tenant_key(make_tenant: TenantFactory) -> tuple[Tenant, str]:
    tenant, issued = make_tenant(**UNLIMITED)
    return tenant, issued.plaintext


# --- Authentication -----------------------------------------------------------------------


def test_header_authentication_gets_ready_and_an_utterance_speaks(tenant_key: tuple[Tenant, str]) -> None:
    tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        ready = await client.until_event("ready")
        assert ready["connection_id"]
        await client.send(type="synthesize", context_id="a", text="Hello from the stream.", format="pcm")
        await client.until_event("audio_end", "a")

    received = run_stream(scenario, key=key)
    [start] = received.of("audio_start")
    [end] = received.of("audio_end")
    assert (start["context_id"], start["format"], start["sample_rate"]) == ("a", "pcm", 24000)
    assert end["request_id"] == start["request_id"]
    assert end["cancelled"] is False
    assert end["audio_bytes"] == len(received.audio["a"]) > 10_000
    assert end["audio_seconds"] == pytest.approx(len(received.audio["a"]) / 2 / 24000, abs=1e-3)
    # audio_start comes before the first frame of its context
    assert received.order.index(("audio_start", "a")) < received.order.index(("audio", "a"))
    usage_flush()
    [row] = UsageLog.objects.filter(tenant=tenant)
    assert (row.endpoint, row.request_id, row.status_code, row.error_code) == (
        "stream",
        end["request_id"],
        200,
        None,
    )
    assert (row.audio_bytes, row.input_chars, row.streaming) == (end["audio_bytes"], 22, True)


def test_first_message_authentication(tenant_key: tuple[Tenant, str]) -> None:
    _tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.send(type="start", context_id="a")  # anything before auth is refused
        refused = await client.until_event("error")
        assert refused["code"] == "auth_required"
        await client.send(type="auth", api_key=key)
        await client.until_event("ready")
        await client.send(type="synthesize", context_id="a", text="Signed in by message.")
        await client.until_event("audio_end", "a")

    received = run_stream(scenario)
    assert len(received.audio["a"]) > 0


@pytest.mark.parametrize(
    ("key", "code"),
    [
        ("cwt_nope", "invalid_api_key"),
        ("cwt_abcdefgh_" + "x" * 32, "invalid_api_key"),
    ],
)
def test_a_bad_key_gets_an_error_and_close_4001(db: None, key: str, code: str) -> None:
    async def scenario(client: StreamClient) -> None:
        await client.until(lambda kind, _value: kind == "close")

    received = run_stream(scenario, key=key)
    assert received.of("error")[0]["code"] == code
    assert received.close_code == 4001


def test_a_revoked_key_and_a_first_message_bad_key_close_4001(make_tenant: TenantFactory) -> None:
    from tenants.services import api_key_revoke

    _tenant, issued = make_tenant(**UNLIMITED)
    api_key_revoke(api_key=issued.api_key)

    async def header(client: StreamClient) -> None:
        await client.until(lambda kind, _value: kind == "close")

    assert run_stream(header, key=issued.plaintext).close_code == 4001

    async def first_message(client: StreamClient) -> None:
        await client.send(type="auth", api_key=issued.plaintext)
        await client.until(lambda kind, _value: kind == "close")

    received = run_stream(first_message)
    assert (received.of("error")[0]["code"], received.close_code) == ("revoked_api_key", 4001)


def test_no_authentication_in_time_closes_4001(db: None, settings: Any) -> None:
    settings.WS_AUTH_SECONDS = 0.5

    async def scenario(client: StreamClient) -> None:
        await client.until(lambda kind, _value: kind == "close", wait_s=5)

    received = run_stream(scenario)
    assert (received.of("error")[0]["code"], received.close_code) == ("auth_timeout", 4001)


def test_a_key_in_the_url_is_refused(tenant_key: tuple[Tenant, str]) -> None:
    _tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.until(lambda kind, _value: kind == "close")

    received = run_stream(scenario, path=f"/v1/stream?api_key={key}")
    assert (received.of("error")[0]["code"], received.close_code) == ("api_key_in_url", 4001)


def test_a_connection_over_the_stream_cap_is_refused_4029(make_tenant: TenantFactory) -> None:
    _tenant, issued = make_tenant(rate_limit_minute=0, rate_limit_hour=0, max_concurrent_streams=1)

    async def main() -> tuple[int | None, str]:
        headers = [(b"authorization", f"Bearer {issued.plaintext}".encode())]
        first = WebsocketCommunicator(_app(), "/v1/stream", headers=headers)
        second = WebsocketCommunicator(_app(), "/v1/stream", headers=headers)
        await first.connect()
        assert json.loads((await first.receive_output(10))["text"])["type"] == "ready"
        await second.connect()
        error = json.loads((await second.receive_output(10))["text"])
        closed = await second.receive_output(10)
        await first.disconnect()
        # the slot is free again
        third = WebsocketCommunicator(_app(), "/v1/stream", headers=headers)
        await third.connect()
        assert json.loads((await third.receive_output(10))["text"])["type"] == "ready"
        await third.disconnect()
        return closed.get("code"), error["code"]

    assert asyncio.run(main()) == (4029, "stream_limit")


# --- Incremental text, flush, cancel, contexts ------------------------------------------------


def test_audio_starts_before_the_utterance_ends(tenant_key: tuple[Tenant, str]) -> None:
    _tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        await client.send(type="start", context_id="llm", format="pcm")
        for token in ["Sure", ",", " let", " me", " check", " that", ".", " One"]:
            await client.send(type="text", context_id="llm", text=token)
        # The first clause is complete ("... check that. "): audio comes with no `end` sent.
        await client.until(lambda kind, value: kind == "audio" and value[0] == "llm")
        assert not client.received.of("audio_end")
        await client.send(type="text", context_id="llm", text=" moment please.")
        await client.send(type="end", context_id="llm")
        await client.until_event("audio_end", "llm")

    received = run_stream(scenario, key=key)
    assert received.of("audio_end")[0]["audio_bytes"] == len(received.audio["llm"])


def test_flush_speaks_an_unfinished_clause(tenant_key: tuple[Tenant, str]) -> None:
    _tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        await client.send(type="start", context_id="f")
        await client.send(type="text", context_id="f", text="No punctuation yet")
        assert await client.nothing_more(1.0)  # waiting for the clause to end
        await client.send(type="flush", context_id="f")
        await client.until(lambda kind, value: kind == "audio" and value[0] == "f")
        await client.send(type="end", context_id="f")
        await client.until_event("audio_end", "f")

    assert len(run_stream(scenario, key=key).audio["f"]) > 0


def test_cancel_stops_audio_at_once_and_the_row_counts_what_was_sent(tenant_key: tuple[Tenant, str]) -> None:
    tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        await client.send(type="synthesize", context_id="long", text=LONG, format="pcm")
        await client.until(lambda kind, value: kind == "audio" and value[0] == "long")
        await client.send(type="cancel", context_id="long")
        ended = await client.until_event("audio_end", "long")
        assert ended["cancelled"] is True
        at_ack = len(client.received.audio["long"])
        assert await client.nothing_more(1.0)  # no frame of it after the acknowledgement
        assert len(client.received.audio["long"]) == at_ack
        # the connection goes on
        await client.send(type="synthesize", context_id="next", text="Still here.")
        await client.until_event("audio_end", "next")

    received = run_stream(scenario, key=key)
    cancelled = received.of("audio_end")[0]
    assert cancelled["audio_bytes"] == len(received.audio["long"])
    usage_flush()
    rows = {row.request_id: row for row in UsageLog.objects.filter(tenant=tenant)}
    row = rows[cancelled["request_id"]]
    assert (row.error_code, row.audio_bytes) == ("cancelled", cancelled["audio_bytes"])
    assert row.audio_seconds == pytest.approx(row.audio_bytes / 2 / 24000, abs=1e-3)
    assert len(rows) == 2


def test_two_interleaved_contexts_each_get_their_own_audio(tenant_key: tuple[Tenant, str]) -> None:
    _tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        await client.send(type="start", context_id="one", format="wav")
        await client.send(type="start", context_id="two", format="mp3")
        await client.send(type="text", context_id="one", text="The first voice speaks. ")
        await client.send(type="text", context_id="two", text="The second voice answers. ")
        await client.send(type="text", context_id="one", text="And goes on.")
        await client.send(type="end", context_id="two")
        await client.send(type="end", context_id="one")
        await client.until_event("audio_end", "one")
        if not any(event["context_id"] == "two" for event in client.received.of("audio_end")):
            await client.until_event("audio_end", "two")

    received = run_stream(scenario, key=key)
    ends = {event["context_id"]: event for event in received.of("audio_end")}
    assert bytes(received.audio["one"][:4]) == b"RIFF"
    assert ends["one"]["audio_bytes"] == len(received.audio["one"])
    assert ends["two"]["audio_bytes"] == len(received.audio["two"])
    import miniaudio

    for context_id in ("one", "two"):
        decoded = miniaudio.decode(bytes(received.audio[context_id]))
        assert decoded.duration == pytest.approx(ends[context_id]["audio_seconds"], abs=0.1)


# --- Malformed messages and limits ----------------------------------------------------------


MALFORMED: list[tuple[str, Any, str]] = [
    ("not json", "{type: start", "malformed_json"),
    ("a list", "[1, 2]", "malformed_message"),
    ("no type", {"context_id": "a"}, "unknown_type"),
    ("unknown type", {"type": "speak", "context_id": "a"}, "unknown_type"),
    ("no context id", {"type": "start"}, "invalid_context_id"),
    ("bad context id", {"type": "start", "context_id": "a b/c"}, "invalid_context_id"),
    ("long context id", {"type": "start", "context_id": "x" * 65}, "invalid_context_id"),
    ("text for nothing", {"type": "text", "context_id": "ghost", "text": "Hi."}, "unknown_context"),
    ("cancel nothing", {"type": "cancel", "context_id": "ghost"}, "unknown_context"),
    ("bad format", {"type": "start", "context_id": "a", "format": "aiff"}, "unsupported_format"),
    ("bad rate", {"type": "start", "context_id": "a", "sample_rate": 7}, "unsupported_sample_rate"),
    ("rate as text", {"type": "start", "context_id": "a", "sample_rate": "8000"}, "invalid_request"),
    ("bad speed", {"type": "start", "context_id": "a", "speed": 9}, "invalid_speed"),
    ("unknown voice", {"type": "start", "context_id": "a", "voice_id": "nobody"}, "voice_not_found"),
    ("twilio without sid", {"type": "start", "context_id": "a", "format": "twilio"}, "missing_stream_sid"),
    ("text not a string", {"type": "synthesize", "context_id": "a", "text": 5}, "invalid_message"),
    ("empty synthesize", {"type": "synthesize", "context_id": "a", "text": " "}, "empty_text"),
    ("punctuation synthesize", {"type": "synthesize", "context_id": "a", "text": "...!!!???"}, "empty_text"),
    ("binary frame", b"\x00\x01", "unsupported_frame"),
    ("too large", {"type": "text", "context_id": "a", "text": "x" * 70_000}, "message_too_large"),
    ("nested arrays", "[" * 30_000, "nesting_too_deep"),
    ("nested objects", '{"a":' * 12_000, "nesting_too_deep"),
    (
        "nested SSML",
        {"type": "synthesize", "context_id": "a", "text": f"<speak>{'<p>' * 300}Hi{'</p>' * 300}</speak>"},
        "invalid_ssml",
    ),
]


@pytest.mark.parametrize(("case", "message", "code"), MALFORMED, ids=[case for case, _m, _c in MALFORMED])
def test_a_malformed_message_is_an_error_event_and_the_connection_stays_usable(
    tenant_key: tuple[Tenant, str], case: str, message: Any, code: str
) -> None:
    _tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        if isinstance(message, bytes):
            await client.send_raw(binary=message)
        elif isinstance(message, str):
            await client.send_raw(text=message)
        else:
            await client.send(**message)
        error = await client.until_event("error")
        assert error["code"] == code, error
        assert error["message"]
        await client.send(type="synthesize", context_id="after", text="Still fine.")
        await client.until_event("audio_end", "after")

    received = run_stream(scenario, key=key)
    assert received.close_code is None


def test_an_utterance_that_ends_having_said_nothing_is_an_empty_text_error(
    tenant_key: tuple[Tenant, str],
) -> None:
    tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        # Pieces of only punctuation are skipped as they come; the utterance keeps going.
        await client.send(type="start", context_id="said")
        for piece in ("... ", "Hello there. ", "!!! ", "Bye."):
            await client.send(type="text", context_id="said", text=piece)
        await client.send(type="end", context_id="said")
        assert (await client.until_event("audio_end", "said"))["audio_bytes"] > 0
        # Nothing but punctuation and markup, to the end: an error, then audio_end.
        await client.send(type="start", context_id="mute")
        for piece in ("... ", "?!? ", "<speak><break time='200ms'/></speak>"):
            await client.send(type="text", context_id="mute", text=piece)
        await client.send(type="end", context_id="mute")
        error = await client.until_event("error", "mute")
        assert error["code"] == "empty_text"
        end = await client.until_event("audio_end", "mute")
        assert (end["cancelled"], end["audio_bytes"]) == (False, 0)

    received = run_stream(scenario, key=key)
    assert [kind for kind, context in received.order if context == "mute"] == ["error", "audio_end"]
    usage_flush()
    row = UsageLog.objects.get(tenant=tenant, request_id=received.of("error")[-1]["request_id"])
    assert (row.status_code, row.error_code, row.audio_bytes) == (400, "empty_text", 0)


def test_context_rules_duplicate_ended_too_many_and_too_much_text(
    tenant_key: tuple[Tenant, str], settings: Any
) -> None:
    settings.WS_MAX_CONTEXTS = 2
    settings.MAX_TEXT_CHARS = 100
    _tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        await client.send(type="start", context_id="a")
        await client.send(type="start", context_id="a")
        assert (await client.until_event("error"))["code"] == "context_exists"
        await client.send(type="start", context_id="b")
        await client.send(type="start", context_id="c")
        assert (await client.until_event("error"))["code"] == "too_many_contexts"
        await client.send(type="text", context_id="b", text="y" * 101)
        too_long = await client.until_event("error")
        assert (too_long["code"], too_long["context_id"]) == ("text_too_long", "b")
        await client.send(type="text", context_id="b", text="gone")  # b was closed by the error
        assert (await client.until_event("error"))["code"] == "unknown_context"
        await client.send(type="text", context_id="a", text="Done.")
        await client.send(type="end", context_id="a")
        await client.send(type="text", context_id="a", text="More?")
        # either still speaking (context_ended) or already finished (unknown_context)
        assert (await client.until_event("error"))["code"] in ("context_ended", "unknown_context")
        await client.until_event("audio_end", "a")

    run_stream(scenario, key=key)


def test_an_idle_connection_closes_4008(tenant_key: tuple[Tenant, str], settings: Any) -> None:
    settings.WS_IDLE_SECONDS = 1.0
    _tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        await client.until(lambda kind, _value: kind == "close", wait_s=10)

    received = run_stream(scenario, key=key)
    assert (received.of("error")[0]["code"], received.close_code) == ("idle_timeout", 4008)


def test_rate_limits_and_quotas_apply_per_utterance(make_tenant: TenantFactory) -> None:
    tenant, issued = make_tenant(
        rate_limit_minute=1, rate_limit_hour=0, quota_minutes=0, max_concurrent_streams=0
    )

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        await client.send(type="synthesize", context_id="a", text="One.")
        await client.until_event("audio_end", "a")
        await client.send(type="synthesize", context_id="b", text="Two.")
        refused = await client.until_event("error")
        assert (refused["code"], refused["context_id"]) == ("rate_limited", "b")

    run_stream(scenario, key=issued.plaintext)
    usage_flush()
    rows = UsageLog.objects.filter(tenant=tenant).order_by("created_at")
    assert [(row.status_code, row.error_code) for row in rows] == [(200, None), (429, "rate_limited")]


# --- Twilio media streams ----------------------------------------------------------------


def test_twilio_mode_sends_exactly_what_twilio_accepts(tenant_key: tuple[Tenant, str]) -> None:
    _tenant, key = tenant_key
    sid = "MZ0123456789abcdef0123456789abcdef"

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        await client.send(
            type="synthesize",
            context_id="utt-1",
            text="Your table is booked.",
            format="twilio",
            stream_sid=sid,
        )
        await client.until_event("audio_end", "utt-1")
        await client.send(type="synthesize", context_id="utt-2", text=LONG, format="twilio", stream_sid=sid)
        await client.until(
            lambda kind, value: (
                kind == "event"
                and value.get("event") == "media"
                and len(client.received.of("audio_start")) == 2
            )
        )
        await client.send(type="cancel", context_id="utt-2")
        await client.until_event("audio_end", "utt-2")

    received = run_stream(scenario, key=key)
    twilio = [event for event in received.events if "event" in event]
    media = [event for event in twilio if event["event"] == "media"]
    assert media
    audio = b""
    for event in media:
        assert set(event) == {"event", "streamSid", "media"}
        assert set(event["media"]) == {"payload"}
        assert event["streamSid"] == sid
        payload = base64.b64decode(event["media"]["payload"], validate=True)
        assert payload
        assert len(payload) % 160 == 0  # whole 20 ms frames of 8 kHz mu-law
        audio += payload
    assert not audio.startswith(b"RIFF")  # raw, no header
    assert not received.audio  # no binary frames in Twilio mode
    marks = [event for event in twilio if event["event"] == "mark"]
    assert marks == [{"event": "mark", "streamSid": sid, "mark": {"name": "utt-1"}}]
    clears = [event for event in twilio if event["event"] == "clear"]
    assert clears == [{"event": "clear", "streamSid": sid}]
    # the mark follows utt-1's audio, the clear comes after utt-2's last media
    kinds = [kind for kind, _context in received.order]
    assert kinds.index("mark") < max(i for i, kind in enumerate(kinds) if kind == "media")
    assert kinds.index("clear") > max(i for i, kind in enumerate(kinds) if kind == "media")
    first_end = received.of("audio_end")[0]
    assert first_end["audio_seconds"] == pytest.approx(first_end["audio_bytes"] / 8000, abs=1e-3)


def test_deactivating_the_tenant_closes_its_open_streams_4003(make_tenant: TenantFactory) -> None:
    from tenants.services import tenant_set_active

    tenant, issued = make_tenant(**UNLIMITED)

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        await client.send(type="synthesize", context_id="busy", text=LONG)
        await client.until_event("audio_start", "busy")
        await asyncio.to_thread(tenant_set_active, tenants=Tenant.objects.filter(pk=tenant.pk), active=False)
        await client.until(lambda kind, _value: kind == "close", wait_s=5)

    received = run_stream(scenario, key=issued.plaintext)
    assert (received.of("error")[-1]["code"], received.close_code) == ("tenant_inactive", 4003)
    usage_flush()
    [row] = UsageLog.objects.filter(tenant=tenant)
    assert row.error_code == "tenant_inactive"
    assert row.audio_bytes == len(received.audio["busy"])


# --- Nothing leaks, whatever fails --------------------------------------------------------------


def _state() -> tuple[int, int]:
    from synthesis.stream.stats import stream_stats

    return stream_stats.connections, stream_stats.utterances_active


def test_nested_json_before_authentication_is_an_error_event_and_auth_still_works(
    tenant_key: tuple[Tenant, str],
) -> None:
    _tenant, key = tenant_key

    async def scenario(client: StreamClient) -> None:
        await client.send_raw(text="[" * 30_000)
        assert (await client.until_event("error"))["code"] == "nesting_too_deep"
        await client.send(type="auth", api_key=key)
        await client.until_event("ready")

    run_stream(scenario)


FAILING_STAGES = {
    # where the exception is raised: (object, attribute, after how many successful calls)
    "plan": ("synthesis.services.SynthesisSetup", "plan_segments", 0),
    "engine before the first chunk": ("engines.piper.PiperEngine", "stream", 0),
    "encoder mid-stream": ("synthesis.audio.AudioEncoder", "push", 1),
    # Raised only after the whole text is spoken: a short one (LONG took over the wait on a
    # loaded machine).
    "encoder at the end": ("synthesis.audio.AudioEncoder", "finish", 0),
    "send mid-stream": ("synthesis.stream.consumer.StreamConsumer", "send", 1),
}


@pytest.mark.parametrize("stage", list(FAILING_STAGES))
def test_an_exception_at_any_stage_ends_the_utterance_with_an_error_a_row_and_nothing_held(
    make_tenant: TenantFactory, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    """Fault injection: the stage raises a plain exception (a bug, not a refusal)."""
    import importlib

    tenant, issued = make_tenant(
        rate_limit_minute=0, rate_limit_hour=0, quota_minutes=0, max_concurrent_streams=1
    )
    target, attribute, good_calls = FAILING_STAGES[stage]
    module_name, class_name = target.rsplit(".", 1)
    owner = getattr(importlib.import_module(module_name), class_name)
    original = getattr(owner, attribute)
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == good_calls + 1:  # once: a bug, or one message the transport refused
            raise RuntimeError(f"injected failure in {stage}")
        return original(*args, **kwargs)

    before = _state()

    async def scenario(client: StreamClient) -> None:
        await client.until_event("ready")
        monkeypatch.setattr(owner, attribute, failing)
        text = "One sentence, then the encoder fails." if stage == "encoder at the end" else LONG
        await client.send(type="synthesize", context_id="a", text=text, format="pcm")
        error = await client.until_event("error", "a")
        assert (error["code"], error["request_id"]) == ("internal_error", error["request_id"])
        await client.until_event("audio_end", "a")
        monkeypatch.setattr(owner, attribute, original)
        # The connection is still usable.
        await client.send(type="synthesize", context_id="b", text="Still here.", format="pcm")
        await client.until_event("audio_end", "b")

    run_stream(scenario, key=issued.plaintext)
    assert _state() == before
    # The slot is free: a cap of one admits the next connection at once.
    run_stream(lambda client: client.until_event("ready"), key=issued.plaintext)  # type: ignore[arg-type, return-value]
    usage_flush()
    rows = {row.status_code: row.error_code for row in UsageLog.objects.filter(tenant=tenant)}
    assert rows == {500: "internal_error", 200: None}
