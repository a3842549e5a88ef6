"""The GPU image's Dockerfile (Docker cannot run here): hadolint, and what it must contain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.servers import ROOT


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_daphne_as_a_non_root_user_with_a_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [
        line.split(maxsplit=1) for line in dockerfile.splitlines() if line and not line.startswith("#")
    ]
    users = [args for word, *args in instructions if word == "USER"]
    assert users
    assert users[-1] != ["root"]
    assert "/v1/health" in dockerfile.split("HEALTHCHECK", 1)[1]
    assert 'CMD ["python", "-m", "callwaiting_tts.serve"]' in dockerfile
    # Installs come from the lock and nothing else.
    assert "COPY requirements-uv.txt pyproject.toml uv.lock ./" in dockerfile
    assert "uv sync --locked --no-dev --extra xtts" in dockerfile
    assert "--require-hashes -r requirements-uv.txt" in dockerfile
    assert "collectstatic" in dockerfile
    assert "ffmpeg" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".env", "tests"} <= set(ignored)
    assert "docs" not in ignored  # the settings read docs/streaming.md
