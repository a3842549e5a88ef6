"""What `make run` does, on the embedded defaults (SQLite, no Redis), through a real Daphne."""

from __future__ import annotations

import secrets

import httpx

from tests.servers import base_env, daphne_server, manage


def test_run_steps_give_a_server_that_answers_health_and_the_demo_key(tmp_path) -> None:
    env = base_env(
        SECRET_KEY=secrets.token_urlsafe(50),
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        STATIC_ROOT=str(tmp_path / "static"),
        MEDIA_ROOT=str(tmp_path / "media"),
        CWT_TEST_LOG_DIR=str(tmp_path),
    )
    manage("migrate", "--noinput", env=env)
    manage("collectstatic", "--noinput", "--verbosity", "0", env=env)
    key_file = tmp_path / "demo_key"
    printed = manage("ensure_demo_tenant", "--key-file", str(key_file), env=env)
    key = key_file.read_text().strip()
    assert f"Bearer {key}" in printed

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
