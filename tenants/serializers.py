from rest_framework import serializers

from tenants.models import Tenant


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
