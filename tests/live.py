"""A live ASGI server for tests that need real HTTP/WebSocket clients (SDKs, browsers).

The project's ASGI application runs under uvicorn in a background thread of the
test process, so it shares the test database (tests using it need
``transactional_db``), the cache and the in-memory channel layer with the test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from chatapp.relay import http as relay_http

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fresh_python(code: str, data_dir: Path) -> str:
    """What ``python -c code`` prints in a fresh process of the project on its embedded defaults.

    (Run from the project's root, with its own data directory; fails on a non-zero exit.)
    """
    from django.conf import settings

    env = {
        **os.environ,
        "SECRET_KEY": settings.SECRET_KEY,
        "SWITCHBOARD_DATA_DIR": str(data_dir),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def start_uvicorn(port: int, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """A real server process of the whole app on ``port``, once it answers ``/healthz``."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "chatapp.asgi:application",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=cwd,
        env=env,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return process
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"the server process on port {port} did not start") from None
            time.sleep(0.2)


class ThreadedServer:
    def __init__(self, app: object, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from chatapp.relay import http

        try:
            await self.server.serve()
        finally:
            await http.aclose()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the live server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server_url(transactional_db: None) -> Iterator[str]:
    from chatapp.asgi import application

    server = ThreadedServer(application).start()
    try:
        yield server.url
    finally:
        server.stop()


class CountingUpstream:
    """A real HTTP/1.1 upstream on loopback (keep-alive) that counts the connections it accepts.

    It answers every request ``200 {}``; it runs on the test's own event loop.
    """

    def __init__(self) -> None:
        self.accepted = 0
        self.requests = 0
        self.server: asyncio.Server | None = None
        self._accepting = asyncio.Event()

    async def start(self) -> CountingUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._accepting.set()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: 2\r\n\r\n{}"
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def wait_for(self, accepted: int, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while self.accepted < accepted:
                self._accepting.clear()
                await self._accepting.wait()


@pytest.fixture
async def counting_upstream() -> AsyncIterator[CountingUpstream]:
    """A started ``CountingUpstream``; at the end, this loop's client and the server closed."""
    upstream = await CountingUpstream().start()
    try:
        yield upstream
    finally:
        await relay_http.aclose()
        await upstream.close()
