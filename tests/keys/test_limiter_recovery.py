"""The limiter when Redis loses its counters, and when a worker is killed (Redis only).

"Another worker" is a real process: it admits through ``limiter.aadmit`` and then
holds its requests open, with its lease thread running, until it is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.db import connection

from accounts.models import User
from chatapp import hotstore
from chatapp.models import CatalogModel, Provider
from keys import leases, limiter
from keys.actions import do_set_limits, do_set_price
from keys.exceptions import LimitExceeded
from keys.models import ApiKey, UsageRecord
from tests.conftest import early_in_a_minute
from tests.fake_upstream import Reply
from tests.gateway import Gateway
from tests.live import free_port
from tests.services import USING_POSTGRES, USING_REDIS

pytestmark = pytest.mark.skipif(
    not (USING_POSTGRES and USING_REDIS),
    reason="workers share reservations only through Redis, and their ledger through PostgreSQL",
)

ROOT = Path(__file__).resolve().parents[2]

# Admits what it is told, prints how many, then keeps the requests open.  A slow one
# takes ``slow`` seconds to publish its reservations again (a busy worker).
WORKER = r"""
import asyncio, json, sys, time

import django

django.setup()

from keys import leases, limiter


def slowly(publish, seconds):
    def slow(*args):
        time.sleep(seconds)
        publish(*args)

    return slow


async def main(plan, slow):
    if slow:
        leases._republish = slowly(leases._republish, slow)
    for number, item in enumerate(plan):
        await limiter.aadmit(
            key_id=item["key_id"],
            request_id=f"req_worker_{number}",
            limits=limiter.Limits(**item["limits"]),
            tokens=item["tokens"],
            money_nano=0,
        )
    print("admitted", len(plan), flush=True)
    await asyncio.sleep(3600)


asyncio.run(main(json.loads(sys.argv[1]), float(sys.argv[2])))
"""

CONCURRENCY_KEY, RPM_KEY, BUDGET_KEY = 7_100_001, 7_100_002, 7_100_003
CONCURRENCY = {"concurrency": 3}
RPM = {"rpm": 5}
BUDGET = {"token_budget": 1000, "period": "lifetime"}


class Worker:
    def __init__(
        self, plan: list[dict[str, Any]], *, lease_seconds: int = 10, slow: float = 0
    ) -> None:
        database = connection.settings_dict
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatapp.settings",
            "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
            "REDIS_URL": settings.REDIS_URL,
            "SECRET_KEY": settings.SECRET_KEY,
            "SWITCHBOARD_ENCRYPTION_KEY": settings.SWITCHBOARD_ENCRYPTION_KEY,
            "SWITCHBOARD_DATA_DIR": str(settings.DATA_DIR),
            "SWITCHBOARD_LEASE_SECONDS": str(lease_seconds),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(plan), str(slow)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 30)
        assert ready, "the worker did not admit its requests in 30 s"
        assert self.process.stdout.readline().strip() == f"admitted {len(plan)}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.process.poll() is None:
            worker.kill()


def admit(key_id: int, limits: dict[str, Any], tokens: int = 10, **extra: Any) -> limiter.Ticket:
    async def run() -> limiter.Ticket:
        try:
            return await limiter.aadmit(
                key_id=key_id,
                request_id=f"req_{time.monotonic_ns()}",
                limits=limiter.Limits(**limits, **extra),
                tokens=tokens,
                money_nano=0,
            )
        finally:
            await hotstore.aclose()

    return asyncio.run(run())


def refusal(key_id: int, limits: dict[str, Any], tokens: int = 10) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as caught:
        admit(key_id, limits, tokens)
    return caught.value


def test_a_flush_loses_none_of_the_requests_another_worker_has_in_flight(
    transactional_db, workers: list[Worker]
) -> None:
    # Given another worker, slow to answer, with 3 requests in flight on a key allowing 3
    # at once, 5 this minute on a key allowing 5 per minute, and 4 × 200 tokens of a
    # 1000-token budget...
    early_in_a_minute()
    workers.append(
        Worker(
            [{"key_id": CONCURRENCY_KEY, "limits": CONCURRENCY, "tokens": 10}] * 3
            + [{"key_id": RPM_KEY, "limits": RPM, "tokens": 10}] * 5
            + [{"key_id": BUDGET_KEY, "limits": BUDGET, "tokens": 200}] * 4,
            slow=0.5,
        )
    )
    # ...when Redis loses everything...
    hotstore.sync_client().flushdb()

    # ...none of the limits lets more through.
    assert refusal(CONCURRENCY_KEY, CONCURRENCY).kind == "concurrency"
    assert refusal(RPM_KEY, RPM).kind == "rpm"
    budget = refusal(BUDGET_KEY, BUDGET, tokens=300)
    assert budget.kind == "token_budget"
    assert "800 reserved by requests in flight" in budget.message
    # What still fits is admitted.
    admit(BUDGET_KEY, BUDGET, tokens=200)
    assert refusal(BUDGET_KEY, BUDGET, tokens=1).kind == "token_budget"


def test_a_second_flush_is_survived_too(transactional_db, workers: list[Worker]) -> None:
    workers.append(Worker([{"key_id": CONCURRENCY_KEY, "limits": CONCURRENCY, "tokens": 10}] * 3))
    for _ in range(2):
        hotstore.sync_client().flushdb()
        assert refusal(CONCURRENCY_KEY, CONCURRENCY).kind == "concurrency"


def test_rate_windows_are_rebuilt_from_the_ledger_after_a_flush(transactional_db) -> None:
    user = User.objects.create_user("alice@example.com", "pw")
    key, _raw = ApiKey.issue(user=user, name="tests")
    early_in_a_minute()
    # Given 3 requests served this minute and 2 refused by the limiter (never admitted)...
    for number in range(5):
        UsageRecord.objects.create(
            request_id=f"req_ledger_{number}",
            key=key,
            user=user,
            endpoint="chat.completions",
            dialect="openai",
            model="gpt-fake",
            status="ok" if number < 3 else "error",
            http_status=200 if number < 3 else 429,
            attempts=1 if number < 3 else 0,
            input_tokens=10,
            output_tokens=5,
        )
    # ...and the counters lost (the fixtures flush Redis before each test)...
    hotstore.sync_client().flushdb()
    # ...an RPM limit of 5 lets exactly 2 more through.
    admit(key.pk, RPM)
    admit(key.pk, RPM)
    refused = refusal(key.pk, RPM)
    assert (refused.kind, refused.used) == ("rpm", 5)
    # Tokens per day: the served requests' usage (3 × 15), then the reservations (3 × 10).
    ticket = admit(key.pk, {"tpd": 100_000}, tokens=10)
    assert ticket.counts["td"] == 45 + 30


def test_reservations_of_a_killed_worker_are_released_after_its_lease(
    transactional_db, settings, workers: list[Worker]
) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_LEASE_SECONDS = 1
    settings.SWITCHBOARD_RESERVATION_TTL = 600
    limits = {"concurrency": 1}
    # Given a worker holding the key's only slot...
    worker = Worker([{"key_id": CONCURRENCY_KEY, "limits": limits, "tokens": 10}], lease_seconds=1)
    workers.append(worker)
    refused = refusal(CONCURRENCY_KEY, limits)
    assert "Try again when one of the key's requests in flight has ended." in refused.message
    # ...killed with SIGKILL (it settles nothing)...
    worker.kill()
    killed = time.monotonic()
    # ...its slot is free again within about 1.5 lease periods, long before the TTL...
    messages = []
    while True:
        try:
            admit(CONCURRENCY_KEY, limits)
            break
        except LimitExceeded as exc:
            messages.append(exc.message)
            assert time.monotonic() - killed < 10, "the dead worker's reservation was not released"
            time.sleep(0.05)
    assert time.monotonic() - killed < 5
    # ...and once its lease is gone, refusals say when the slot comes back.
    assert (
        "Requests held by a worker that stopped responding (1) are released within 1s."
        in messages[-1]
    )


def test_a_live_worker_keeps_its_reservations_when_its_lease_is_lost(
    transactional_db, settings, workers: list[Worker]
) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_LEASE_SECONDS = 1
    limits = {"concurrency": 1}
    workers.append(
        Worker([{"key_id": CONCURRENCY_KEY, "limits": limits, "tokens": 10}], lease_seconds=1)
    )
    # Given its lease gone while it lives (Redis restarted from a snapshot after an
    # outage longer than the lease), it renews it before anyone releases its requests.
    client = hotstore.sync_client()
    ours = f"{leases.PREFIX}lease:{leases.owner()}".encode()
    [lease] = [name for name in client.scan_iter(f"{leases.PREFIX}lease:*") if name != ours]
    client.delete(lease)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert refusal(CONCURRENCY_KEY, limits).kind == "concurrency"
        time.sleep(0.01)


def test_after_a_redis_restart_admissions_wait_for_workers_to_reconnect(
    transactional_db, settings, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_LEASE_SECONDS = 1
    # Redis came back empty and has been up for less than a lease period (uptime 0 s).
    monkeypatch.setattr(leases, "_hold_ms", lambda _client: leases.lease_ms())
    admit(CONCURRENCY_KEY, CONCURRENCY)
    hotstore.sync_client().flushdb()
    started = time.monotonic()
    admit(CONCURRENCY_KEY, CONCURRENCY)
    assert 0.9 <= time.monotonic() - started < 5


def test_the_hold_after_a_restart_lasts_until_redis_has_been_up_a_lease_period(
    settings,
) -> None:  # type: ignore[no-untyped-def]
    class Restarted:
        def __init__(self, uptime: int) -> None:
            self.uptime = uptime

        def info(self, section: str) -> dict[str, int]:
            return {"uptime_in_seconds": self.uptime}

    settings.SWITCHBOARD_LEASE_SECONDS = 10
    assert leases._hold_ms(Restarted(3)) == 7000
    assert leases._hold_ms(Restarted(3600)) == 0


def test_a_request_settled_while_its_reservation_was_lost_is_not_reserved_again(
    transactional_db,
) -> None:
    ticket = admit(BUDGET_KEY, BUDGET, tokens=300)
    hotstore.sync_client().flushdb()
    # Given the request settles before this worker published its reservations again...
    limiter.settle(ticket, tokens=400, money_nano=0)
    # ...while a publication had already read the live tickets (the race it loses)...
    leases.track(ticket, epoch=ticket.epoch)
    leases.sync()
    # ...the reservation is not back, and the 400 tokens it used count as spent
    # although its usage record is not in the ledger yet.
    client = hotstore.sync_client()
    assert not client.hexists(f"{limiter.PREFIX}{BUDGET_KEY}:resd", ticket.request_id)
    refused = refusal(BUDGET_KEY, BUDGET, tokens=601)
    assert "400 of 1000 tokens used" in refused.message
    admit(BUDGET_KEY, BUDGET, tokens=600)


def test_a_budget_holds_when_redis_is_flushed_under_two_gateway_processes(
    gateway: Gateway,
) -> None:
    # Given two uvicorn processes sharing Redis, a key whose money budget affords 10
    # requests (0.1 each at worst), and 10 requests in flight for 4 s...
    arrange(gateway)
    gateway.fake.script(
        *[Reply(text="paid", input_tokens=5, output_tokens=60, delay=4.0)] * 10,
        *[Reply(text="paid", input_tokens=5, output_tokens=60)] * 10,
    )
    database = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": settings.SECRET_KEY,
        "SWITCHBOARD_ENCRYPTION_KEY": settings.SWITCHBOARD_ENCRYPTION_KEY,
        "SWITCHBOARD_DATA_DIR": str(settings.DATA_DIR),
    }
    ports = [free_port(), free_port()]
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "chatapp.asgi:application", "--port", str(port)]
            + ["--log-level", "warning"],
            cwd=ROOT,
            env=env,
        )
        for port in ports
    ]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        wait_until_up(urls)

        async def probe() -> tuple[list[httpx.Response], list[httpx.Response]]:
            async with httpx.AsyncClient(timeout=60) as client:
                first = [
                    asyncio.ensure_future(post(client, urls[number % 2], gateway.key))
                    for number in range(10)
                ]
                for _ in range(600):  # until all 10 are admitted and upstream
                    if len(gateway.fake.requests) == 10:
                        break
                    await asyncio.sleep(0.05)
                # ...when Redis loses everything...
                hotstore.sync_client().flushdb()
                # ...10 more are all refused, from either process.
                more = await asyncio.gather(
                    *(post(client, urls[number % 2], gateway.key) for number in range(10))
                )
                return list(await asyncio.gather(*first)), list(more)

        first, more = asyncio.run(probe())
        assert [response.status_code for response in first] == [200] * 10
        assert [response.status_code for response in more] == [429] * 10, [
            response.text[:200] for response in more
        ]
        assert len(gateway.fake.requests) == 10
        records = gateway.wait_records(20, timeout=20)
        assert sum((record.cost for record in records), Decimal(0)) == 10 * Decimal("0.06")
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(10)


def arrange(gateway: Gateway) -> None:
    """Each request may cost up to 100 output tokens × 1000 per 1M = 0.1; the budget affords 10."""
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal(0),
        output_price=Decimal(1000),
    )
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    do_set_limits(key=key, money_budget=Decimal("1.05"), budget_period="monthly")
    # A loaded machine must not turn the held replies into upstream timeouts.
    Provider.objects.filter(pk=gateway.openai_provider.pk).update(timeout=60)
    Provider.objects.get(pk=gateway.openai_provider.pk).save()


async def post(client: httpx.AsyncClient, url: str, key: str) -> httpx.Response:
    return await client.post(
        url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json={
            "model": "gpt-fake",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 100,
        },
    )


def wait_until_up(urls: list[str]) -> None:
    deadline = time.monotonic() + 30
    for url in urls:
        while True:
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server processes did not start"
                time.sleep(0.2)
