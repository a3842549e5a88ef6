"""The API key format: `cwt_<prefix>_<secret>`.

- prefix: 8 characters of [a-z0-9], stored in clear and indexed, so a key is
  found with one lookup and can be named in logs, the admin and commands.
- secret: 32 characters of [A-Za-z0-9] (about 190 bits), stored only as an
  HMAC-SHA256 keyed with SECRET_KEY. The secret is random and long, so a fast
  hash is enough (a password hasher would only add latency to every request);
  rotating SECRET_KEY therefore invalidates every API key.
"""

from __future__ import annotations

import hmac
import secrets
import string
from dataclasses import dataclass

from django.utils.crypto import salted_hmac

KEY_NAMESPACE = "cwt"
PREFIX_ALPHABET = string.ascii_lowercase + string.digits
SECRET_ALPHABET = string.ascii_letters + string.digits
PREFIX_LENGTH = 8
SECRET_LENGTH = 32
_HMAC_SALT = "tenants.ApiKey.secret"


@dataclass(frozen=True)
class ParsedKey:
    prefix: str
    secret: str


def generate_prefix() -> str:
    return "".join(secrets.choice(PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))


def generate_secret() -> str:
    return "".join(secrets.choice(SECRET_ALPHABET) for _ in range(SECRET_LENGTH))


def format_key(prefix: str, secret: str) -> str:
    return f"{KEY_NAMESPACE}_{prefix}_{secret}"


def parse_key(raw: str) -> ParsedKey | None:
    """Split a presented key into its parts, or None if it is not of our format."""
    parts = raw.split("_")
    if len(parts) != 3 or parts[0] != KEY_NAMESPACE:
        return None
    prefix, secret = parts[1], parts[2]
    if len(prefix) != PREFIX_LENGTH or any(c not in PREFIX_ALPHABET for c in prefix):
        return None
    if len(secret) != SECRET_LENGTH or any(c not in SECRET_ALPHABET for c in secret):
        return None
    return ParsedKey(prefix=prefix, secret=secret)


def is_valid_prefix(prefix: str) -> bool:
    return len(prefix) == PREFIX_LENGTH and all(c in PREFIX_ALPHABET for c in prefix)


def hash_secret(secret: str) -> str:
    return salted_hmac(_HMAC_SALT, secret, algorithm="sha256").hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)
