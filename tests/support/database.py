"""The test database's flush, made safe beside the servers that tests run in subprocesses.

A transactional test ends with Django's flush: one TRUNCATE of every table, which locks
them in name order (`tenants_*` before `usage_*`). A server process that is still writing
a usage row at that moment holds `usage_*` and waits for its key-share lock on the tenant:
PostgreSQL sees the cycle and aborts one side, and when that is the flush the test errors
in its teardown. Which side loses depends only on timing (seen on a loaded machine), so the
flush is retried: the aborted TRUNCATE rolled back whole, and once the server's row is in,
the next TRUNCATE takes it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from django.core.management import CommandError
from django.db import OperationalError
from django.test import TransactionTestCase

DEADLOCK_DETECTED = "40P01"
FLUSH_ATTEMPTS = 5
# Django's private name for the flush at the end of a transactional test (its stubs do not
# declare it); tests/unit/test_test_database.py fails if it stops being the one that runs.
TEARDOWN_FLUSH = "_fixture_teardown"


def is_deadlock(error: BaseException) -> bool:
    """Whether PostgreSQL's deadlock error is anywhere in the chain (flush wraps the
    database's error in a CommandError, Django's in its own OperationalError)."""
    cause: BaseException | None = error
    while cause is not None:
        if getattr(cause, "sqlstate", None) == DEADLOCK_DETECTED:
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def retry_flush_on_deadlock() -> None:
    """Wrap TransactionTestCase's teardown flush in a bounded retry on deadlock."""
    flush: Callable[[Any], None] = getattr(TransactionTestCase, TEARDOWN_FLUSH)
    if getattr(flush, "retries_deadlocks", False):
        return

    def fixture_teardown(self: TransactionTestCase) -> None:
        for attempt in range(1, FLUSH_ATTEMPTS + 1):
            try:
                flush(self)
                return
            except (CommandError, OperationalError) as error:
                if not is_deadlock(error) or attempt == FLUSH_ATTEMPTS:
                    raise
                time.sleep(0.1 * attempt)

    fixture_teardown.retries_deadlocks = True  # type: ignore[attr-defined]
    setattr(TransactionTestCase, TEARDOWN_FLUSH, fixture_teardown)
