"""A form with too many fields or files is the client's 400 with a stable code, in the JSON
error shape, never a 500 (which also sent a Sentry event per request)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from tenants.services import tenant_create

pytestmark = pytest.mark.django_db


def _upload(data: dict[str, Any]) -> Any:
    _tenant, issued = tenant_create(name="bounds-uploader", permissions=["upload"])
    return Client().post("/v1/voices/upload", data, headers={"Authorization": f"Bearer {issued.plaintext}"})


def _file(index: int) -> SimpleUploadedFile:
    return SimpleUploadedFile(f"ref{index}.wav", b"RIFF0000WAVE", content_type="audio/wav")


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({f"field{i}": "x" for i in range(settings.DATA_UPLOAD_MAX_NUMBER_FIELDS + 1)}, "too_many_fields"),
        ({f"file{i}": _file(i) for i in range(settings.DATA_UPLOAD_MAX_NUMBER_FILES + 1)}, "too_many_files"),
    ],
    ids=["fields", "files"],
)
def test_a_form_over_the_field_or_file_bound_is_a_400_with_a_stable_code(
    extra: dict[str, Any], code: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        response = _upload({"name": "Desk", "language": "en", "file": _file(99), **extra})
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert response["X-Request-ID"] == error["request_id"]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]  # no Sentry event


def test_a_form_within_the_bounds_reaches_the_uploads_own_checks() -> None:
    response = _upload({"language": "en", "file": _file(0)})  # no name
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
