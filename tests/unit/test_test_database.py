"""The teardown flush survives a server that writes a usage row while it runs
(tests/support/database.py): a real deadlock on the real PostgreSQL, lost by the flush."""

from __future__ import annotations

import threading

import psycopg
import pytest
from django.db import connection, connections
from django.test import TransactionTestCase
from psycopg import sql

from tenants.models import Tenant
from tests.support.database import TEARDOWN_FLUSH
from tests.support.tenants import TenantFactory
from tests.support.waiting import wait_until


def _server_connection() -> psycopg.Connection[tuple[object, ...]]:
    settings = connection.settings_dict
    return psycopg.connect(
        host=settings["HOST"], port=settings["PORT"], user=settings["USER"], dbname=settings["NAME"]
    )


def _flush_is_waiting(watcher: psycopg.Connection[tuple[object, ...]]) -> bool:
    row = watcher.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query ILIKE 'TRUNCATE%'"
    ).fetchone()
    return bool(row and row[0])


@pytest.mark.django_db(transaction=True)
def test_a_flush_that_loses_a_deadlock_to_a_writing_server_is_retried(make_tenant: TenantFactory) -> None:
    tables = sorted(connection.introspection.django_table_names(only_existing=True, include_views=False))
    first, last = tables[0], tables[-1]
    make_tenant("flushed")
    server, watcher = _server_connection(), _server_connection()
    watcher.autocommit = True
    try:
        # The "server" never detects the deadlock itself (its timeout is far past the
        # flush's 1 s), so the flush is always the side PostgreSQL aborts.
        server.execute("SET deadlock_timeout = '60s'")
        # As a server's INSERT holds the table that sorts last:
        server.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(sql.Identifier(last)))
        case = TransactionTestCase()
        flushed: list[BaseException | None] = []

        def flush() -> None:
            try:
                getattr(case, TEARDOWN_FLUSH)()
                flushed.append(None)
            except BaseException as error:  # reported to the test below
                flushed.append(error)
            finally:
                connections.close_all()

        flusher = threading.Thread(target=flush, daemon=True)
        flusher.start()
        wait_until(lambda: _flush_is_waiting(watcher), what="the flush to wait for the lock")
        # As the usage row's foreign-key check does at commit: it now waits for the flush,
        # which waits for it.
        server.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1 FOR KEY SHARE").format(sql.Identifier(first)))
        server.commit()
        flusher.join(timeout=60)
        assert not flusher.is_alive()
        assert flushed == [None]
    finally:
        server.close()
        watcher.close()
    assert not Tenant.objects.exists()
