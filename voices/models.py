from __future__ import annotations

import uuid

from django.db import models

from tenants.models import Tenant


class Voice(models.Model):
    """A tenant's cloned voice: its reference audio and the engine conditioning made from it.

    `conditioning` is only valid for the engine model named by
    `conditioning_model`; a different model recomputes it from the reference.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="voices")
    voice_id = models.SlugField(max_length=64)
    name = models.CharField(max_length=200)
    language = models.CharField(max_length=16)
    meta = models.JSONField(default=dict, blank=True)
    reference_audio = models.FileField(max_length=300)
    reference_seconds = models.FloatField()
    conditioning = models.BinaryField(editable=False)
    conditioning_model = models.CharField(max_length=200, editable=False)
    # Bumped whenever the conditioning changes: part of every cache key that depends on it.
    conditioning_version = models.PositiveIntegerField(default=1, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["tenant", "voice_id"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "voice_id"], name="voice_id_unique_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.voice_id} ({self.tenant})"
