"""Language tags matched as BCP 47 tags are (engines.base.match_language)."""

from __future__ import annotations

import pytest

from engines.base import match_language

PIPER = ("en",)
XTTS = ("en", "es", "fr", "pt", "zh-cn", "ja")


@pytest.mark.parametrize(
    ("tag", "languages", "spoken"),
    [
        ("en", PIPER, "en"),
        ("EN", PIPER, "en"),
        ("en-US", PIPER, "en"),
        ("en_US", PIPER, "en"),
        (" en-gb ", PIPER, "en"),
        ("en-Latn-US", PIPER, "en"),
        ("es-MX", XTTS, "es"),
        ("pt_BR", XTTS, "pt"),
        ("zh-CN", XTTS, "zh-cn"),
        ("zh_CN", XTTS, "zh-cn"),
        ("zh", XTTS, "zh-cn"),
        ("de", XTTS, None),
        ("de-DE", PIPER, None),
        ("e", PIPER, None),
        ("english", PIPER, None),
        ("en-US", (), "en-us"),  # an engine that lists none takes any tag
    ],
)
def test_a_tag_names_the_engines_language_whatever_its_case_separator_or_region(
    tag: str, languages: tuple[str, ...], spoken: str | None
) -> None:
    assert match_language(tag, languages) == spoken
