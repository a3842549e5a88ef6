"""Used by `make run`: make sure a demo tenant exists and print how to call the service."""

import os
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from tenants.authentication import ApiKeyError, authenticate_token
from tenants.models import Permission, Tenant
from tenants.services import api_key_issue

DEMO_TENANT = "demo"


class Command(BaseCommand):
    help = "Create the demo tenant if needed and print a curl line with a working key."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--key-file",
            default=str(settings.BASE_DIR / ".demo_api_key"),
            help="Where the demo key is kept for the next run (local development only).",
        )

    def handle(self, *args: Any, **options: Any) -> str:
        key_file = Path(options["key_file"])
        tenant, _created = Tenant.objects.get_or_create(
            name=DEMO_TENANT, defaults={"permissions": [Permission.UPLOAD.value]}
        )
        key = key_file.read_text().strip() if key_file.exists() else ""
        try:
            authenticate_token(key)
        except ApiKeyError:
            key = api_key_issue(tenant=tenant, name="make run").plaintext
            key_file.write_text(key + "\n")
            os.chmod(key_file, 0o600)
        base = settings.PUBLIC_BASE_URL
        return "\n".join(
            [
                f"Demo tenant {tenant.name!r}; its API key is kept in {key_file}.",
                f"  curl {base}/v1/health",
                f"  curl -H 'Authorization: Bearer {key}' {base}/v1/tenant",
                f"  curl -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
                f"""-d '{{"text": "Hello from CallWaiting."}}' {base}/v1/synthesize -o hello.wav""",
                f"  API docs: {base}/v1/docs",
            ]
        )
