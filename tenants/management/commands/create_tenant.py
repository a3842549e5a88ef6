from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError

from tenants.models import Permission
from tenants.services import tenant_create


def positive_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


class Command(BaseCommand):
    help = "Create a tenant and print its first API key (shown this once only)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--quota-minutes", type=positive_int)
        parser.add_argument("--rate-limit-minute", type=positive_int)
        parser.add_argument("--rate-limit-hour", type=positive_int)
        parser.add_argument("--max-concurrent-streams", type=positive_int)
        parser.add_argument(
            "--permission", action="append", default=[], choices=Permission.values, help="Repeatable."
        )

    def handle(self, *args: Any, **options: Any) -> str:
        name = options["name"].strip()
        if not name:
            raise CommandError("The tenant name cannot be empty.")
        try:
            tenant, issued = tenant_create(
                name=name,
                quota_minutes=options["quota_minutes"],
                rate_limit_minute=options["rate_limit_minute"],
                rate_limit_hour=options["rate_limit_hour"],
                max_concurrent_streams=options["max_concurrent_streams"],
                permissions=options["permission"],
            )
        except IntegrityError:
            raise CommandError(f"A tenant named {name!r} already exists.") from None
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(f"Created tenant {tenant.name} ({tenant.id}). Its API key, shown only now:")
        return issued.plaintext
