"""Settings, all read from the environment (see README.md for every variable).

With nothing configured the service runs on embedded defaults: SQLite, local
disk, the in-memory channel layer and the bundled Piper voice.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

from core.env import (
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_mapping,
    env_optional_float,
    env_str,
)

django_stubs_ext.monkeypatch()  # lets admin and model classes take type parameters at run time

BASE_DIR = Path(__file__).resolve().parent.parent
VERSION = "0.1.0"

# A local `.env` (written by `make run`) fills in what the real environment
# leaves unset; CWT_ENV_FILE="" turns this off (the test settings do).
_env_file = os.environ.get("CWT_ENV_FILE", str(BASE_DIR / ".env"))
if _env_file:
    load_dotenv(_env_file, override=False)

# --- Core -------------------------------------------------------------------

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set it to a long random string "
            '(python -c "import secrets; print(secrets.token_urlsafe(50))"), '
            "or set DEBUG=1 for local development only."
        )
    SECRET_KEY = "insecure-debug-only-key-do-not-use-in-production"  # noqa: S105

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
HOST = env_str("HOST", "127.0.0.1")
PORT = env_int("PORT", 8000, minimum=1, maximum=65535)
PUBLIC_BASE_URL = env_str("PUBLIC_BASE_URL", f"http://{HOST}:{PORT}").rstrip("/")
if urlparse(PUBLIC_BASE_URL).scheme not in {"http", "https"}:
    raise ImproperlyConfigured(f"PUBLIC_BASE_URL={PUBLIC_BASE_URL!r} must start with http:// or https://.")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "tenants",
    "voices",
    "synthesis",
    "usage",
    "axes",
    "django_prometheus",
    "corsheaders",
    # The composition root, listed for its management commands (`prepare`) only.
    "callwaiting_tts",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "callwaiting_tts.middleware.RequestIdMiddleware",
    "callwaiting_tts.middleware.AllowedHostsMiddleware",
    "callwaiting_tts.middleware.MethodMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out admin login into its lockout answer.
    "axes.middleware.AxesMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

# Under Daphne, /v1/... is served by a handler with only these (all run on the
# event loop): sessions, CSRF and messages exist for the admin, and Django runs
# them in its one sync thread, which the streaming API must never wait on.
API_MIDDLEWARE = [
    "callwaiting_tts.middleware.RequestIdMiddleware",
    # ALLOWED_HOSTS: nothing else in this stack calls get_host(), which is what checks it.
    "callwaiting_tts.middleware.AllowedHostsMiddleware",
    # Before the method policy: a CORS preflight (OPTIONS) is answered here, not refused there.
    "callwaiting_tts.middleware.TenantCorsMiddleware",
    "callwaiting_tts.middleware.MethodMiddleware",
    "callwaiting_tts.middleware.InlineSecurityMiddleware",
    "callwaiting_tts.middleware.InlineXFrameOptionsMiddleware",
]
API_PATH_PREFIX = "/v1/"

ROOT_URLCONF = "callwaiting_tts.urls"
ASGI_APPLICATION = "callwaiting_tts.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    try:
        _database = dict(
            dj_database_url.parse(
                DATABASE_URL,
                conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0, minimum=0),
                conn_health_checks=True,
            )
        )
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL cannot be parsed: {exc}") from None
    # Supabase's pooler (PgBouncer in transaction mode) cannot hold the
    # server-side cursors Django uses for .iterator().
    if str(_database.get("HOST") or "").endswith("pooler.supabase.com"):
        _database["DISABLE_SERVER_SIDE_CURSORS"] = True
else:
    _database = {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "var" / "db.sqlite3"}
    (BASE_DIR / "var").mkdir(exist_ok=True)
# django-prometheus's backends are the stock ones that also count queries and errors.
_database["ENGINE"] = str(_database["ENGINE"]).replace(
    "django.db.backends.", "django_prometheus.db.backends."
)
DATABASES = {"default": _database}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis and Channels ------------------------------------------------------

REDIS_URL = env_str("REDIS_URL")
# Every key this service writes (and the channel layer's) starts with this, so that
# deployments or test runs sharing one Redis database never touch each other's state.
REDIS_KEY_PREFIX = env_str("REDIS_KEY_PREFIX", "cwt")
# How long one Redis call may take before the in-process fallbacks take over (and the
# breaker keeps Redis off for a few seconds). Loopback Redis answers in well under a
# millisecond, but a loaded host or a cold process can take a few hundred: this is for
# outages, not for a slow moment.
REDIS_TIMEOUT_SECONDS = env_float("REDIS_TIMEOUT_SECONDS", 1.0, minimum=0.05)
# How many server processes share one tenant's limits (every process of every pod). While
# Redis is away each process enforces its share of a limit (limit / SERVER_PROCESSES), so
# that the fleet together is never more generous than the shared limit.
SERVER_PROCESSES = env_int("SERVER_PROCESSES", 1, minimum=1)
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "core.channel_layer.ResilientRedisChannelLayer",
            # redis-py 8 defaults socket_timeout to 5 s, the same as the layer's
            # blocking BZPOPMIN: reads then time out and tear consumers down
            # (django/channels_redis#422). The socket must outwait the pop.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
                "prefix": f"{REDIS_KEY_PREFIX}:asgi",
            },
        }
    }
else:
    # Only for a single process with nothing configured: no cross-process fan-out.
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# --- Static files and storage -------------------------------------------------

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(BASE_DIR / "var" / "media")))
MEDIA_URL = "media/"
VOICES_DIR = Path(env_str("VOICES_DIR", str(MEDIA_ROOT / "voices")))

S3_BUCKET = env_str("S3_BUCKET")
SUPABASE_URL = env_str("SUPABASE_URL").rstrip("/")
S3_ENDPOINT_URL = env_str("S3_ENDPOINT_URL") or (f"{SUPABASE_URL}/storage/v1/s3" if SUPABASE_URL else "")
S3_REGION = env_str("S3_REGION", "us-east-1")
S3_ACCESS_KEY_ID = env_str("S3_ACCESS_KEY_ID")
S3_SECRET_ACCESS_KEY = env_str("S3_SECRET_ACCESS_KEY")
SIGNED_URL_EXPIRY_SECONDS = env_int("SIGNED_URL_EXPIRY_SECONDS", 900, minimum=1, maximum=7 * 24 * 3600)
PHRASE_CACHE_SECONDS = env_int("PHRASE_CACHE_SECONDS", 7 * 24 * 3600, minimum=0)
IDEMPOTENCY_SECONDS = env_int("IDEMPOTENCY_SECONDS", 24 * 3600, minimum=1)

if S3_BUCKET:
    _default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "endpoint_url": S3_ENDPOINT_URL or None,
            "region_name": S3_REGION,
            "access_key": S3_ACCESS_KEY_ID or None,
            "secret_key": S3_SECRET_ACCESS_KEY or None,
            "querystring_expire": SIGNED_URL_EXPIRY_SECONDS,
            "file_overwrite": False,
            "default_acl": None,
            "addressing_style": "path" if S3_ENDPOINT_URL else None,
            "signature_version": "s3v4",
        },
    }
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": MEDIA_ROOT},
    }
STORAGES = {
    "default": _default_storage,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# --- Speech engines ---------------------------------------------------------

TTS_ENGINE = env_choice("TTS_ENGINE", "auto", ("auto", "xtts", "piper"))
XTTS_MODEL_PATH = env_str("XTTS_MODEL_PATH")
XTTS_DEVICE = env_str("XTTS_DEVICE")  # empty: cuda:0 when CUDA is available, else cpu
XTTS_HALF = env_bool("XTTS_HALF", False)
XTTS_STREAM_CHUNK_TOKENS = env_int("XTTS_STREAM_CHUNK_TOKENS", 20, minimum=1)
_xtts_max_tokens = env_int("XTTS_MAX_AUDIO_TOKENS", 0, minimum=0)
XTTS_MAX_AUDIO_TOKENS = _xtts_max_tokens or None  # 0: the checkpoint's own limit
XTTS_DETERMINISTIC = env_bool("XTTS_DETERMINISTIC", False)  # greedy decoding (tests, benchmarks)
# Requests decoded together in one GPT step; more running requests take turns by deadline.
XTTS_MAX_BATCH = env_int("XTTS_MAX_BATCH", 16, minimum=1)
XTTS_HALF_DTYPE = env_choice("XTTS_HALF_DTYPE", "float16", ("float16", "bfloat16"))  # with XTTS_HALF
PIPER_WORKERS = env_int("PIPER_WORKERS", os.cpu_count() or 1, minimum=1)
# ONNX Runtime threads per render (each worker runs one render at a time); 0: its default of
# one per core, which with several workers oversubscribes the cores (engines/piper.py).
PIPER_THREADS_PER_WORKER = env_int("PIPER_THREADS_PER_WORKER", 1, minimum=0)
PIPER_NOISE_SCALE = env_optional_float("PIPER_NOISE_SCALE", minimum=0.0)  # unset: the voice's own
PIPER_NOISE_W_SCALE = env_optional_float("PIPER_NOISE_W_SCALE", minimum=0.0)
ENGINE_MAX_ACTIVE_JOBS = env_int("ENGINE_MAX_ACTIVE_JOBS", 32, minimum=1)
# One tenant's share of those slots: a burst from one tenant leaves the rest to others
# (refused with 429 engine_share_exceeded past it). Half the engine unless set.
ENGINE_MAX_JOBS_PER_TENANT = env_int(
    "ENGINE_MAX_JOBS_PER_TENANT", max(1, ENGINE_MAX_ACTIVE_JOBS // 2), minimum=1
)
# A tenant's share of all the fleet's engines together, counted through Redis (0: none
# beyond each engine's own ENGINE_MAX_JOBS_PER_TENANT). Set it below that times the number
# of processes and a tenant cannot hold its share of every engine at once. Whether set or
# not, an engine's queue puts a tenant holding few slots anywhere in the fleet ahead of one
# holding many. During a Redis outage each engine counts only its own.
ENGINE_FLEET_JOBS_PER_TENANT = env_int("ENGINE_FLEET_JOBS_PER_TENANT", 0, minimum=0)
# Admission by real-time capacity (engines/capacity.py): streams are admitted up to this
# share of the audio seconds per second the engine is measured to make (the engine's own
# steps; the server's encoding and sockets share the machine: 0.65 keeps every admitted
# stream real-time on a 2-core Piper machine, bench/RESULTS.md); past it a request
# waits in a queue of at most ENGINE_QUEUE_MAX for at most ENGINE_QUEUE_SECONDS, then 503.
# "fixed": admit up to ENGINE_MAX_ACTIVE_JOBS whatever the measured speed, no pacing (sized by
# hand; the tests, whose shared machine's speed changes from one minute to the next).
ENGINE_ADMISSION = env_choice("ENGINE_ADMISSION", "realtime", ("realtime", "fixed"))
ENGINE_REALTIME_HEADROOM = env_float("ENGINE_REALTIME_HEADROOM", 0.65, minimum=0.0)
ENGINE_QUEUE_MAX = env_int("ENGINE_QUEUE_MAX", 16, minimum=0)
ENGINE_QUEUE_SECONDS = env_float("ENGINE_QUEUE_SECONDS", 2.0, minimum=0.0)
# A request's first chunk is at most this many words (or its first clause if shorter), so
# first audio costs a fraction of a second of engine time even under load; 0: first clause.
FIRST_CHUNK_WORDS = env_int("FIRST_CHUNK_WORDS", 5, minimum=0, maximum=50)
MAX_TEXT_CHARS = env_int("MAX_TEXT_CHARS", 5000, minimum=1)
# Output bounded by input (engines/text.py): a few kilobytes must not ask for hours of audio.
MAX_AUDIO_SECONDS_PER_REQUEST = env_float("MAX_AUDIO_SECONDS_PER_REQUEST", 600.0, minimum=1.0)
SSML_MAX_BREAK_SECONDS = env_float("SSML_MAX_BREAK_SECONDS", 10.0, minimum=0.0)  # one <break>, cut to it
SSML_MAX_BREAK_SECONDS_TOTAL = env_float("SSML_MAX_BREAK_SECONDS_TOTAL", 30.0, minimum=0.0)
SSML_MAX_DEPTH = env_int("SSML_MAX_DEPTH", 32, minimum=1, maximum=200)  # the SSML walker recurses
JSON_MAX_DEPTH = env_int("JSON_MAX_DEPTH", 32, minimum=2, maximum=200)  # request bodies, WS messages
VOICE_UPLOAD_MAX_BYTES = env_int("VOICE_UPLOAD_MAX_BYTES", 10 * 1024 * 1024, minimum=1024)
# An upload's whole multipart body: the audio, its framing and the text fields.
VOICE_UPLOAD_MAX_BODY_BYTES = VOICE_UPLOAD_MAX_BYTES + 64 * 1024
VOICE_CACHE_ENTRIES = env_int("VOICE_CACHE_ENTRIES", 256, minimum=1)

# --- Auth, API, errors ---------------------------------------------------------

# How long a verified API key is trusted without a database lookup; also the
# longest a revocation or deactivation takes to reach a running process.
API_KEY_CACHE_SECONDS = env_float("API_KEY_CACHE_SECONDS", 5.0, minimum=0.0)
# The largest request body the server reads on any route but the voice upload
# (VOICE_UPLOAD_MAX_BODY_BYTES there, for a caller sending a key). A larger one is
# answered 413 from its headers, before it is read (callwaiting_tts/http_server.py).
REQUEST_BODY_MAX_BYTES = env_int("REQUEST_BODY_MAX_BYTES", 1024 * 1024, minimum=64 * 1024)
# Django's limit on a body it reads into memory: the same, so that it holds under
# any ASGI server (and the tests' clients) too.
DATA_UPLOAD_MAX_MEMORY_SIZE = REQUEST_BODY_MAX_BYTES
# Before authentication nobody may hold a connection for long (callwaiting_tts/http_server.py):
# a request's headers must all arrive within HTTP_HEADER_TIMEOUT_SECONDS of its first byte (of
# the connection, for its first request); its body at HTTP_BODY_MIN_BYTES_PER_SECOND or faster,
# after HTTP_BODY_GRACE_SECONDS; one client address holds at most CONNECTIONS_PER_CLIENT_MAX
# connections (0: no cap; behind a proxy every client has the proxy's address).
HTTP_HEADER_TIMEOUT_SECONDS = env_float("HTTP_HEADER_TIMEOUT_SECONDS", 10.0, minimum=0.5)
HTTP_BODY_GRACE_SECONDS = env_float("HTTP_BODY_GRACE_SECONDS", 10.0, minimum=0.5)
HTTP_BODY_MIN_BYTES_PER_SECOND = env_int("HTTP_BODY_MIN_BYTES_PER_SECOND", 1024, minimum=1)
CONNECTIONS_PER_CLIENT_MAX = env_int("CONNECTIONS_PER_CLIENT_MAX", 256, minimum=0)
# A streamed HTTP response whose client reads nothing for this long is cut and its
# resources (engine slot, stream lease, usage row) released; until then it waits, holding
# no more than the socket's buffers (synthesis/stream/flow.py).
HTTP_STREAM_STALL_SECONDS = env_float("HTTP_STREAM_STALL_SECONDS", 30.0, minimum=0.5)
# Form bounds (Django's defaults are 1000 fields, 100 files): the admin's bulk actions post one
# field per selected row; no API form has more than one file. Over them: 400 too_many_fields /
# too_many_files (api.views).
DATA_UPLOAD_MAX_NUMBER_FIELDS = 1000
DATA_UPLOAD_MAX_NUMBER_FILES = 5
RATE_LIMITS_ENABLED = env_bool("RATE_LIMITS_ENABLED", True)
QUOTA_CACHE_SECONDS = env_float("QUOTA_CACHE_SECONDS", 5.0, minimum=0.0)
# Usage rows: each finished request appends a record to a local spool, and a
# thread per process writes them to the database every USAGE_FLUSH_SECONDS
# (0: never on its own; the tests flush by hand). Put the spool on a volume
# that outlives the container, so that rows buffered through a database outage
# survive a restart too.
USAGE_SPOOL_DIR = Path(env_str("USAGE_SPOOL_DIR", str(BASE_DIR / "var" / "usage-spool")))
USAGE_FLUSH_SECONDS = env_float("USAGE_FLUSH_SECONDS", 1.0, minimum=0.0)
USAGE_FLUSH_BATCH = env_int("USAGE_FLUSH_BATCH", 500, minimum=1)
# How often the snapshot of running requests (the rows a killed process still leaves) is
# brought up to date: what a `kill -9` loses is at most this much of each request's count.
USAGE_IN_FLIGHT_SECONDS = env_float("USAGE_IN_FLIGHT_SECONDS", 0.5, minimum=0.05)
# Off only to measure what recording costs (bench/run.py): no rows, no billing.
USAGE_RECORDS = env_bool("USAGE_RECORDS", True)
# Usage records held in memory while the journal cannot be written (disk full, read-only);
# one past this is logged and counted as lost. Synthesis is refused meanwhile.
USAGE_HELD_RECORDS = env_int("USAGE_HELD_RECORDS", 10_000, minimum=0)
# /v1/bench/bare, a view with no auth or anything else, for bench/run.py to compare with.
BENCHMARK_ROUTES = env_bool("BENCHMARK_ROUTES", False)
# On SIGTERM: stop accepting, let running synthesis finish for at most this long, exit.
SHUTDOWN_GRACE_SECONDS = env_float("SHUTDOWN_GRACE_SECONDS", 30.0, minimum=0.0)

# GET /metrics answers only a scraper sending `Authorization: Bearer <METRICS_TOKEN>`;
# unset, the endpoint does not exist. Tenant labels multiply series by tenants.
METRICS_TOKEN = env_str("METRICS_TOKEN")
METRICS_TENANT_LABELS = env_bool("METRICS_TENANT_LABELS", False)

# OpenAI's voice names (alloy, echo, ...) on /v1/audio/speech: "alloy=joe,echo=joe".
# A name not listed (or naming no built-in voice) speaks with the engine's default voice.
OPENAI_VOICE_MAP = env_mapping("OPENAI_VOICE_MAP")

# WS /v1/stream limits (see README "Streaming over WebSocket").
WS_MAX_MESSAGE_BYTES = env_int("WS_MAX_MESSAGE_BYTES", 64 * 1024, minimum=1024)
WS_MAX_CONTEXTS = env_int("WS_MAX_CONTEXTS", 8, minimum=1)
WS_IDLE_SECONDS = env_float("WS_IDLE_SECONDS", 60.0, minimum=1.0)
# An open utterance that has spoken everything it was given and waits this long for more
# text gives its engine slot back (an LLM that went quiet must not hold the engine); its
# next piece takes a slot again, as a new stream would.
WS_UTTERANCE_IDLE_SLOT_SECONDS = env_float("WS_UTTERANCE_IDLE_SLOT_SECONDS", 5.0, minimum=0.1)
# While Redis is away (no broadcasts of key changes), how often an open WebSocket checks
# its key against the database instead.
WS_ACCESS_POLL_SECONDS = env_float("WS_ACCESS_POLL_SECONDS", 10.0, minimum=0.1)
WS_AUTH_SECONDS = env_float("WS_AUTH_SECONDS", 5.0, minimum=0.5)
# A stream's slot in its tenant's cap is a lease renewed while it runs; a
# crashed process's streams free their slots after this long.
STREAM_LEASE_SECONDS = env_float("STREAM_LEASE_SECONDS", 30.0, minimum=1.0)

# --- Browsers: client tokens and CORS (tenants.tokens, tenants.origins) ------------------

# POST /v1/tokens: a client token lives this long unless asked for less; never longer than the cap.
CLIENT_TOKEN_MAX_SECONDS = env_int("CLIENT_TOKEN_MAX_SECONDS", 900, minimum=10, maximum=24 * 3600)
CLIENT_TOKEN_DEFAULT_SECONDS = min(
    CLIENT_TOKEN_MAX_SECONDS, env_int("CLIENT_TOKEN_DEFAULT_SECONDS", 300, minimum=1)
)
# django-cors-headers, on /v1/ only; the origins are each tenant's (TenantCorsMiddleware).
CORS_URLS_REGEX = r"^/v1/"
CORS_ALLOW_METHODS = ("GET", "HEAD", "POST")
CORS_ALLOW_HEADERS = ("authorization", "content-type", "idempotency-key", "range", "x-request-id")
# What a page's script may read of an answer (the rest a browser hides cross-origin).
CORS_EXPOSE_HEADERS = (
    "X-Request-ID",
    "X-Audio-Format",
    "X-Sample-Rate",
    "X-Audio-Duration",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
    "Accept-Ranges",
    "Content-Range",
    "Content-Length",
)
CORS_PREFLIGHT_MAX_AGE = env_int("CORS_PREFLIGHT_MAX_AGE", 600, minimum=0)
# How long a preflight trusts the union of tenants' origins it last read.
CORS_ORIGINS_CACHE_SECONDS = env_float("CORS_ORIGINS_CACHE_SECONDS", 5.0, minimum=0.0)

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# --- Admin login throttling (django-axes) -------------------------------------------

# Only Django's own logins go through these backends, and of those only the admin's: the API
# authenticates API keys itself (tenants.authentication) and never calls authenticate(), and
# AXES_ONLY_ADMIN_SITE keeps axes away from anything else. The axes backend refuses a locked-out
# login before the password is checked, so a right password is refused too while locked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_ONLY_ADMIN_SITE = True
AXES_FAILURE_LIMIT = env_int("ADMIN_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("ADMIN_LOGIN_COOLOFF_MINUTES", 15, minimum=1))
# Keyed by username and client address together: locking a username alone would let anyone
# lock the real admins out, and locking an address alone would, behind the gateway (where
# every client arrives with the gateway's address), lock every admin out after one person's typos.
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
# A successful login forgets the earlier failures of that username and address.
AXES_RESET_ON_SUCCESS = True

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tenants.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_THROTTLE_CLASSES": ["tenants.limits.TenantRateThrottle"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["api.parsers.BoundedJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "api.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
    # OPTIONS is not part of the API: refused with 405 like any undocumented method
    # (DRF would answer it with a description of the view).
    "DEFAULT_METADATA_CLASS": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "CallWaiting TTS",
    # 3.1: JSON Schema proper (nullable fields are `type: [..., "null"]`).
    "OAS_VERSION": "3.1.0",
    # The WebSocket protocol has no place in OpenAPI's paths: it is described here.
    "DESCRIPTION": "Multi-tenant, low-latency text-to-speech for voice agents.\n\n"
    + (BASE_DIR / "docs" / "streaming.md").read_text(),
    "VERSION": VERSION,
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "callwaiting_tts.schema.complete_schema",
    ],
}

# --- Internationalisation -------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Security ---------------------------------------------------------------

# TLS ends at the pod's proxy; trust its header only when told to.
if env_bool("SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_REDIRECT_EXEMPT = [r"^v1/health$", r"^v1/ready$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
X_FRAME_OPTIONS = "DENY"

# --- Logging and error reporting ------------------------------------------------

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in logging.getLevelNamesMapping():
    raise ImproperlyConfigured(
        f"LOG_LEVEL={LOG_LEVEL!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)."
    )
LOG_FORMAT = env_choice("LOG_FORMAT", "plain", ("plain", "json"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "request_id": {"()": "callwaiting_tts.logs.RequestIdLogFilter"},
        "redact_secrets": {"()": "callwaiting_tts.logs.SecretRedactingFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {"()": "callwaiting_tts.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id", "redact_secrets"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    # django-axes says four INFO lines on every admin login; its failures and lockouts are WARNINGs.
    "loggers": {"axes": {"level": "WARNING"}},
}

SENTRY_DSN = env_str("SENTRY_DSN")
if SENTRY_DSN:
    from callwaiting_tts.sentry import sentry_init

    sentry_init(
        SENTRY_DSN,
        release=VERSION,
        environment=env_str("SENTRY_ENVIRONMENT") or None,
        traces_sample_rate=env_float("SENTRY_TRACES_SAMPLE_RATE", 0.0, minimum=0.0),
    )
