"""Gateway overhead benchmark: Switchboard (uvicorn and Daphne) against its upstream, direct.

    .venv/bin/python .ci/bench.py [--kit ../shared/bench] [--rounds 3] [--limits] [--redis URL]

Starts the shared kit's fake OpenAI upstream, a scratch Switchboard (its own data
directory, a provider, a model and a key; with --limits the key gets rate limits
and budgets that never trip, so admission and settlement run their full path),
then one uvicorn and one Daphne worker (with --redis, sharing Redis: hot store,
limiter scripts, cache).  Runs the kit's load generator against
the upstream directly and through each server, alternating, for non-streaming
and streaming requests at concurrency 1 and 32, and prints the medians.
Everything talks to 127.0.0.1 only and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def wait_for(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - loopback only
            return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error status: the server is up
                return
            time.sleep(0.2)
    raise SystemExit(f"{url} did not come up in {timeout:g}s")


def manage(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [PYTHON, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--kit", default=str(ROOT.parent / "shared" / "bench"), help="the shared bench kit"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--limits", action="store_true", help="set rate limits and budgets on the key"
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="run the gateway with REDIS_URL (e.g. redis://127.0.0.1:6379/14; it is flushed)",
    )
    options = parser.parse_args()
    kit = Path(options.kit)
    data = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    env = {**os.environ, "SWITCHBOARD_DATA_DIR": str(data), "LOG_LEVEL": "WARNING"}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    if options.redis:
        import redis

        redis.Redis.from_url(options.redis).flushdb()
        env["REDIS_URL"] = options.redis
    processes: list[subprocess.Popen[bytes]] = []

    def start(*command: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        processes.append(process)
        return process

    try:
        start(PYTHON, str(kit / "fake_upstream.py"), "--port", "18000")
        manage(env, "bootstrap")
        manage(
            env,
            "provider",
            "add",
            "bench",
            "--type",
            "openai",
            "--base-url",
            "http://127.0.0.1:18000/v1",
        )
        manage(
            env, "model", "add", "bench-model", "--provider", "bench", "--upstream-model", "fake"
        )
        manage(env, "user", "add", "bench@example.com")
        key = json.loads(manage(env, "key", "create", "--user", "bench@example.com", "--json"))
        if options.limits:
            manage(env, "price", "set", "bench-model", "--input", "0.15", "--output", "0.60")
            manage(
                env, "key", "limits", key["prefix"], "--rpm", "1000000", "--tpm", "1000000000",
                "--rpd", "100000000", "--tpd", "10000000000", "--concurrency", "10000",
                "--token-budget", "100000000000", "--money-budget", "1000000", "--period", "monthly",
            )  # fmt: skip
        servers = {
            "uvicorn": start(
                PYTHON,
                "-m",
                "uvicorn",
                "chatapp.asgi:application",
                "--port",
                "18001",
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
            ),  # fmt: skip
            "daphne": start(
                PYTHON, "-m", "chatapp.server", "-p", "18002", "chatapp.asgi:application"
            ),
        }
        ports = {"uvicorn": 18001, "daphne": 18002}
        wait_for("http://127.0.0.1:18000/health")
        for port in ports.values():
            wait_for(f"http://127.0.0.1:{port}/healthz")

        results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
        for _round in range(options.rounds):
            for mode in ("nonstream", "stream"):
                for concurrency in (1, 32):
                    count = options.requests if mode == "nonstream" else options.requests // 2
                    targets = [("direct", "http://127.0.0.1:18000/v1", None)] + [
                        (name, f"http://127.0.0.1:{ports[name]}/v1", servers[name].pid)
                        for name in ports
                    ]
                    for label, base_url, pid in targets:
                        command = [
                            PYTHON, str(kit / "loadgen.py"), "--base-url", base_url, "--key", key["key"],
                            "--model", "bench-model", "-n", str(count), "-c", str(concurrency),
                            "--label", label,
                        ]  # fmt: skip
                        if mode == "stream":
                            command.append("--stream")
                        if pid:
                            command += ["--cpu-pid", f"gw={pid}"]
                        line = subprocess.run(
                            command, check=True, capture_output=True, text=True
                        ).stdout.strip()
                        print(line, flush=True)
                        results.setdefault((label, mode, concurrency), []).append(json.loads(line))
        summarize(results, options.requests)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def summarize(results: dict[tuple[str, str, int], list[dict[str, float]]], requests: int) -> None:
    def median(label: str, mode: str, concurrency: int, field: str) -> float:
        values = [
            run[field]
            for run in results.get((label, mode, concurrency), [])
            if run.get(field) is not None
        ]
        return statistics.median(values) if values else float("nan")

    print("\nmedians over rounds (ms; added = gateway - direct at the same percentile)")
    print(
        f"{'server':8} {'mode':9} {'c':>3} {'rps':>8} {'p50':>7} {'p99':>7} {'added p50':>10} {'1st chunk':>10} {'added 1st':>10} {'cpu ms/req':>10}"
    )
    for mode in ("nonstream", "stream"):
        for concurrency in (1, 32):
            for label in ("direct", "uvicorn", "daphne"):
                rps = median(label, mode, concurrency, "rps")
                p50 = median(label, mode, concurrency, "lat_p50")
                p99 = median(label, mode, concurrency, "lat_p99")
                added = p50 - median("direct", mode, concurrency, "lat_p50")
                first = median(label, mode, concurrency, "first_chunk_p50")
                added_first = first - median("direct", mode, concurrency, "first_chunk_p50")
                cpu_runs = [
                    run["cpu_s"].get("gw") for run in results.get((label, mode, concurrency), [])
                ]
                cpu_runs = [value for value in cpu_runs if value is not None]
                count = requests if mode == "nonstream" else requests // 2
                cpu = statistics.median(cpu_runs) * 1000 / count if cpu_runs else float("nan")
                print(
                    f"{label:8} {mode:9} {concurrency:>3} {rps:>8.0f} {p50:>7.2f} {p99:>7.2f} "
                    f"{'' if label == 'direct' else f'{added:.2f}':>10} {first:>10.2f} "
                    f"{'' if label == 'direct' or mode == 'nonstream' else f'{added_first:.2f}':>10} "
                    f"{'' if label == 'direct' else f'{cpu:.2f}':>10}"
                )


if __name__ == "__main__":
    main()
