"""A slowloris against our own Daphne: N connections from 127.0.0.1 trickling their headers
(one header line every 2 s, never finishing), while /v1/health is asked every 0.2 s.

Reports when the server closed them (how many by the per-address cap at once, how many at
the header deadline) and how /v1/health answered throughout.

    .venv/bin/python -m bench.slowloris [--connections 2000] [--per-client 0] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import percentile, start_server


async def loris(host: str, port: int, started: float, closed_at: list[float], deadline: float) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        closed_at.append(time.monotonic() - started)
        return
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        number = 0
        while time.monotonic() < deadline:
            number += 1
            writer.write(f"X-Slow-{number}: a\r\n".encode())
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(65536), 2.0)
            except TimeoutError:
                continue
            if not data:
                break
            # A 408: read to the end.
            while await reader.read(65536):
                pass
            break
        else:
            return  # still open at the end
        closed_at.append(time.monotonic() - started)
    except (ConnectionError, OSError):
        closed_at.append(time.monotonic() - started)
    finally:
        writer.close()


async def health(base_url: str, deadline: float, answers: list[tuple[int, float]]) -> None:
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            began = time.monotonic()
            try:
                status = (await client.get(f"{base_url}/v1/health")).status_code
            except httpx.HTTPError:
                status = 0
            answers.append((status, time.monotonic() - began))
            await asyncio.sleep(0.2)


async def attack(base_url: str, connections: int, seconds: float) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    started = time.monotonic()
    deadline = started + seconds
    closed_at: list[float] = []
    answers: list[tuple[int, float]] = []
    prober = asyncio.create_task(health(base_url, deadline, answers))
    await asyncio.sleep(1.0)
    await asyncio.gather(*(loris(host, int(port), started, closed_at, deadline) for _ in range(connections)))
    await prober
    ok = [took for status, took in answers if status == 200]
    print(
        f"connections: {connections}; closed by the server: {len(closed_at)}; open at the end: "
        f"{connections - len(closed_at)}"
    )
    if closed_at:
        print(
            f"closed after (s since start): p50 {percentile(closed_at, 0.5):.1f}, "
            f"p95 {percentile(closed_at, 0.95):.1f}, max {max(closed_at):.1f}"
        )
    print(
        f"/v1/health: {len(ok)} of {len(answers)} answered 200; "
        f"p50 {percentile(ok, 0.5) * 1000:.0f} ms, p95 {percentile(ok, 0.95) * 1000:.0f} ms, "
        f"max {max(ok) * 1000:.0f} ms"
        if ok
        else "/v1/health never answered"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--per-client", default="256", help="CONNECTIONS_PER_CLIENT_MAX (0: no cap)")
    parser.add_argument("--header-timeout", default="10", help="HTTP_HEADER_TIMEOUT_SECONDS")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=8797)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        process, base_url, _key = start_server(
            Path(workdir),
            port=args.port,
            make_tenant=False,
            CONNECTIONS_PER_CLIENT_MAX=args.per_client,
            HTTP_HEADER_TIMEOUT_SECONDS=args.header_timeout,
        )
        try:
            asyncio.run(attack(base_url, args.connections, args.seconds))
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
