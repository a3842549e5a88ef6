"""Typed readers for settings that come from the environment.

Each reader fails loudly with ``ImproperlyConfigured`` naming the variable, so
that a typo in a deployment stops the process at start-up instead of being
silently read as a default.
"""

from __future__ import annotations

import os

from django.core.exceptions import ImproperlyConfigured

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name}={raw!r} is not a boolean; use one of 1/0, true/false, yes/no, on/off."
    )


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer.") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum of {minimum}.")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={value} is above the maximum of {maximum}.")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number.") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum of {minimum}.")
    return value


def env_optional_float(name: str, *, minimum: float | None = None) -> float | None:
    """A number, or None when unset (the component's own default applies): never a sentinel
    value, so that a negative or garbled value is refused rather than read as "unset"."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    return env_float(name, 0.0, minimum=minimum)


def env_mapping(name: str, *, separator: str = "=") -> dict[str, str]:
    """`key=value,key=value`; an item without both sides (`alloy:joe`, `=joe`) is refused."""
    mapping: dict[str, str] = {}
    for item in env_list(name, []):
        key, found, value = (part.strip() for part in item.partition(separator))
        if not found or not key or not value:
            raise ImproperlyConfigured(
                f"{name}: {item!r} is not a pair; write {name}=name{separator}value,name{separator}value."
            )
        mapping[key] = value
    return mapping


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default).lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} must be one of: {', '.join(choices)}.")
    return value
