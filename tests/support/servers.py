"""Real servers on loopback for end-to-end tests: Daphne running our ASGI app."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent.parent

# An environment for a server subprocess (tests/conftest.py's `service_env` makes them).
ServiceEnv = Callable[..., dict[str, str]]


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
        wait_until_healthy(process, base_url, log_path, timeout_s=startup_timeout)
        yield process, base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_healthy(
    process: subprocess.Popen[bytes], base_url: str, log_path: Path, *, timeout_s: float = 60.0
) -> None:
    """Until the server answers /v1/health; fails with its log if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise AssertionError(f"Daphne exited early:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{base_url}/v1/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"Daphne did not answer within {timeout_s}s:\n{log_path.read_text()}")
        time.sleep(0.1)


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


class PostgresServer:
    """A private PostgreSQL cluster on loopback that a test may stop and start
    (the machine's own cluster holds the test database and must stay up)."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"postgres://postgres@127.0.0.1:{port}/postgres"

    def _run(self, *command: str) -> None:
        # PostgreSQL refuses to run as root: run it as the postgres user then.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def _pg(self, program: str) -> str:
        return str(_postgres_bin_dir() / program)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            self._pg("pg_ctl"), "-D", str(self.directory / "data"), "-o", options,
            "-l", str(self.directory / "server.log"), "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run(self._pg("pg_ctl"), "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop")


def _postgres_bin_dir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        raise AssertionError("PostgreSQL's server programs are not installed (/usr/lib/postgresql/*/bin)")
    return candidates[-1].parent


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    import pwd
    import shutil
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="cwt-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(directory, account.pw_uid, account.pw_gid)
    server = PostgresServer(directory, free_port())
    try:
        server._run(
            server._pg("initdb"), "-D", str(directory / "data"), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        server.start()
        yield server
    finally:
        with suppress(subprocess.CalledProcessError):  # already stopped
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


class RedisServer:
    """A private redis-server on loopback that a test may stop and start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip()
            != b"PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def cli(self, *args: str) -> str:
        """A redis-cli command against this server; its reply."""
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10, check=True
        )
        return result.stdout.strip()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
