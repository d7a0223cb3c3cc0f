"""Chaos: real server processes under load, one killed with SIGKILL mid-flight.

Every request a client got a whole answer to has exactly one usage record, whatever
happened to the worker afterwards: the record was journaled before the answer's last
bytes, and the journal of the dead worker is replayed by the next one to start.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.db import connection

from chatapp.models import Provider
from keys.models import UsageRecord
from tests.fake_upstream import Reply
from tests.gateway import Gateway
from tests.live import free_port, start_uvicorn
from tests.services import USING_POSTGRES, USING_REDIS

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 240
CONCURRENCY = 24

pytestmark = pytest.mark.skipif(
    not (USING_POSTGRES and USING_REDIS),
    reason="several server processes share state only through PostgreSQL and Redis",
)


def server_env() -> dict[str, str]:
    database = connection.settings_dict
    return {
        **os.environ,
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "REDIS_URL": str(settings.REDIS_URL),
        "SECRET_KEY": settings.SECRET_KEY,
        "SWITCHBOARD_ENCRYPTION_KEY": settings.SWITCHBOARD_ENCRYPTION_KEY,
        "SWITCHBOARD_DATA_DIR": str(settings.DATA_DIR),
        "LOG_LEVEL": "WARNING",
    }


def start_server(port: int) -> subprocess.Popen[bytes]:
    return start_uvicorn(port, server_env(), ROOT)


async def load(urls: list[str], key: str, victim: subprocess.Popen[bytes]) -> tuple[list[str], int]:
    """Fire the requests; kill the victim a third of the way through.

    Returns the request ids of every answer received whole, and how many broke off.
    """
    answered: list[str] = []
    broken = 0
    sent = 0
    rng = random.Random(7)
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(client: httpx.AsyncClient, number: int) -> None:
        nonlocal broken, sent
        stream = number % 2 == 0
        body = {
            "model": "gpt-fake",
            "messages": [{"role": "user", "content": f"request {number}"}],
            "stream": stream,
        }
        url = urls[number % len(urls)] + "/v1/chat/completions"
        async with semaphore:
            sent += 1
            if sent == REQUESTS // 3:
                victim.send_signal(signal.SIGKILL)
            try:
                async with client.stream(
                    "POST", url, headers={"authorization": f"Bearer {key}"}, json=body
                ) as response:
                    data = await response.aread()
                    whole = (
                        data.rstrip().endswith(b"data: [DONE]")
                        if stream and response.status_code == 200
                        else data.rstrip().endswith(b"}")
                    )
                    if whole:
                        answered.append(response.headers["x-request-id"])
                    else:
                        broken += 1
            except httpx.HTTPError:
                broken += 1
        await asyncio.sleep(rng.random() * 0.01)

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await asyncio.gather(*(one(client, number) for number in range(REQUESTS)))
    return answered, broken


def test_a_worker_killed_under_load_loses_no_answered_request(gateway: Gateway) -> None:
    # Given two workers streaming replies slowly enough that many are in flight...
    Provider.objects.filter(pk=gateway.openai_provider.pk).update(timeout=30)
    Provider.objects.get(pk=gateway.openai_provider.pk).save()
    gateway.fake.script(*[Reply(text="one two three four five six", chunk_delay=0.02)] * REQUESTS)
    ports = [free_port(), free_port()]
    servers = [start_server(port) for port in ports]
    replacement: subprocess.Popen[bytes] | None = None
    try:
        # ...when one is killed with SIGKILL a third of the way through the load...
        answered, broken = asyncio.run(
            load([f"http://127.0.0.1:{port}" for port in ports], gateway.key, servers[0])
        )
        assert servers[0].wait(10) == -signal.SIGKILL
        assert broken > 0, "the kill interrupted nothing: the test proves nothing"
        assert len(answered) > REQUESTS // 2

        # ...and a worker starts again on that machine (it replays the dead one's journal),
        replacement = start_server(free_port())
        wanted = set(answered)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            recorded = set(
                UsageRecord.objects.filter(request_id__in=wanted).values_list(
                    "request_id", flat=True
                )
            )
            if recorded == wanted:
                break
            time.sleep(0.25)

        # then every answered request has exactly one record.
        missing = wanted - recorded
        assert not missing, f"{len(missing)} of {len(wanted)} answered requests have no record"
        counts = Counter(
            UsageRecord.objects.filter(request_id__in=wanted).values_list("request_id", flat=True)
        )
        assert set(counts.values()) == {1}
        # The figures of issue 10's form (shown with pytest -s).
        print(  # noqa: T201 -- the issue's figures, shown with pytest -s
            f"chaos: {REQUESTS} requests, {broken} broken by the kill, {len(wanted)} answered, "
            f"{len(wanted) - len(missing)} recorded once, {len(missing)} lost"
        )
    finally:
        for server in [*servers, *([replacement] if replacement else [])]:
            if server.poll() is None:
                server.terminate()
                server.wait(10)
