"""Real servers on loopback for end-to-end tests: Daphne running our ASGI app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**overrides: str) -> dict[str, str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/tmp"),
        "CWT_ENV_FILE": "",
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "callwaiting_tts.settings",
    }
    env.update(overrides)
    return env


def manage(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise AssertionError(f"manage.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@contextmanager
def daphne_server(env: dict[str, str], *, startup_timeout: float = 60.0) -> Iterator[str]:
    """Start `python -m callwaiting_tts.serve` (what `make run` starts) and yield its base URL."""
    with daphne_process(env, startup_timeout=startup_timeout) as (_process, base_url):
        yield base_url


@contextmanager
def daphne_process(
    env: dict[str, str], *, startup_timeout: float = 60.0
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """As daphne_server, also yielding the process (for tests that kill it)."""
    port = free_port()
    env = {"PUBLIC_BASE_URL": f"http://127.0.0.1:{port}", **env, "HOST": "127.0.0.1", "PORT": str(port)}
    log_path = Path(env.get("CWT_TEST_LOG_DIR", "/tmp")) / f"daphne-{port}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "callwaiting_tts.serve"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"Daphne exited early:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{base_url}/v1/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Daphne did not answer within {startup_timeout}s:\n{log_path.read_text()}"
                )
            time.sleep(0.1)
        yield process, base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's standalone server: a real S3 API over HTTP on loopback. Yields its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1.0)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("moto_server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for moto's server, independent of the service's own storage client."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
