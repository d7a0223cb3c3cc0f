"""Browser-chat load: N WebSocket clients send a message at the same moment to ONE Daphne worker.

Run by hand (not part of the test suite), from the project root::

    .venv/bin/python .ci/chat_load.py                 # N=200
    .venv/bin/python .ci/chat_load.py --clients 50    # a sanity check

What it does, everything on 127.0.0.1:

1. starts the shared kit's fake OpenAI upstream (``../shared/bench/fake_upstream.py
   --port 18300``) streaming 40 chunks 25 ms apart (``FAKE_STREAM_CHUNKS=40
   FAKE_CHUNK_DELAY_MS=25``): about one second per reply;
2. makes a scratch Switchboard in the embedded mode (SQLite, in-memory channel layer; its own
   ``SWITCHBOARD_DATA_DIR`` under /tmp): ``manage.py bootstrap``, ``provider add bench``,
   ``model add bench-model``, ``user add``; then, in ``manage.py shell``, the user's web key
   (``keys.actions.do_get_web_key``) with its limits cleared and a session for the user
   (Django's SessionStore, as a sign-in would make);
3. starts one Daphne worker (``python -m daphne -p 18301 chatapp.asgi:application``, with
   ``SWITCHBOARD_CHAT_TITLES=false``);
4. opens N WebSockets to ``/ws/chat/`` (the ``sessionid`` cookie, and an ``Origin`` header
   for AllowedHostsOriginValidator), waits until all are open, then has every client send
   ``{"action": "send", "conversation": null, "text": "hello", "attachments": []}`` at the
   same moment and read until its ``done``;
5. reports, per client, the time from the send to the server's ``messages`` (the turn is
   saved), to the first ``delta`` and to ``done``; errors (``error`` events, a ``done``
   whose status is not ``complete``, a streamed text other than the 40 chunks, timeouts,
   dropped sockets); the Daphne process's RSS (``VmRSS`` in /proc, sampled every 100 ms)
   idle, with the N sockets open, and at its peak; the CPU seconds Daphne used from the send
   to the last ``done`` (one worker is one core at most); the replies' statuses in the database;
   and the errors Daphne logged (SQLite's "database is locked" above all);
6. prints one JSON line, then a human summary, and stops both processes (and removes the
   data directory unless ``--keep``).

Needs the ``websockets`` and ``daphne`` packages (both dependencies of the project) and
``httptools`` for the fake upstream.
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
    url: str,
    headers: dict[str, str],
    limit: float,
    rss: RssSampler,
    expected: str,
) -> dict[str, Any]:
    opened: asyncio.Queue[int] = asyncio.Queue()
    go = asyncio.Event()
    tasks = [
        asyncio.create_task(run_client(client, url, headers, opened, go, limit, expected))
        for client in clients
    ]
    connect_started = time.perf_counter()
    for _ in clients:
        await opened.get()
    connected_in = time.perf_counter() - connect_started
    await asyncio.sleep(0.5)  # let the worker settle after the handshakes
    rss_connected = rss.read()
    user_before, system_before = rss.cpu_split()
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    user_after, system_after = rss.cpu_split()
    cpu = user_after - user_before + system_after - system_before
    return {
        "connect_s": round(connected_in, 2),
        "rss_connected_kb": rss_connected,
        "started": started,
        "wall_s": round(wall, 2),
        "daphne_cpu_s": round(cpu, 2),
        "daphne_system_cpu_s": round(system_after - system_before, 2),
        "daphne_cpu_share": round(cpu / wall, 2) if wall else None,
    }


def database_report(data: Path) -> dict[str, int]:
    with contextlib.closing(
        sqlite3.connect(f"file:{data / 'switchboard.sqlite3'}?mode=ro", uri=True)
    ) as db:
        rows = db.execute(
            "SELECT status, COUNT(*) FROM chatapp_message WHERE role = 'assistant' GROUP BY status"
        ).fetchall()
        users = db.execute("SELECT COUNT(*) FROM chatapp_message WHERE role = 'user'").fetchone()
    report = {f"assistant_{status}": count for status, count in rows}
    report["user_turns"] = users[0]
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", "-n", type=int, default=200, help="concurrent clients (200)")
    parser.add_argument("--chunks", type=int, default=CHUNKS, help="chunks per reply (40)")
    parser.add_argument("--chunk-delay-ms", type=float, default=25.0, help="ms between chunks (25)")
    parser.add_argument("--kit", default=str(DEFAULT_KIT), help="the shared bench kit")
    parser.add_argument("--upstream-port", type=int, default=18300)
    parser.add_argument("--port", type=int, default=18301, help="Daphne's port")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per client")
    parser.add_argument("--keep", action="store_true", help="keep the scratch data directory")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="sample Daphne with py-spy (pip install py-spy) from the send to the last done, "
        "into FILE as collapsed stacks; prints the top functions",
    )
    options = parser.parse_args()

    for port in (options.upstream_port, options.port):
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
    upstream: subprocess.Popen[bytes] | None = None
    daphne: subprocess.Popen[bytes] | None = None
    log = data / "daphne.log"
    rss: RssSampler | None = None
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

        with log.open("wb") as log_file:
            daphne = subprocess.Popen(
                [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(options.port), ASGI_APP],
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(options.port, daphne, "Daphne", 30)
        # One page load warms Django up (URL resolver, templates) as a real first visit would.
        request = urllib.request.Request(
            f"http://127.0.0.1:{options.port}/chat/",
            headers={"Cookie": f"{setup['cookie']}={setup['session']}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            assert response.status == 200, response.status
        time.sleep(0.5)
        rss = RssSampler(daphne.pid)
        rss_idle = rss.read()
        rss.start()

        clients = [Client(index) for index in range(options.clients)]
        headers = {
            "Cookie": f"{setup['cookie']}={setup['session']}",
            "Origin": f"http://127.0.0.1:{options.port}",
        }
        url = f"ws://127.0.0.1:{options.port}/ws/chat/"
        spy = (
            subprocess.Popen(
                [
                    shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(daphne.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--nonblocking",
                    *os.environ.get("PY_SPY_FLAGS", "--gil").split(),
                    "--output",
                    options.profile,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if options.profile
            else None
        )
        if spy is not None:
            time.sleep(1.0)  # py-spy attaches
        timing = asyncio.run(
            load(clients, url, headers, options.timeout, rss, expected_text(options.chunks))
        )
        if spy is not None:
            spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
            spy.wait(timeout=30)
        time.sleep(0.3)
        rss.stopping.set()
        rss.join()
        rss_peak = rss.peak(since=timing["started"])
        rss_end = rss.read()
        database = database_report(data)
        logged = log_report(log)
    finally:
        if rss is not None:
            rss.stopping.set()
        stop(daphne)
        stop(upstream)

    errors = Counter(error for client in clients for error in client.errors)
    result = {
        "clients": options.clients,
        "chunks": options.chunks,
        "chunk_delay_ms": options.chunk_delay_ms,
        "connect_all_s": timing["connect_s"],
        "wall_s": timing["wall_s"],
        "daphne_cpu_s": timing["daphne_cpu_s"],
        "daphne_system_cpu_s": timing["daphne_system_cpu_s"],
        "daphne_cpu_share": timing["daphne_cpu_share"],
        "completed": sum(
            1 for client in clients if client.status == "complete" and not client.errors
        ),
        "failed_clients": sum(1 for client in clients if client.errors),
        "errors": dict(errors.most_common()),
        "ack_ms": summary_ms([c.ack for c in clients if c.ack is not None]),
        "first_delta_ms": summary_ms([c.first_delta for c in clients if c.first_delta is not None]),
        "done_ms": summary_ms([c.done for c in clients if c.done is not None]),
        "rss_kb": {
            "idle": rss_idle,
            "connected": timing["rss_connected_kb"],
            "peak": rss_peak,
            "end": rss_end,
        },
        "database": database,
        "daphne_log": logged,
    }
    print(json.dumps(result, ensure_ascii=False))

    def line(name: str, stats: dict[str, float | None]) -> str:
        return (
            f"  {name:<22} min {stats['min']} ms   p50 {stats['p50']} ms   p90 {stats['p90']} ms   "
            f"p99 {stats['p99']} ms   max {stats['max']} ms   (n={stats['n']})"
        )

    mb = {name: round(kb / 1024, 1) for name, kb in result["rss_kb"].items()}
    print(
        "\n".join(
            [
                "",
                f"{options.clients} WebSocket clients, one Daphne worker, embedded mode (SQLite), "
                f"fake upstream {options.chunks} chunks x {options.chunk_delay_ms:g} ms",
                f"  all sockets open in {timing['connect_s']} s; every reply finished "
                f"{timing['wall_s']} s after the simultaneous send; Daphne used "
                f"{timing['daphne_cpu_s']} CPU s in that time ({timing['daphne_cpu_share']:.0%} "
                f"of one core; {timing['daphne_system_cpu_s']} s in the kernel)",
                f"  completed {result['completed']}/{options.clients}; "
                f"clients with errors {result['failed_clients']}",
                *(f"    {count} x {error}" for error, count in errors.most_common(10)),
                line("send -> messages", result["ack_ms"]),
                line("send -> first delta", result["first_delta_ms"]),
                line("send -> done", result["done_ms"]),
                f"  Daphne RSS: idle {mb['idle']} MB, {options.clients} sockets open "
                f"{mb['connected']} MB, peak {mb['peak']} MB, after {mb['end']} MB",
                f"  database: {database}",
                f"  Daphne log: {logged['database_locked']} 'database is locked', "
                f"{logged['table_locked']} 'database table is locked', "
                f"{logged['tracebacks']} tracebacks, {logged['error_lines']} error lines",
                *(f"    {text[:200]}" for text in logged["first_errors"]),
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
