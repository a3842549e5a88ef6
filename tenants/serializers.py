from django.conf import settings
from rest_framework import serializers

from tenants.models import Tenant
from tenants.tokens import MAX_SCOPE_ENTRIES, TOKEN_ROUTES


class TenantOutputSerializer(serializers.ModelSerializer[Tenant]):
    api_key_prefix = serializers.SerializerMethodField()

    class Meta:
        model = Tenant
        fields = [
            "id",
            "name",
            "is_active",
            "quota_minutes",
            "rate_limit_minute",
            "rate_limit_hour",
            "max_concurrent_streams",
            "permissions",
            "created_at",
            "api_key_prefix",
        ]

    def get_api_key_prefix(self, tenant: Tenant) -> str | None:
        api_key = self.context.get("api_key")
        return getattr(api_key, "prefix", None)


class ClientTokenInputSerializer(serializers.Serializer[dict[str, object]]):
    """For the schema only: the view checks the body itself (tenants.tokens.TokenRequest)."""

    expires_in = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=settings.CLIENT_TOKEN_MAX_SECONDS,
        help_text=f"Seconds until it expires (default {settings.CLIENT_TOKEN_DEFAULT_SECONDS}).",
    )
    routes = serializers.ListField(
        child=serializers.ChoiceField(choices=sorted(TOKEN_ROUTES)),
        required=False,
        min_length=1,
        max_length=MAX_SCOPE_ENTRIES,
        help_text='What it may call; default ["stream"] (WS /v1/stream).',
    )
    voices = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        allow_null=True,
        max_length=MAX_SCOPE_ENTRIES,
        help_text="Only these voices (null: any).",
    )
    origins = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        allow_null=True,
        max_length=MAX_SCOPE_ENTRIES,
        help_text="Only from these browser origins, each among the tenant's allowed ones (null: any).",
    )


class ClientTokenOutputSerializer(serializers.Serializer[dict[str, object]]):
    token = serializers.CharField(help_text="Shown once; never logged.")
    token_id = serializers.CharField()
    expires_at = serializers.DateTimeField()
    expires_in = serializers.IntegerField()
    routes = serializers.ListField(child=serializers.CharField())
    voices = serializers.ListField(child=serializers.CharField(), allow_null=True)
    origins = serializers.ListField(child=serializers.CharField(), allow_null=True)
