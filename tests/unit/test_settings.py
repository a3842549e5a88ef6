"""Settings are read from the environment and fail loudly on bad values.

Each case runs a fresh interpreter, since settings are read once per process.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.servers import ROOT

PRODUCTION_ENV = {
    "SECRET_KEY": secrets.token_urlsafe(50),
    "ALLOWED_HOSTS": "tts.example.com",
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/postgres",
    "REDIS_URL": "redis://127.0.0.1:6379/15",
    "PUBLIC_BASE_URL": "https://tts.example.com",
    "SECURE_PROXY_SSL_HEADER": "1",
    "SECURE_SSL_REDIRECT": "1",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "SECURE_HSTS_PRELOAD": "1",
    "SESSION_COOKIE_SECURE": "1",
    "CSRF_COOKIE_SECURE": "1",
}


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "CWT_ENV_FILE": ""}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "callwaiting_tts.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def read_setting(expression: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_python(f"from django.conf import settings as s; print({expression})", env)


def test_manage_py_check_deploy_passes_with_production_settings() -> None:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "CWT_ENV_FILE": ""}
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**base, **PRODUCTION_ENV},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_secret_key_is_required_when_debug_is_off() -> None:
    result = read_setting("s.SECRET_KEY", {})
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


def test_debug_is_off_unless_asked_for() -> None:
    result = read_setting("s.DEBUG", {"SECRET_KEY": "x" * 50})
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DEBUG", "maybe", "DEBUG='maybe' is not a boolean"),
        ("PORT", "eighty", "PORT='eighty' is not an integer"),
        ("PORT", "70000", "above the maximum"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL='LOUD' is not a logging level"),
        ("TTS_ENGINE", "espeak", "TTS_ENGINE='espeak' must be one of"),
        ("PUBLIC_BASE_URL", "ftp://x", "must start with http"),
        ("DATABASE_URL", "nosuchdb://x", "DATABASE_URL cannot be parsed"),
        # Values once read silently as "unset" or dropped.
        ("PIPER_NOISE_SCALE", "-5", "PIPER_NOISE_SCALE=-5.0 is below the minimum"),
        ("PIPER_NOISE_W_SCALE", "loud", "PIPER_NOISE_W_SCALE='loud' is not a number"),
        ("OPENAI_VOICE_MAP", "alloy:joe", "OPENAI_VOICE_MAP: 'alloy:joe' is not a pair"),
        ("OPENAI_VOICE_MAP", "alloy=joe,=joe", "OPENAI_VOICE_MAP: '=joe' is not a pair"),
        ("ENGINE_ADMISSION", "loose", "ENGINE_ADMISSION='loose' must be one of"),
    ],
)
def test_bad_values_stop_start_up_with_a_message_naming_the_variable(
    variable: str, value: str, message: str
) -> None:
    result = read_setting("s.DEBUG", {"SECRET_KEY": "x" * 50, variable: value})
    assert result.returncode != 0
    assert message in result.stderr


def test_voice_maps_and_optional_numbers_parse_when_well_formed() -> None:
    env = {"SECRET_KEY": "x" * 50, "OPENAI_VOICE_MAP": " alloy = joe , echo=joe ", "PIPER_NOISE_SCALE": "0"}
    result = read_setting("s.OPENAI_VOICE_MAP, s.PIPER_NOISE_SCALE, s.PIPER_NOISE_W_SCALE", env)
    assert result.stdout.strip() == "{'alloy': 'joe', 'echo': 'joe'} 0.0 None", result.stderr


def test_no_database_url_means_an_embedded_sqlite_file() -> None:
    result = read_setting("s.DATABASES['default']['ENGINE']", {"SECRET_KEY": "x" * 50})
    # django-prometheus's wrapper of Django's SQLite backend (it counts queries)
    assert result.stdout.strip() == "django_prometheus.db.backends.sqlite3"


def test_a_supabase_pooler_url_disables_server_side_cursors() -> None:
    url = "postgresql://postgres.abc:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres?sslmode=require"
    result = read_setting(
        "s.DATABASES['default']['ENGINE'], s.DATABASES['default']['DISABLE_SERVER_SIDE_CURSORS'], "
        "s.DATABASES['default']['OPTIONS']",
        {"SECRET_KEY": "x" * 50, "DATABASE_URL": url},
    )
    assert result.returncode == 0, result.stderr
    assert "postgresql" in result.stdout
    assert "True" in result.stdout
    assert "'sslmode': 'require'" in result.stdout


def test_s3_bucket_switches_default_storage_to_s3_and_supabase_url_sets_its_endpoint() -> None:
    result = read_setting(
        "s.STORAGES['default']['BACKEND'], s.STORAGES['default']['OPTIONS']['endpoint_url']",
        {"SECRET_KEY": "x" * 50, "S3_BUCKET": "audio", "SUPABASE_URL": "https://abc.supabase.co"},
    )
    assert result.returncode == 0, result.stderr
    assert "storages.backends.s3.S3Storage" in result.stdout
    assert "https://abc.supabase.co/storage/v1/s3" in result.stdout


def test_redis_url_selects_the_redis_channel_layer() -> None:
    result = read_setting(
        "s.CHANNEL_LAYERS['default']['BACKEND']",
        {"SECRET_KEY": "x" * 50, "REDIS_URL": "redis://127.0.0.1:6379/0"},
    )
    assert result.stdout.strip() == "core.channel_layer.ResilientRedisChannelLayer"


@pytest.mark.parametrize(
    ("engine_env", "message"),
    [
        ({"TTS_ENGINE": "xtts"}, "TTS_ENGINE=xtts needs XTTS_MODEL_PATH"),
        ({"TTS_ENGINE": "xtts", "XTTS_MODEL_PATH": "/nonexistent"}, "is not a directory"),
    ],
)
def test_a_misconfigured_engine_stops_the_server_at_start_up(
    engine_env: dict[str, str], message: str
) -> None:
    result = run_python("import callwaiting_tts.asgi", {"SECRET_KEY": "x" * 50, **engine_env})
    assert result.returncode != 0
    assert message in result.stderr


def test_a_bad_xtts_device_stops_the_server_at_start_up(xtts_checkpoint: Path) -> None:
    env = {"SECRET_KEY": "x" * 50, "XTTS_MODEL_PATH": str(xtts_checkpoint), "XTTS_DEVICE": "cuda:3"}
    result = run_python("import callwaiting_tts.asgi", env)
    assert result.returncode != 0
    assert "CUDA is not available" in result.stderr
