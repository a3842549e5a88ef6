from typing import Any

from django.core.management.base import BaseCommand

from tenants.models import Tenant


class Command(BaseCommand):
    help = "List tenants with their limits and number of usable keys."

    def handle(self, *args: Any, **options: Any) -> str:
        tenants = Tenant.objects.with_usable_key_count().order_by("name")
        header = (
            f"{'id':36}  {'name':24}  {'active':6}  {'keys':4}  "
            + f"{'quota_min':9}  {'rpm':6}  {'rph':7}  streams"
        )
        lines = [header]
        for tenant in tenants:
            lines.append(
                f"{tenant.id!s:36}  {tenant.name[:24]:24}  {'yes' if tenant.is_active else 'no':6}  "
                f"{tenant.usable_key_count:4}  {tenant.quota_minutes:9}  {tenant.rate_limit_minute:6}  "
                f"{tenant.rate_limit_hour:7}  {tenant.max_concurrent_streams}"
            )
        return "\n".join(lines)
