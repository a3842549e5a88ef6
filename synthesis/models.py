from __future__ import annotations

from django.db import models

from tenants.models import Tenant


class PhraseAudio(models.Model):
    """Synthesized audio kept in storage, found again by the hash of everything that made it.

    Per tenant: two tenants' identical requests never share a row or an object.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="phrases")
    cache_key = models.CharField(max_length=64)
    storage_name = models.CharField(max_length=300)
    format = models.CharField(max_length=8)
    content_type = models.CharField(max_length=80)
    sample_rate = models.PositiveIntegerField()
    size_bytes = models.PositiveBigIntegerField()
    duration_s = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "cache_key"], name="phrase_unique_per_tenant")
        ]

    def __str__(self) -> str:
        return self.storage_name


class IdempotencyRecord(models.Model):
    """The answer given to a request that carried an Idempotency-Key, for replaying retries."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="idempotency_records")
    key = models.CharField(max_length=255)
    endpoint = models.CharField(max_length=64)
    request_hash = models.CharField(max_length=64)
    response = models.JSONField()
    # The stored audio the answer links to: a replay signs a fresh link to it, since the
    # link in `response` expires long before the key does.
    storage_name = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "endpoint", "key"], name="idempotency_key_unique_per_tenant"
            )
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.key}"
