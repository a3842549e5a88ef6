from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from tenants.services import TenantNotFound, api_key_rotate, tenant_resolve


class Command(BaseCommand):
    help = "Issue a new API key for a tenant; its current keys expire after the grace period."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("tenant", help="Tenant id or name.")
        parser.add_argument("--grace-seconds", type=int, default=86400, help="Default: 86400 (24 hours).")

    def handle(self, *args: Any, **options: Any) -> str:
        if options["grace_seconds"] < 0:
            raise CommandError("--grace-seconds cannot be negative.")
        try:
            tenant = tenant_resolve(options["tenant"])
        except TenantNotFound as exc:
            raise CommandError(str(exc)) from None
        issued = api_key_rotate(tenant=tenant, grace_seconds=options["grace_seconds"])
        grace = options["grace_seconds"]
        self.stderr.write(
            f"Rotated keys of {tenant.name}: old keys stop in {grace} s. New key, shown only now:"
        )
        return issued.plaintext
