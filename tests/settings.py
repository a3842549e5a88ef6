"""Test settings: the real settings module, fed a test environment.

Tests run against the machine's real Postgres and Redis (see Makefile).
"""

import os

os.environ["CWT_ENV_FILE"] = ""  # a developer's .env must not leak into tests
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production-0123456789abcdefghijklmnop")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/callwaiting_tts")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
# Tests revoke keys and expect the next request to fail; the cache has its own test.
os.environ.setdefault("API_KEY_CACHE_SECONDS", "0")
os.environ.setdefault("QUOTA_CACHE_SECONDS", "0")
os.environ.setdefault("ALLOWED_HOSTS", "localhost,127.0.0.1,testserver")

from callwaiting_tts.settings import *  # noqa: F403
