"""Pre-synthesize a tenant's prompts into the phrase cache, so their first real use is a cache hit."""

from __future__ import annotations

import asyncio
import csv
import sys
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from core.errors import ServiceError
from synthesis.admission import SynthesisRequest, synthesis_admit
from synthesis.stored_audio import stored_audio_for
from tenants.models import Tenant
from tenants.services import TenantNotFound, tenant_resolve


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; a .csv file takes the first column of each row."""
    if not path.is_file():
        raise CommandError(f"{path} is not a file.")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = (row[0] if row else "" for row in csv.reader(handle)) if path.suffix == ".csv" else handle
        prompts = [line.strip() for line in rows if line.strip()]
    if not prompts:
        raise CommandError(f"{path} holds no prompts.")
    return prompts


class Command(BaseCommand):
    help = "Synthesize a list of prompts (text file or CSV, one per line) into a tenant's phrase cache."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("tenant", help="Tenant id or name.")
        parser.add_argument("prompts", type=Path)
        parser.add_argument("--voice-id")
        parser.add_argument("--language")
        parser.add_argument("--format", default="wav")
        parser.add_argument("--sample-rate", type=int)
        parser.add_argument("--speed", type=float, default=1.0)

    def handle(self, *args: Any, **options: Any) -> str:
        try:
            tenant = tenant_resolve(options["tenant"])
        except TenantNotFound as exc:
            raise CommandError(str(exc)) from None
        prompts = read_prompts(options["prompts"])
        stored, cached, failed = asyncio.run(self._warm(tenant, prompts, options))
        return f"{len(prompts)} prompts: {stored} synthesized, {cached} already cached, {failed} failed."

    async def _warm(
        self, tenant: Tenant, prompts: list[str], options: dict[str, Any]
    ) -> tuple[int, int, int]:
        stored = cached = failed = 0
        for prompt in tqdm(prompts, desc="warming", unit="prompt", file=sys.stderr):
            try:
                wanted = SynthesisRequest(
                    text=prompt,
                    voice_id=options["voice_id"],
                    language=options["language"],
                    audio_format=options["format"],
                    sample_rate=options["sample_rate"],
                    speed=options["speed"],
                )
                # Admitted like any synthesis (checks and quota; no rate limit, no stream).
                admission = await synthesis_admit(tenant=tenant, request=wanted, meter=None)
                assert admission.plan is not None
                result = await stored_audio_for(tenant=tenant, plan=admission.plan)
            except ServiceError as exc:
                failed += 1
                self.stderr.write(f"skipped {prompt[:40]!r}: {exc.message}")
                continue
            if result.cached:
                cached += 1
            else:
                stored += 1
        return stored, cached, failed
