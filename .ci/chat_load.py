"""Browser-chat load: N WebSocket clients send a message at the same moment to Daphne.

Run by hand (not part of the test suite), from the project root::

    .venv/bin/python .ci/chat_load.py                       # 200 clients, one worker, embedded
    .venv/bin/python .ci/chat_load.py --redis redis://127.0.0.1:6379/14
    .venv/bin/python .ci/chat_load.py --clients 1000 --workers 2 \
        --redis redis://127.0.0.1:6379/14 --database-url postgres://postgres@127.0.0.1:5432/sb_chat_load
    .venv/bin/python .ci/chat_load.py --profile /tmp/chat.prof   # with py-spy's top functions
        # (PY_SPY_RATE: samples per second, default 200; PY_SPY_FLAGS: default --gil)

What it does, everything on 127.0.0.1:

1. starts the shared kit's fake OpenAI upstream (``../shared/bench/fake_upstream.py
   --port 18300``) streaming 40 chunks 25 ms apart (``--chunks``, ``--chunk-delay-ms``):
   about one second per reply;
2. makes a scratch Switchboard (its own ``SWITCHBOARD_DATA_DIR`` under /tmp; SQLite and
   the in-memory channel layer unless ``--database-url`` / ``--redis``, whose database is
   created afresh / flushed): ``manage.py bootstrap``, ``provider add bench``, ``model add
   bench-model``, ``user add``; then, in ``manage.py shell``, the user's web key
   (``keys.actions.do_get_web_key``) with its limits cleared and a session for the user
   (Django's SessionStore, as a sign-in would make);
3. starts ``--workers`` Daphne processes (``python -m chatapp.server -p 18301..
   chatapp.asgi:application``, with ``SWITCHBOARD_CHAT_TITLES=false``); several need Redis;
4. opens N WebSockets to ``/ws/chat/``, spread over the workers (the ``sessionid``
   cookie, and an ``Origin`` header for the origin check), waits until all are open,
   then has every client send ``{"action": "send", "conversation": null, "text":
   "hello", "model": "bench-model"}`` at the same moment and read until its ``done``;
5. reports, per client, the time from the send to the server's ``messages`` (the turn is
   saved), to the first ``delta`` and to ``done``; errors (``error`` events, a ``done``
   whose status is not ``complete``, a streamed text other than the chunks sent,
   timeouts, dropped sockets); each worker's RSS (``VmRSS`` in /proc, sampled every
   100 ms) idle, with the sockets open (and so per idle socket), and at its peak; the CPU
   seconds the workers used from the send to the last ``done`` (one worker is one core
   at most); the replies' statuses in the database; and the errors the workers logged
   (SQLite's "database is locked", tracebacks);
6. prints one JSON line, then a human summary, and stops every process (and removes the
   data directory unless ``--keep``).

Needs the ``websockets`` and ``daphne`` packages (both dependencies of the project),
``httptools`` for the fake upstream, and ``py-spy`` for ``--profile``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DEFAULT_KIT = Path(__file__).resolve().parents[2] / "shared" / "bench"
ASGI_APP = "chatapp.asgi:application"
CHUNKS = 40  # per reply, unless --chunks


def expected_text(chunks: int) -> str:
    return "".join(f"tok{i} " for i in range(chunks))


EMAIL = "load@example.com"
MODEL = "bench-model"  # named in each send: bootstrap makes the local model the default
PASSWORD = "load-test-password-123"  # noqa: S105 - a scratch user on loopback

SETUP = """
import json
from importlib import import_module
from django.conf import settings
from django.contrib.auth import get_user_model
from keys.actions import do_get_web_key, do_set_limits

SessionStore = import_module(settings.SESSION_ENGINE).SessionStore

user = get_user_model().objects.get(email=EMAIL)
key = do_get_web_key(user=user)
do_set_limits(key=key, **{name: None for name in ("rpm", "rpd", "tpm", "tpd", "concurrency")})
session = SessionStore()
session["_auth_user_id"] = str(user.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = user.get_session_auth_hash()
session.create()
key.refresh_from_db()
print(json.dumps({"session": session.session_key, "cookie": settings.SESSION_COOKIE_NAME,
                  "key": key.pk, "rpm": key.rpm, "engine": settings.SESSION_ENGINE}))
"""


@dataclass
class Client:
    index: int
    connected: bool = False
    sent_at: float = 0.0
    ack: float | None = None  # send → "messages" (the user's turn is saved)
    first_delta: float | None = None
    done: float | None = None
    status: str = ""
    text: str = ""
    deltas: int = 0
    errors: list[str] = field(default_factory=list)


class RssSampler(threading.Thread):
    """VmRSS of one process, in kB, every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def cpu(self) -> float:
        """CPU seconds (user + system) the process has used so far."""
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """CPU seconds in user and in system mode the process has used so far."""
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            tick = os.sysconf("SC_CLK_TCK")
            return int(fields[11]) / tick, int(fields[12]) / tick
        except (OSError, IndexError, ValueError):
            return 0.0, 0.0

    def read(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append((time.perf_counter(), self.read()))
            self.stopping.wait(self.interval)

    def peak(self, since: float = 0.0) -> int:
        return max((kb for when, kb in self.samples if when >= since), default=0)


def percentile(values: list[float], share: float) -> float | None:
    """Linear interpolation between the closest ranks (as numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * share
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(values: list[float]) -> dict[str, float | None]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "n": len(values),
        "min": ms(min(values) if values else None),
        "p50": ms(percentile(values, 0.5)),
        "p90": ms(percentile(values, 0.9)),
        "p99": ms(percentile(values, 0.99)),
        "max": ms(max(values) if values else None),
    }


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with status {process.returncode} while starting")
        with socket.socket() as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g} s")


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def manage(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [PYTHON, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


async def run_client(
    client: Client,
    url: str,
    headers: dict[str, str],
    opened: asyncio.Queue[int],
    go: asyncio.Event,
    limit: float,
    expected: str,
) -> None:
    try:
        async with websockets.connect(
            url, additional_headers=headers, open_timeout=60, max_size=2**22, ping_interval=None
        ) as ws:
            client.connected = True
            await opened.put(client.index)
            await go.wait()
            client.sent_at = time.perf_counter()
            await ws.send(
                json.dumps(
                    {
                        "action": "send",
                        "conversation": None,
                        "text": "hello",
                        "attachments": [],
                        "model": MODEL,
                    }
                )
            )
            async with asyncio.timeout(limit):
                while True:
                    event = json.loads(await ws.recv())
                    now = time.perf_counter() - client.sent_at
                    kind = event.get("type")
                    if kind == "messages" and client.ack is None:
                        client.ack = now
                    elif kind == "delta":
                        if client.first_delta is None:
                            client.first_delta = now
                        client.deltas += 1
                        client.text += event.get("text", "")
                    elif kind == "error":
                        client.errors.append(f"error event: {event.get('error')}")
                        return
                    elif kind == "done":
                        client.done = now
                        client.status = str(event.get("status"))
                        if client.status != "complete":
                            client.errors.append(f"done with status {client.status}")
                        elif client.text != expected:
                            client.errors.append(
                                f"streamed text differs ({client.deltas} deltas, "
                                f"{len(client.text)} characters)"
                            )
                        return
    except TimeoutError:
        client.errors.append(f"no done within {limit:g} s")
    except websockets.exceptions.InvalidStatus as exc:
        client.errors.append(f"handshake refused: HTTP {exc.response.status_code}")
    except websockets.exceptions.ConnectionClosed as exc:
        client.errors.append(f"socket closed: {exc.rcvd.code if exc.rcvd else 'no close frame'}")
    except OSError as exc:
        client.errors.append(f"connection failed: {exc}")
    finally:
        if not client.connected:
            await opened.put(client.index)


async def load(
    clients: list[Client],
    targets: list[tuple[str, dict[str, str]]],
    limit: float,
    samplers: list[RssSampler],
    expected: str,
    upstream: RssSampler,
    spy_command: list[str] | None = None,
    spies: list[subprocess.Popen[bytes]] | None = None,
) -> dict[str, Any]:
    """Client ``i`` talks to ``targets[i % len(targets)]`` (url, headers): one per worker.

    ``spy_command``: py-spy's, started once every socket is open (the burst alone is
    sampled) and added to ``spies`` for the caller to stop.
    """
    opened: asyncio.Queue[int] = asyncio.Queue()
    go = asyncio.Event()
    tasks = [
        asyncio.create_task(
            run_client(client, *targets[client.index % len(targets)], opened, go, limit, expected)
        )
        for client in clients
    ]
    connect_started = time.perf_counter()
    for _ in clients:
        await opened.get()
    connected_in = time.perf_counter() - connect_started
    await asyncio.sleep(1.0)  # let the workers settle after the handshakes
    if spy_command is not None:
        spy = await asyncio.to_thread(
            subprocess.Popen, spy_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if spies is not None:
            spies.append(spy)
        await asyncio.sleep(1.0)  # py-spy attaches
    rss_connected = [sampler.read() for sampler in samplers]
    before = [sampler.cpu_split() for sampler in samplers]
    upstream_before, own_before = upstream.cpu(), time.process_time()
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    after = [sampler.cpu_split() for sampler in samplers]
    upstream_cpu, own_cpu = upstream.cpu() - upstream_before, time.process_time() - own_before
    cpu = [a[0] - b[0] + a[1] - b[1] for a, b in zip(after, before, strict=True)]
    system = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return {
        "connect_s": round(connected_in, 2),
        "rss_connected_kb": rss_connected,
        "started": started,
        "wall_s": round(wall, 2),
        "daphne_cpu_s": round(sum(cpu), 2),
        "daphne_cpu_per_worker_s": [round(value, 2) for value in cpu],
        "daphne_system_cpu_s": round(system, 2),
        "daphne_cpu_share": round(max(cpu) / wall, 2) if wall else None,
        # The rest of the machine's load: the fake upstream and these clients.
        "upstream_cpu_s": round(upstream_cpu, 2),
        "clients_cpu_s": round(own_cpu, 2),
    }


def database_report(data: Path, database_url: str | None) -> dict[str, int]:
    statuses = (
        "SELECT status, COUNT(*) FROM chatapp_message WHERE role = 'assistant' GROUP BY status"
    )
    users = "SELECT COUNT(*) FROM chatapp_message WHERE role = 'user'"
    if database_url:
        import psycopg

        with psycopg.connect(database_url) as db:
            rows = db.execute(statuses).fetchall()
            user_turns = db.execute(users).fetchone()
    else:
        with contextlib.closing(
            sqlite3.connect(f"file:{data / 'switchboard.sqlite3'}?mode=ro", uri=True)
        ) as db:
            rows = db.execute(statuses).fetchall()
            user_turns = db.execute(users).fetchone()
    report = {f"assistant_{status}": count for status, count in rows}
    report["user_turns"] = user_turns[0] if user_turns else 0
    return report


def log_report(log: Path) -> dict[str, Any]:
    text = log.read_text(errors="replace") if log.exists() else ""
    lines = text.splitlines()
    interesting = [
        line
        for line in lines
        if any(
            marker in line
            for marker in ("ERROR", "Traceback", "OperationalError", "locked", "Exception")
        )
    ]
    return {
        "database_locked": sum("database is locked" in line for line in lines),
        "table_locked": sum("database table is locked" in line for line in lines),
        "tracebacks": sum("Traceback" in line for line in lines),
        "error_lines": len(interesting),
        "first_errors": interesting[:8],
    }


def profile_report(path: Path, top: int = 25) -> str:
    """The functions with the most samples in py-spy's collapsed stacks: own and inclusive."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")[1:]  # the first frame names the thread
        total += count
        if frames:
            own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return f"  profile: no samples in {path}"

    def rows(counter: Counter[str]) -> list[str]:
        return [
            f"    {count / total:6.1%}  {name[:150]}" for name, count in counter.most_common(top)
        ]

    return "\n".join(
        [
            f"  profile ({total} samples, py-spy): own time",
            *rows(own),
            "  inclusive",
            *rows(inclusive),
        ]
    )


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def fresh_postgres(url: str) -> None:
    """Drop and create the database ``url`` names (a scratch database for this run)."""
    import psycopg
    from psycopg import sql

    name = url.rsplit("/", 1)[1].split("?", 1)[0]
    server = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(server, autocommit=True) as db:
        db.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def flush_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", "-n", type=int, default=200, help="concurrent clients (200)")
    parser.add_argument("--workers", type=int, default=1, help="Daphne worker processes (1)")
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="REDIS_URL for the workers (channel layer, hot store, limiter); its database is "
        "flushed before and after the run, e.g. redis://127.0.0.1:6379/14",
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="DATABASE_URL (PostgreSQL) instead of SQLite; the database is dropped and "
        "created again, e.g. postgres://postgres@127.0.0.1:5432/sb_chat_load",
    )
    parser.add_argument("--chunks", type=int, default=CHUNKS, help="chunks per reply (40)")
    parser.add_argument("--chunk-delay-ms", type=float, default=25.0, help="ms between chunks (25)")
    parser.add_argument("--kit", default=str(DEFAULT_KIT), help="the shared bench kit")
    parser.add_argument("--upstream-port", type=int, default=18300)
    parser.add_argument("--port", type=int, default=18301, help="the first Daphne's port")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per client")
    parser.add_argument("--keep", action="store_true", help="keep the scratch data directory")
    parser.add_argument(
        "--timeline",
        metavar="FILE",
        help="write each client's seconds from its send to messages, first delta and done "
        "(CSV, one line per client) to FILE",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="sample the first worker with py-spy (pip install py-spy) from the burst of "
        "sends to the last reply, into FILE as collapsed stacks; prints the top functions "
        "(PY_SPY_FLAGS: py-spy's sampling flags, --gil by default)",
    )
    options = parser.parse_args()
    if options.workers > 1 and not options.redis:
        parser.error("several workers share replies only through Redis: give --redis")

    ports = [options.port + number for number in range(options.workers)]
    for port in (options.upstream_port, *ports):
        if not port_free(port):
            raise SystemExit(f"127.0.0.1:{port} is already in use")
    data = Path(tempfile.mkdtemp(prefix="switchboard-chat-load-", dir="/tmp"))
    env = {
        **os.environ,
        "SWITCHBOARD_DATA_DIR": str(data),
        "SWITCHBOARD_CHAT_TITLES": "false",
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "chatapp.settings",
    }
    for name in ("DATABASE_URL", "REDIS_URL", "ALLOWED_HOSTS", "DEBUG"):
        env.pop(name, None)
    if options.redis:
        env["REDIS_URL"] = options.redis
        flush_redis(options.redis)
    if options.database_url:
        env["DATABASE_URL"] = options.database_url
        fresh_postgres(options.database_url)
    upstream: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = []
    logs = [data / f"daphne-{port}.log" for port in ports]
    samplers: list[RssSampler] = []
    spies: list[subprocess.Popen[bytes]] = []
    try:
        upstream = subprocess.Popen(
            [
                PYTHON,
                str(Path(options.kit) / "fake_upstream.py"),
                "--port",
                str(options.upstream_port),
            ],
            cwd=ROOT,
            env={
                **env,
                "FAKE_STREAM_CHUNKS": str(options.chunks),
                "FAKE_CHUNK_DELAY_MS": str(options.chunk_delay_ms),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(options.upstream_port, upstream, "the fake upstream", 15)

        manage(env, "bootstrap")
        manage(
            env,
            "provider", "add", "bench", "--type", "openai",
            "--base-url", f"http://127.0.0.1:{options.upstream_port}/v1",
        )  # fmt: skip
        manage(env, "model", "add", MODEL, "--provider", "bench", "--upstream-model", "fake")
        manage(env, "user", "add", EMAIL, "--password", PASSWORD)
        setup = json.loads(
            manage(env, "shell", "-c", f"EMAIL = {EMAIL!r}\n" + SETUP).strip().splitlines()[-1]
        )
        assert setup["rpm"] is None, setup

        for port, log in zip(ports, logs, strict=True):
            with log.open("wb") as log_file:
                workers.append(
                    subprocess.Popen(
                        [
                            PYTHON,
                            "-m",
                            "chatapp.server",
                            "-b",
                            "127.0.0.1",
                            "-p",
                            str(port),
                            ASGI_APP,
                        ],
                        cwd=ROOT,
                        env=env,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                    )
                )
        for port, worker in zip(ports, workers, strict=True):
            wait_for_port(port, worker, "Daphne", 30)
            # One page load warms Django up (URL resolver, templates) as a real first visit would.
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/chat/",
                headers={"Cookie": f"{setup['cookie']}={setup['session']}"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
                assert response.status == 200, response.status
        time.sleep(0.5)
        samplers = [RssSampler(worker.pid) for worker in workers]
        rss_idle = [sampler.read() for sampler in samplers]
        for sampler in samplers:
            sampler.start()

        clients = [Client(index) for index in range(options.clients)]
        targets = [
            (
                f"ws://127.0.0.1:{port}/ws/chat/",
                {
                    "Cookie": f"{setup['cookie']}={setup['session']}",
                    "Origin": f"http://127.0.0.1:{port}",
                },
            )
            for port in ports
        ]
        spy_command = (
            [
                shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy"),
                "record",
                "--pid",
                str(workers[0].pid),
                "--format",
                "raw",
                "--rate",
                os.environ.get("PY_SPY_RATE", "200"),
                "--nonblocking",
                *os.environ.get("PY_SPY_FLAGS", "--gil").split(),
                "--output",
                options.profile,
            ]
            if options.profile
            else None
        )
        timing = asyncio.run(
            load(
                clients,
                targets,
                options.timeout,
                samplers,
                expected_text(options.chunks),
                RssSampler(upstream.pid),
                spy_command,
                spies,
            )
        )
        for spy in spies:
            spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
            spy.wait(timeout=30)
        time.sleep(0.3)
        for sampler in samplers:
            sampler.stopping.set()
            sampler.join()
        rss_peak = [sampler.peak(since=timing["started"]) for sampler in samplers]
        rss_end = [sampler.read() for sampler in samplers]
        database = database_report(data, options.database_url)
        logged = [log_report(log) for log in logs]
    finally:
        for sampler in samplers:
            sampler.stopping.set()
        for spy in spies:
            stop(spy)
        for worker in workers:
            stop(worker)
        stop(upstream)
        if options.redis:
            flush_redis(options.redis)

    errors = Counter(error for client in clients for error in client.errors)
    per_socket_kb = (sum(timing["rss_connected_kb"]) - sum(rss_idle)) / max(options.clients, 1)
    mode = ("PostgreSQL" if options.database_url else "SQLite") + (
        ", Redis" if options.redis else ", in-memory channel layer"
    )
    result = {
        "clients": options.clients,
        "workers": options.workers,
        "mode": mode,
        "chunks": options.chunks,
        "chunk_delay_ms": options.chunk_delay_ms,
        "connect_all_s": timing["connect_s"],
        "wall_s": timing["wall_s"],
        "daphne_cpu_s": timing["daphne_cpu_s"],
        "daphne_cpu_per_worker_s": timing["daphne_cpu_per_worker_s"],
        "daphne_system_cpu_s": timing["daphne_system_cpu_s"],
        "daphne_cpu_share": timing["daphne_cpu_share"],
        "upstream_cpu_s": timing["upstream_cpu_s"],
        "clients_cpu_s": timing["clients_cpu_s"],
        "completed": sum(
            1 for client in clients if client.status == "complete" and not client.errors
        ),
        "failed_clients": sum(1 for client in clients if client.errors),
        "errors": dict(errors.most_common()),
        "ack_ms": summary_ms([c.ack for c in clients if c.ack is not None]),
        "first_delta_ms": summary_ms([c.first_delta for c in clients if c.first_delta is not None]),
        "done_ms": summary_ms([c.done for c in clients if c.done is not None]),
        # Delta frames a reply arrived in (its chunks are gathered into fewer under load).
        "deltas_per_reply": {
            "p50": percentile([c.deltas for c in clients if c.done is not None], 0.5),
            "max": max((c.deltas for c in clients if c.done is not None), default=None),
        },
        "rss_kb": {
            "idle": rss_idle,
            "connected": timing["rss_connected_kb"],
            "peak": rss_peak,
            "end": rss_end,
        },
        "rss_per_idle_socket_kb": round(per_socket_kb, 1),
        "database": database,
        "daphne_log": {
            "database_locked": sum(item["database_locked"] for item in logged),
            "table_locked": sum(item["table_locked"] for item in logged),
            "tracebacks": sum(item["tracebacks"] for item in logged),
            "error_lines": sum(item["error_lines"] for item in logged),
            "first_errors": [line for item in logged for line in item["first_errors"]][:8],
        },
    }
    print(json.dumps(result, ensure_ascii=False))
    if options.timeline:
        with open(options.timeline, "w") as timeline:
            timeline.write("client,messages_s,first_delta_s,done_s,deltas\n")
            for client in clients:
                timeline.write(
                    f"{client.index},{client.ack or ''},{client.first_delta or ''},"
                    f"{client.done or ''},{client.deltas}\n"
                )

    def line(name: str, stats: dict[str, float | None]) -> str:
        return (
            f"  {name:<22} min {stats['min']} ms   p50 {stats['p50']} ms   p90 {stats['p90']} ms   "
            f"p99 {stats['p99']} ms   max {stats['max']} ms   (n={stats['n']})"
        )

    def megabytes(values: list[int]) -> str:
        return " + ".join(f"{kb / 1024:.1f}" for kb in values) + " MB"

    logged_total = result["daphne_log"]
    print(
        "\n".join(
            [
                "",
                f"{options.clients} WebSocket clients, {options.workers} Daphne worker"
                f"{'s' if options.workers > 1 else ''} ({mode}), fake upstream "
                f"{options.chunks} chunks x {options.chunk_delay_ms:g} ms",
                f"  all sockets open in {timing['connect_s']} s; every reply finished "
                f"{timing['wall_s']} s after the simultaneous send; Daphne used "
                f"{timing['daphne_cpu_s']} CPU s in that time ({timing['daphne_cpu_per_worker_s']} "
                f"per worker, {timing['daphne_system_cpu_s']} s in the kernel; the busiest worker "
                f"{timing['daphne_cpu_share']:.0%} of one core); meanwhile the fake upstream "
                f"used {timing['upstream_cpu_s']} CPU s and these clients {timing['clients_cpu_s']}",
                f"  completed {result['completed']}/{options.clients}; "
                f"clients with errors {result['failed_clients']}",
                *(f"    {count} x {error}" for error, count in errors.most_common(10)),
                line("send -> messages", result["ack_ms"]),
                line("send -> first delta", result["first_delta_ms"]),
                line("send -> done", result["done_ms"]),
                f"  delta frames per reply: p50 {result['deltas_per_reply']['p50']}, "
                f"max {result['deltas_per_reply']['max']} ({options.chunks} chunks each)",
                f"  Daphne RSS: idle {megabytes(rss_idle)}, {options.clients} sockets open "
                f"{megabytes(timing['rss_connected_kb'])} ({per_socket_kb:.1f} kB per idle "
                f"socket), peak {megabytes(rss_peak)}, after {megabytes(rss_end)}",
                f"  database: {database}",
                f"  Daphne log: {logged_total['database_locked']} 'database is locked', "
                f"{logged_total['table_locked']} 'database table is locked', "
                f"{logged_total['tracebacks']} tracebacks, {logged_total['error_lines']} error lines",
                *(f"    {text[:200]}" for text in logged_total["first_errors"]),
                f"  data directory: {data}" + ("" if options.keep else " (removed)"),
            ]
        )
    )
    if options.profile:
        print(profile_report(Path(options.profile)))
    if not options.keep:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
