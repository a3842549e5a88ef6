"""Test settings: the real settings module, fed a test environment.

Tests run against the machine's real Postgres and Redis (see Makefile). Each run
names its own test database and Redis key prefix, so that two checkouts (or two
runs) on one machine never share state.
"""

import os
import secrets
import tempfile

os.environ.setdefault("CWT_TEST_RUN_ID", secrets.token_hex(4))

os.environ["CWT_ENV_FILE"] = ""  # a developer's .env must not leak into tests
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production-0123456789abcdefghijklmnop")
# pytest-django creates (and at the end drops) "test_" + this name.
os.environ.setdefault(
    "DATABASE_URL", f"postgres://postgres@127.0.0.1:5432/cwt_{os.environ['CWT_TEST_RUN_ID']}"
)
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("REDIS_KEY_PREFIX", f"cwt-test-{os.environ['CWT_TEST_RUN_ID']}")
# Tests revoke keys and expect the next request to fail; the cache has its own test.
os.environ.setdefault("API_KEY_CACHE_SECONDS", "0")
os.environ.setdefault("QUOTA_CACHE_SECONDS", "0")
# Usage records stay spooled until a test flushes them (usage.recorder.usage_flush),
# in its own transaction; a spool of this run's own.
os.environ.setdefault("USAGE_FLUSH_SECONDS", "0")
os.environ.setdefault("USAGE_SPOOL_DIR", tempfile.mkdtemp(prefix="cwt-test-usage-"))
# Tests share a loaded machine: admission by the engine's measured real-time capacity (and its
# pacing of bursts) would refuse by the machine's speed of the moment. Tests of that admission
# set ENGINE_ADMISSION=realtime and an engine whose speed they control.
os.environ.setdefault("ENGINE_ADMISSION", "fixed")
os.environ.setdefault("ALLOWED_HOSTS", "localhost,127.0.0.1,testserver")

from callwaiting_tts.settings import *  # noqa: F403
