from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import path

from callwaiting_tts.health import health
from callwaiting_tts.metrics import metrics_view
from callwaiting_tts.playground import playground
from callwaiting_tts.readiness import ready
from callwaiting_tts.schema import DocsView, SchemaView
from synthesis.elevenlabs import text_to_speech, text_to_speech_stream, text_to_speech_stream_with_timestamps
from synthesis.openai_api import audio_speech
from synthesis.views import audio_download, synthesize, synthesize_url, twiml_play
from tenants.views import tenant_detail, token_mint
from usage.views import usage_report
from voices.views import voice_detail, voice_list, voice_upload

handler400 = "api.errors.bad_request_view"
handler403 = "api.errors.permission_denied_view"
handler404 = "api.errors.not_found_view"
handler500 = "api.errors.server_error_view"

# Endpoints that answer without an API key (audio-download checks a signed,
# expiring link instead). Everything else under /v1 needs one;
# tests/test_auth_coverage.py holds every route to this list.
# The playground page holds no data: its visitor brings a client token (or a staff login).
PUBLIC_URL_NAMES = frozenset({"health", "ready", "openapi-schema", "docs", "audio-download", "playground"})
# Protected by a credential of their own rather than an API key (tests/test_metrics.py).
OWN_CREDENTIAL_URL_NAMES = frozenset({"metrics"})

urlpatterns = [
    path("v1/health", health, name="health"),
    path("v1/ready", ready, name="ready"),
    path("v1/tenant", tenant_detail, name="tenant-detail"),
    path("v1/tokens", token_mint, name="tokens"),
    path("v1/synthesize", synthesize, name="synthesize"),
    path("v1/synthesize-url", synthesize_url, name="synthesize-url"),
    path("v1/audio/speech", audio_speech, name="audio-speech"),
    path("v1/twiml/play", twiml_play, name="twiml-play"),
    # ElevenLabs-compatible text to speech (synthesis/elevenlabs.py, docs/elevenlabs.md).
    path("v1/text-to-speech/<str:voice_id>", text_to_speech, name="elevenlabs-tts"),
    path("v1/text-to-speech/<str:voice_id>/stream", text_to_speech_stream, name="elevenlabs-tts-stream"),
    path(
        "v1/text-to-speech/<str:voice_id>/stream/with-timestamps",
        text_to_speech_stream_with_timestamps,
        name="elevenlabs-tts-stream-timestamps",
    ),
    path("v1/audio/<path:name>", audio_download, name="audio-download"),
    path("v1/usage", usage_report, name="usage"),
    path("v1/voices", voice_list, name="voice-list"),
    path("v1/voices/upload", voice_upload, name="voice-upload"),
    path("v1/voices/<slug:voice_id>", voice_detail, name="voice-detail"),
    path("v1/openapi.json", SchemaView.as_view(), name="openapi-schema"),
    path("v1/docs", DocsView.as_view(url_name="openapi-schema"), name="docs"),
    path("admin/", admin.site.urls),
    path("playground", playground, name="playground"),
    # Outside /v1: for the scraper, with its own token (METRICS_TOKEN), not an API key.
    path("metrics", metrics_view, name="metrics"),
]

if settings.BENCHMARK_ROUTES:  # off unless a benchmark asks (bench/run.py)

    async def bench_bare(request: HttpRequest) -> JsonResponse:
        return JsonResponse({"ok": True})

    urlpatterns.append(path("v1/bench/bare", bench_bare, name="bench-bare"))
