"""The live access re-check of an open stream: when its tenant's keys or state change on
any process (a broadcast on the channel layer), or its key's expiry comes, the stream asks
again whether its key may still be used, by the same rule as authentication."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import DatabaseError

from tenants.models import KEY_REVOKED, ApiKey, KeyRefusal


@dataclass(frozen=True)
class AccessCheck:
    refusal: KeyRefusal | None  # None: the key is still good
    expires_at: datetime | None  # when to check again (rotation can set it)


async def access_recheck(api_key_id: int) -> AccessCheck | None:
    """The key's state now; None when the database cannot tell (the next change or the
    key's expiry will ask again)."""
    try:
        api_key = await ApiKey.objects.select_related("tenant").aget(pk=api_key_id)
    except ApiKey.DoesNotExist:
        return AccessCheck(refusal=KEY_REVOKED, expires_at=None)  # deleted: as good as revoked
    except DatabaseError:
        return None
    return AccessCheck(refusal=api_key.refusal(), expires_at=api_key.expires_at)
