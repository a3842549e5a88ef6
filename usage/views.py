"""GET /v1/usage: the caller's usage over a period, optionally grouped, and its quota."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from tenants.authentication import request_tenant
from usage.quotas import current_month
from usage.services import GROUP_FIELDS, UsageQuery, usage_summary

MAX_PERIOD = timedelta(days=400)
# `from` and `to`: a date or a datetime (_moment).
MOMENT = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}


def _moment(value: str, *, end: bool) -> datetime:
    """A date means the whole day (`to` includes it); a datetime is exact (UTC if no offset)."""
    try:
        day = date.fromisoformat(value)
    except ValueError:
        pass
    else:
        try:
            return datetime.combine(day + timedelta(days=1) if end else day, time.min, tzinfo=UTC)
        except OverflowError:  # the day after 9999-12-31
            raise serializers.ValidationError("Out of range: at most 9999-12-30.") from None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise serializers.ValidationError("Use a date (2026-11-24) or an ISO 8601 datetime.") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class UsageQuerySerializer(serializers.Serializer[dict[str, Any]]):
    group_by = serializers.ChoiceField(choices=sorted(GROUP_FIELDS), required=False)

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        values: dict[str, Any] = dict(super().to_internal_value(data))
        problems: dict[str, list[str]] = {}
        for name, is_end in (("from", False), ("to", True)):
            if (raw := data.get(name)) is not None:  # present but empty is no date: refused
                try:
                    values[name] = _moment(raw, end=is_end)
                except serializers.ValidationError as exc:
                    problems[name] = [str(detail) for detail in exc.detail]
        if data.get("group_by") == "":  # DRF reads an empty form value as absent; it is no choice
            problems["group_by"] = ["Use one of: " + ", ".join(sorted(GROUP_FIELDS)) + "."]
        if problems:
            raise serializers.ValidationError(problems)
        return values

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        start = attrs.setdefault("from", datetime.combine(current_month(), time.min, tzinfo=UTC))
        end = attrs.setdefault("to", timezone.now())
        if end <= start:
            raise serializers.ValidationError({"to": ["Must be after 'from'."]})
        if end - start > MAX_PERIOD:
            raise serializers.ValidationError({"to": [f"At most {MAX_PERIOD.days} days after 'from'."]})
        return attrs


def _metric_fields() -> dict[str, serializers.Field[Any, Any, Any, Any]]:
    """The answer's totals and groups, for the schema (usage.services.usage_summary makes
    them). Fields, not a Serializer class: `errors` is a Serializer's own attribute."""
    return {
        "requests": serializers.IntegerField(),
        "errors": serializers.IntegerField(),
        "cancelled": serializers.IntegerField(),
        "characters": serializers.IntegerField(),
        "audio_seconds": serializers.FloatField(),
        "audio_bytes": serializers.IntegerField(),
        "latency_ms_p50": serializers.FloatField(allow_null=True),
        "latency_ms_p95": serializers.FloatField(allow_null=True),
    }


class QuotaSerializer(serializers.Serializer[dict[str, Any]]):
    month = serializers.CharField()
    used_seconds = serializers.FloatField()
    limit_seconds = serializers.IntegerField(allow_null=True, help_text="null: no quota.")
    remaining_seconds = serializers.FloatField(allow_null=True)


USAGE_REPORT = inline_serializer(
    "UsageReport",
    {
        "from": serializers.DateTimeField(),
        "to": serializers.DateTimeField(),
        "group_by": serializers.ChoiceField(choices=sorted(GROUP_FIELDS), allow_null=True),
        "totals": inline_serializer("UsageTotals", _metric_fields()),
        "groups": inline_serializer(
            "UsageGroup",
            {
                "key": serializers.CharField(allow_null=True, help_text="The day, voice or endpoint."),
                **_metric_fields(),
            },
            many=True,
            required=False,
            help_text="With group_by only.",
        ),
        "quota": QuotaSerializer(),
    },
)


@extend_schema(
    summary="The caller's usage: totals, groups and this month's quota",
    parameters=[
        OpenApiParameter(
            "from",
            MOMENT,
            description="Start (a date, or an ISO 8601 datetime; default: the 1st of this month, UTC).",
        ),
        OpenApiParameter(
            "to",
            MOMENT,
            description="End: a date includes that whole day; a datetime is exclusive (default: now). "
            f"After `from`, and at most {MAX_PERIOD.days} days after it (else 400 invalid_request).",
        ),
        OpenApiParameter("group_by", OpenApiTypes.STR, enum=sorted(GROUP_FIELDS)),
    ],
    responses=USAGE_REPORT,
)
@api_view(["GET"])
def usage_report(request: Request) -> Response:
    params = UsageQuerySerializer(data=request.query_params)
    params.is_valid(raise_exception=True)
    query = UsageQuery(
        tenant=request_tenant(request),
        start=params.validated_data["from"],
        end=params.validated_data["to"],
        group_by=params.validated_data.get("group_by"),
    )
    return Response(usage_summary(query))
