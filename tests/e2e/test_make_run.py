"""What `make run` does, on the embedded defaults (SQLite, no Redis), through a real Daphne."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys

import httpx

from tests.support.servers import ROOT, base_env, daphne_server, manage


def embedded_env(tmp_path, **overrides: str) -> dict[str, str]:
    """What `make run` runs with when nothing is configured: SQLite and local disk."""
    return base_env(
        SECRET_KEY=secrets.token_urlsafe(50),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        STATIC_ROOT=str(tmp_path / "static"),
        MEDIA_ROOT=str(tmp_path / "media"),
        CWT_TEST_LOG_DIR=str(tmp_path),
        **overrides,
    )


def test_run_steps_give_a_server_that_answers_health_and_the_demo_key(tmp_path) -> None:
    env = embedded_env(tmp_path)
    key_file = tmp_path / "demo_key"
    printed = manage("prepare", "--key-file", str(key_file), env=env)
    assert "Database: applied" in printed
    assert "Static files: collected" in printed
    key = key_file.read_text().strip()
    assert f"Bearer {key}" in printed
    # A restart skips what is already done, and keeps the same demo key.
    again = manage("prepare", "--key-file", str(key_file), env=env)
    assert "Database: up to date." in again
    assert "Static files: up to date." in again
    assert f"Bearer {key}" in again

    with daphne_server(env) as base_url:
        health = httpx.get(f"{base_url}/v1/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        assert health.headers["X-Request-ID"]

        tenant = httpx.get(f"{base_url}/v1/tenant", headers={"Authorization": f"Bearer {key}"})
        assert tenant.status_code == 200
        assert tenant.json()["name"] == "demo"

        refused = httpx.get(f"{base_url}/v1/tenant")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "missing_api_key"

        schema = httpx.get(f"{base_url}/v1/openapi.json")
        assert schema.status_code == 200
        paths = schema.json()["paths"]
        assert {"/v1/tenant", "/v1/synthesize", "/v1/voices", "/v1/health"} <= set(paths)
        docs = httpx.get(f"{base_url}/v1/docs")
        assert docs.status_code == 200
        # The docs' assets are served locally (no CDN is reachable from a pod).
        asset = httpx.get(f"{base_url}/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui.css")
        assert asset.status_code == 200


def test_a_taken_port_ends_the_server_with_a_one_line_reason_and_a_failing_status(tmp_path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = embedded_env(tmp_path, HOST="127.0.0.1", PORT=str(port))
        result = subprocess.run(
            [sys.executable, "-m", "callwaiting_tts.serve"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    reason = result.stderr.strip().splitlines()[-1]
    assert reason.startswith(f"error: cannot listen on 127.0.0.1:{port} ("), result.stderr
    assert "Set PORT" in reason


def test_prepare_collects_static_files_again_when_they_change(tmp_path) -> None:
    env = embedded_env(tmp_path)
    key_file = str(tmp_path / "demo_key")
    manage("prepare", "--key-file", key_file, env=env)
    (tmp_path / "static" / ".collected").write_text("a fingerprint of other files")
    assert "Static files: collected" in manage("prepare", "--key-file", key_file, env=env)
