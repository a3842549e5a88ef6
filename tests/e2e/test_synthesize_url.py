"""POST /v1/synthesize-url and /v1/twiml/play end to end: Daphne, Piper, local disk and a real S3 API."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from xml.etree import ElementTree

import httpx
import numpy as np
import pytest
from django.conf import settings

from synthesis.audio import AudioFormat, OutputSpec
from synthesis.stored_audio import local_url_signature
from tenants.services import tenant_create
from tests.support.audio import decode
from tests.support.servers import ServiceEnv, daphne_server, moto_s3_server, s3_client
from tests.support.tenants import committed_tenant
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db]
BUCKET = "phrases-test"
TEXT = "Thanks for calling Acme Dental. Please hold."


@pytest.fixture(scope="module")
def disk_server(service_env: ServiceEnv) -> Iterator[tuple[str, Path]]:
    env = service_env()
    with daphne_server(env) as base_url:
        yield base_url, Path(env["MEDIA_ROOT"])


@pytest.fixture(scope="module")
def client(disk_server: tuple[str, Path], module_tenant: Any) -> Iterator[httpx.Client]:
    _tenant, issued = module_tenant
    with httpx.Client(
        base_url=disk_server[0], headers={"Authorization": f"Bearer {issued.plaintext}"}, timeout=60
    ) as client:
        yield client


def jobs_started(client: httpx.Client) -> int:
    return int(client.get("/v1/health").json()["engine"]["jobs_started"])


def ask(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/synthesize-url", json={"text": TEXT, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.parametrize(
    ("audio_format", "content_type"), [("wav", "audio/wav"), ("mp3", "audio/mpeg"), ("mulaw", "audio/ulaw")]
)
def test_the_url_serves_audio_of_the_stated_format_and_duration(
    client: httpx.Client, audio_format: str, content_type: str
) -> None:
    answer = ask(client, format=audio_format, text=f"{TEXT} ({audio_format} {uuid.uuid4().hex[:6]})")
    assert answer["format"] == audio_format
    assert answer["content_type"] == content_type
    assert answer["cached"] is False
    assert answer["url"].startswith(str(client.base_url))
    fetched = httpx.get(answer["url"])
    assert fetched.status_code == 200
    assert fetched.headers["Content-Type"] == content_type
    assert int(fetched.headers["Content-Length"]) == answer["bytes"] == len(fetched.content)
    assert fetched.headers["ETag"]
    assert "max-age=" in fetched.headers["Cache-Control"]
    assert fetched.headers["Last-Modified"]
    audio = decode(fetched.content, OutputSpec.parse(audio_format, None))
    rate = 8000 if audio_format == "mulaw" else 24000
    assert len(audio) / rate == pytest.approx(answer["duration_s"], abs=0.3), answer
    # The random suffix is read out too ("eight e four..."): up to a few seconds more.
    assert 1.5 < answer["duration_s"] < 12, answer


def test_a_repeat_is_a_cache_hit_that_never_touches_the_engine(client: httpx.Client) -> None:
    text = f"Your appointment is confirmed, number {uuid.uuid4().hex[:6]}."
    first = ask(client, text=text)
    before = jobs_started(client)
    repeat = ask(client, text=text)
    assert jobs_started(client) == before
    assert repeat["cached"] is True
    assert httpx.get(repeat["url"]).content == httpx.get(first["url"]).content


@pytest.mark.parametrize(
    "change",
    [{"voice_id": "joe", "speed": 1.2}, {"speed": 0.9}, {"format": "mp3"}, {"text": "Something else."}],
)
def test_any_change_that_alters_the_audio_is_a_miss(client: httpx.Client, change: dict[str, Any]) -> None:
    base = {"text": f"Base prompt {uuid.uuid4().hex[:6]}."}
    ask(client, **base)
    before = jobs_started(client)
    changed = ask(client, **{**base, **change})
    assert changed["cached"] is False
    assert jobs_started(client) == before + 1


@pytest.fixture(scope="module")
def other_tenant_key(django_db_blocker: Any, test_database_url: str) -> Iterator[str]:
    with committed_tenant(django_db_blocker, "other") as (_tenant, issued):
        yield issued.plaintext


def test_another_tenants_identical_request_is_a_miss(client: httpx.Client, other_tenant_key: str) -> None:
    text = f"Shared words {uuid.uuid4().hex[:6]}."
    mine = ask(client, text=text)
    theirs = client.post(
        "/v1/synthesize-url", json={"text": text}, headers={"Authorization": f"Bearer {other_tenant_key}"}
    ).json()
    assert theirs["cached"] is False
    assert theirs["url"] != mine["url"]


def test_tampered_or_expired_links_are_refused(service_env: ServiceEnv, module_tenant: Any) -> None:
    _tenant, issued = module_tenant
    env = service_env(SIGNED_URL_EXPIRY_SECONDS="2")
    with daphne_server(env) as base_url:
        answer = httpx.post(
            f"{base_url}/v1/synthesize-url",
            json={"text": f"Short-lived {uuid.uuid4().hex[:6]}."},
            headers={"Authorization": f"Bearer {issued.plaintext}"},
            timeout=60,
        ).json()
        url = answer["url"]
        assert httpx.get(url).status_code == 200
        signature_at = url.index("signature=") + len("signature=")
        for position in (signature_at, len(url) - 1):
            flipped = "A" if url[position] != "A" else "B"
            tampered = httpx.get(url[:position] + flipped + url[position + 1 :])
            assert tampered.status_code == 403
            assert tampered.json()["error"]["code"] == "invalid_signature"
        later_expiry = url.replace("expires=", "expires=9")
        assert httpx.get(later_expiry).status_code == 403
        time.sleep(2.5)
        expired = httpx.get(url)
        assert expired.status_code == 403
        assert expired.json()["error"]["code"] == "link_expired"


def test_a_missing_object_is_404(client: httpx.Client, disk_server: tuple[str, Path]) -> None:
    answer = ask(client, text=f"Soon gone {uuid.uuid4().hex[:6]}.")
    name = answer["url"].split("/v1/audio/")[1].split("?")[0]
    (disk_server[1] / name).unlink()
    missing = httpx.get(answer["url"])
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


def test_idempotency_key_replays_and_refuses_a_different_body(client: httpx.Client) -> None:
    key = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
    body = {"text": f"Idempotent {uuid.uuid4().hex[:6]}."}
    first = client.post("/v1/synthesize-url", json=body, headers=key)
    retry = client.post("/v1/synthesize-url", json=body, headers=key)
    assert first.status_code == retry.status_code == 200
    fresh_link = ("url", "expires_at")
    assert {k: v for k, v in retry.json().items() if k not in fresh_link} == {
        k: v for k, v in first.json().items() if k not in fresh_link
    }
    conflict = client.post("/v1/synthesize-url", json={"text": "Different words."}, headers=key)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize("audio_format", list(AudioFormat))
def test_every_format_can_be_stored_and_fetched(client: httpx.Client, audio_format: AudioFormat) -> None:
    answer = ask(client, format=audio_format.value, text=f"{TEXT} ({audio_format} {uuid.uuid4().hex[:6]})")
    fetched = httpx.get(answer["url"])
    assert fetched.status_code == 200
    assert fetched.headers["Content-Type"] == answer["content_type"]
    assert len(fetched.content) == answer["bytes"] > 0


@pytest.mark.django_db(transaction=True)  # committed: the server is another process
def test_an_idempotent_replay_after_the_link_expired_gets_a_fresh_link_to_the_same_audio(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    with (
        committed_tenant(django_db_blocker, "replay", rate_limit_minute=0, rate_limit_hour=0) as (_t, issued),
        daphne_server(service_env(SIGNED_URL_EXPIRY_SECONDS="1")) as base_url,
        httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {issued.plaintext}"}) as client,
    ):
        key = {"Idempotency-Key": f"late-retry-{uuid.uuid4().hex}"}
        body = {"text": f"Kept for a retry {uuid.uuid4().hex[:6]}."}
        first = client.post("/v1/synthesize-url", json=body, headers=key).json()
        wait_until(
            lambda: httpx.get(first["url"]).status_code == 403, what="the first link to expire", timeout_s=30
        )
        assert httpx.get(first["url"]).json()["error"]["code"] == "link_expired"
        retry = client.post("/v1/synthesize-url", json=body, headers=key)
        assert retry.status_code == 200
        replay = retry.json()
        assert replay["bytes"] == first["bytes"]
        # The same audio, signed anew: a later expiry and a signature valid for it (checked
        # here rather than fetched, since this link too lives only a second).
        old_link, new_link = urlsplit(first["url"]), urlsplit(replay["url"])
        assert new_link.path == old_link.path
        query = dict(parse_qsl(new_link.query))
        assert int(query["expires"]) > int(dict(parse_qsl(old_link.query))["expires"])
        name = new_link.path.removeprefix("/v1/audio/")
        assert query["signature"] == local_url_signature(name, int(query["expires"]))


def test_twiml_play_names_a_url_that_plays(client: httpx.Client) -> None:
    response = client.post(
        "/v1/twiml/play", json={"text": f"Welcome {uuid.uuid4().hex[:6]}.", "format": "mp3"}
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/xml")
    root = ElementTree.fromstring(response.content)  # noqa: S314  (our own server's answer)
    assert root.tag == "Response"
    (play,) = list(root)
    assert play.tag == "Play"
    fetched = httpx.get(play.text or "")
    assert fetched.status_code == 200
    assert fetched.headers["Content-Type"] == "audio/mpeg"
    assert np.abs(decode(fetched.content, OutputSpec.parse("mp3", None))).max() > 0.05


def test_bad_requests_get_the_error_shape(client: httpx.Client) -> None:
    response = client.post("/v1/synthesize-url", json={"text": ""})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "empty_text"


def test_on_s3_the_url_is_a_presigned_get_that_plays(service_env: ServiceEnv, module_tenant: Any) -> None:
    _tenant, issued = module_tenant
    with moto_s3_server() as endpoint:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        env = service_env(
            S3_BUCKET=BUCKET,
            S3_ENDPOINT_URL=endpoint,
            S3_ACCESS_KEY_ID="test",
            S3_SECRET_ACCESS_KEY="test",
        )
        with daphne_server(env) as base_url:
            answer = httpx.post(
                f"{base_url}/v1/synthesize-url",
                json={"text": f"From the bucket {uuid.uuid4().hex[:6]}."},
                headers={"Authorization": f"Bearer {issued.plaintext}"},
                timeout=60,
            ).json()
        assert answer["url"].startswith(f"{endpoint}/{BUCKET}/tenants/")
        assert "X-Amz-Signature=" in answer["url"]
        # S3 itself refuses the link after this; moto does not enforce presigned expiry.
        assert f"X-Amz-Expires={settings.SIGNED_URL_EXPIRY_SECONDS}" in answer["url"]
        fetched = httpx.get(answer["url"])
        assert fetched.status_code == 200
        audio = decode(fetched.content, OutputSpec.parse("wav", None))
        assert len(audio) / 24000 == pytest.approx(answer["duration_s"], abs=0.05)


@pytest.mark.django_db(transaction=True)
def test_warm_cache_fills_the_phrase_cache_and_a_second_run_finds_it_all(
    tmp_path: Path, settings: Any
) -> None:
    import io

    from django.core.management import call_command

    from synthesis.models import PhraseAudio

    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": tmp_path},
        },
    }
    tenant, _key = tenant_create(name=f"warm-{uuid.uuid4().hex[:6]}")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text('Hello and welcome.,ignored column\n"Please hold, an agent will be with you."\n\n')
    out = io.StringIO()
    call_command(
        "warm_cache", tenant.name, str(prompts), "--format", "mulaw", stdout=out, stderr=io.StringIO()
    )
    assert "2 prompts: 2 synthesized, 0 already cached, 0 failed." in out.getvalue()
    assert PhraseAudio.objects.filter(tenant=tenant, format="mulaw").count() == 2
    out = io.StringIO()
    call_command(
        "warm_cache", str(tenant.id), str(prompts), "--format", "mulaw", stdout=out, stderr=io.StringIO()
    )
    assert "2 prompts: 0 synthesized, 2 already cached, 0 failed." in out.getvalue()


@pytest.mark.django_db
def test_warm_cache_rejects_bad_input(tmp_path: Path) -> None:
    from django.core.management import call_command
    from django.core.management.base import CommandError

    tenant, _key = tenant_create(name=f"warm-{uuid.uuid4().hex[:6]}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(CommandError, match="holds no prompts"):
        call_command("warm_cache", tenant.name, str(empty))
    with pytest.raises(CommandError, match="is not a file"):
        call_command("warm_cache", tenant.name, str(tmp_path / "missing.txt"))
    with pytest.raises(CommandError, match="No tenant"):
        call_command("warm_cache", "nobody", str(empty))
