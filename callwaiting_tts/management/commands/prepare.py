"""`make run`'s set-up in one process: migrate, collect static files, make sure the demo
tenant exists. Each step is skipped when it is already done, so that a restart starts
serving in seconds rather than redoing work that nothing has changed."""

from __future__ import annotations

import hashlib
import io
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor

# What collectstatic skips by default.
STATIC_IGNORE_PATTERNS = ["CVS", ".*", "*~"]
STATIC_MARKER = ".collected"


def static_fingerprint() -> str:
    """A digest of every file collectstatic would copy (path, size, mtime): it changes when a
    package that ships static files is installed, moved or removed."""
    digest = hashlib.sha256()
    entries = []
    for finder in finders.get_finders():
        for path, storage in finder.list(STATIC_IGNORE_PATTERNS):
            source = Path(storage.path(path))
            stat = source.stat()
            entries.append(f"{path}\0{source}\0{stat.st_size}\0{stat.st_mtime_ns}")
    for entry in sorted(entries):
        digest.update(entry.encode())
        digest.update(b"\n")
    return digest.hexdigest()


class Command(BaseCommand):
    help = "Migrate, collect static files and ensure the demo tenant, skipping what is already done."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--key-file", help="passed on to ensure_demo_tenant")

    def handle(self, *args: Any, **options: Any) -> str:
        steps = [self._migrate(), self._collect_static()]
        demo = io.StringIO()  # its output becomes part of this command's summary
        key_file = {"key_file": options["key_file"]} if options["key_file"] else {}
        call_command("ensure_demo_tenant", stdout=demo, **key_file)
        return "\n".join([*steps, demo.getvalue().rstrip()])

    def _migrate(self) -> str:
        executor = MigrationExecutor(connections[DEFAULT_DB_ALIAS])
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        if not plan:
            return "Database: up to date."
        call_command("migrate", interactive=False, verbosity=0)
        return f"Database: applied {len(plan)} migration(s)."

    def _collect_static(self) -> str:
        marker = Path(settings.STATIC_ROOT) / STATIC_MARKER
        fingerprint = static_fingerprint()
        if marker.is_file() and marker.read_text() == fingerprint:
            return "Static files: up to date."
        call_command("collectstatic", interactive=False, verbosity=0)
        marker.write_text(fingerprint)
        return f"Static files: collected into {settings.STATIC_ROOT}."
