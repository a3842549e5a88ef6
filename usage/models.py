"""One row per request to a synthesis endpoint: what billing and the dashboard read.

Rows carry counts only, never the text: tenants' text is personal data.
"""

from __future__ import annotations

import uuid

from django.db import models

from tenants.models import Tenant


class UsageLog(models.Model):
    # Made when the request starts, so a row buffered through an outage and
    # written twice is recognised as the same row.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # PROTECT: usage is the audit trail and the bill; no deletion may take it along.
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="usage_logs")
    # The X-Request-ID of the response (the client's own id when it sent a
    # plain one), or the utterance's id on the WebSocket. Indexed, not unique:
    # a client may repeat its ids, and a repeat must not drop a billable row.
    request_id = models.CharField(max_length=128)
    endpoint = models.CharField(max_length=32)
    input_chars = models.PositiveIntegerField(default=0)
    audio_bytes = models.PositiveBigIntegerField(default=0)
    audio_seconds = models.FloatField(default=0.0)
    latency_ms = models.FloatField(null=True, blank=True, help_text="Time to the first audio byte.")
    total_ms = models.FloatField()
    streaming = models.BooleanField(default=False)
    voice_id = models.CharField(max_length=64, blank=True, default="")
    format = models.CharField(max_length=16, blank=True, default="")
    cached = models.BooleanField(default=False, help_text="Served from the phrase cache: no new audio.")
    status_code = models.PositiveSmallIntegerField()
    # Null on success (as the dashboard's API contract says), not "".
    error_code = models.CharField(max_length=64, null=True, blank=True)  # noqa: DJ001
    created_at = models.DateTimeField(db_index=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "created_at"], name="usage_tenant_created"),
            models.Index(fields=["tenant", "request_id"], name="usage_tenant_request"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.status_code} {self.request_id}"

    @property
    def succeeded(self) -> bool:
        return self.error_code is None


class QuotaUsage(models.Model):
    """Seconds of audio a tenant has been sent in one calendar month (UTC)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="quota_usage")
    month = models.DateField(help_text="The first day of the month (UTC).")
    audio_seconds = models.FloatField(default=0.0)

    class Meta:
        # The table keeps the name it had when the model lived in tenants/: moving the
        # model moved no data (migrations usage.0002 and tenants.0003 change state only).
        db_table = "tenants_quotausage"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "month"], name="quota_usage_unique_per_month")
        ]

    def __str__(self) -> str:
        return f"{self.tenant} {self.month:%Y-%m}: {self.audio_seconds / 60:.1f} min"
