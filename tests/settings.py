"""Test settings: the real settings module, fed a test environment.

Tests run against the machine's real Postgres and Redis (see Makefile).
"""

import os
import tempfile

os.environ["CWT_ENV_FILE"] = ""  # a developer's .env must not leak into tests
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production-0123456789abcdefghijklmnop")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/callwaiting_tts")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
# Tests revoke keys and expect the next request to fail; the cache has its own test.
os.environ.setdefault("API_KEY_CACHE_SECONDS", "0")
os.environ.setdefault("QUOTA_CACHE_SECONDS", "0")
# Usage records stay spooled until a test flushes them (usage.recorder.usage_flush),
# in its own transaction; a spool of this run's own.
os.environ.setdefault("USAGE_FLUSH_SECONDS", "0")
os.environ.setdefault("USAGE_SPOOL_DIR", tempfile.mkdtemp(prefix="cwt-test-usage-"))
os.environ.setdefault("ALLOWED_HOSTS", "localhost,127.0.0.1,testserver")

from callwaiting_tts.settings import *  # noqa: F403
