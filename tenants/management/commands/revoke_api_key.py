from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from tenants import keys
from tenants.models import ApiKey
from tenants.services import api_key_revoke


class Command(BaseCommand):
    help = "Revoke an API key by its prefix (the 8 characters after 'cwt_'). Cannot be undone."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("prefix")

    def handle(self, *args: Any, **options: Any) -> str:
        prefix = options["prefix"].strip()
        # Accept a pasted "cwt_<prefix>" or "cwt_<prefix>_…" too.
        if prefix.startswith(f"{keys.KEY_NAMESPACE}_"):
            prefix = prefix.split("_")[1]
        if not keys.is_valid_prefix(prefix):
            raise CommandError(f"{options['prefix']!r} is not a key prefix: expected 8 characters of a-z0-9.")
        api_key = ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
        if api_key is None:
            raise CommandError(f"No API key with prefix {prefix!r}.")
        if not api_key_revoke(api_key=api_key):
            raise CommandError(f"Key {api_key} of {api_key.tenant.name} was already revoked.")
        return f"Revoked key {api_key} of tenant {api_key.tenant.name}."
