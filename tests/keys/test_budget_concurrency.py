"""200 simultaneous requests against a budget that affords 10: exactly 10 pass, spend stays within.

The fake upstream holds every reply for a second, so all 200 admissions happen
while every reservation is still outstanding: only the atomic check-and-reserve
stands between the budget and an overdraft (the two-step check-then-deduct of
one-api/new-api lets them all through).
"""

from __future__ import annotations

import asyncio
import os
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.db import connection

from chatapp.models import CatalogModel, Provider
from keys.actions import do_set_limits, do_set_price
from keys.models import ApiKey, UsageRecord
from tests.fake_upstream import Reply
from tests.gateway import Gateway
from tests.live import free_port, start_uvicorn
from tests.services import USING_POSTGRES, USING_REDIS

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 200
ALLOWED = 10
BODY = {"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}


def arrange(gateway: Gateway) -> ApiKey:
    """Each request may cost up to 100 output tokens × 1000 per 1M = 0.1; the budget affords 10."""
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal(0),
        output_price=Decimal(1000),
    )
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    do_set_limits(key=key, money_budget=Decimal("1.05"), budget_period="monthly")
    # A loaded CI machine must not turn the held replies into upstream timeouts.
    Provider.objects.filter(pk=gateway.openai_provider.pk).update(timeout=60)
    Provider.objects.get(pk=gateway.openai_provider.pk).save()
    gateway.fake.script(
        *[Reply(text="paid", input_tokens=5, output_tokens=60, delay=1.0)] * REQUESTS
    )
    return key


async def fire(urls: list[str], key: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    urls[number % len(urls)] + "/v1/chat/completions",
                    headers={"authorization": f"Bearer {key}"},
                    json=BODY,
                )
                for number in range(REQUESTS)
            )
        )


def check(responses: list[httpx.Response], gateway: Gateway) -> None:
    statuses = [response.status_code for response in responses]
    others = [
        response.text[:200] for response in responses if response.status_code not in (200, 429)
    ]
    assert not others, others
    assert statuses.count(200) == ALLOWED
    assert statuses.count(429) == REQUESTS - ALLOWED
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.json()["error"]["code"] == "insufficient_quota"
    records = gateway.wait_records(REQUESTS, timeout=20)
    spent = sum((record.cost for record in records), Decimal(0))
    assert spent == ALLOWED * Decimal("0.06")  # 60 output tokens each, exactly
    assert spent <= Decimal("1.05")
    assert sum(1 for record in records if record.status == "ok") == ALLOWED


def test_200_simultaneous_requests_spend_no_more_than_the_budget(gateway: Gateway) -> None:
    key = arrange(gateway)
    started = time.monotonic()
    responses = asyncio.run(fire([gateway.url], gateway.key))
    elapsed = time.monotonic() - started
    check(responses, gateway)
    # The 190 refusals did not wait for the upstream.
    assert elapsed < 15
    assert key.usage_records.filter(status="ok").count() == ALLOWED


@pytest.mark.skipif(
    not (USING_POSTGRES and USING_REDIS),
    reason="two server processes share state only through PostgreSQL and Redis (TEST_DATABASE_URL, TEST_REDIS_URL)",
)
def test_the_budget_holds_across_two_server_processes_sharing_redis(gateway: Gateway) -> None:
    arrange(gateway)
    database = connection.settings_dict
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": settings.SECRET_KEY,
        "SWITCHBOARD_ENCRYPTION_KEY": settings.SWITCHBOARD_ENCRYPTION_KEY,
        "SWITCHBOARD_DATA_DIR": str(settings.DATA_DIR),
        "LOG_LEVEL": "WARNING",
    }
    ports = [free_port(), free_port()]
    servers = [start_uvicorn(port, env, ROOT) for port in ports]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        responses = asyncio.run(fire(urls, gateway.key))
        # Both processes admitted some of the ten, and refused the rest.
        ok_per_server = [
            sum(
                1
                for number, response in enumerate(responses)
                if number % 2 == index and response.status_code == 200
            )
            for index in range(2)
        ]
        assert sum(ok_per_server) == ALLOWED
        deadline = time.monotonic() + 20
        while UsageRecord.objects.count() < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.1)
        check(responses, gateway)
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(10)


DENSE = "".join(chr(33 + (number * 7919) % 94) for number in range(2000))  # ASCII punctuation soup


async def fire_dense(url: str, key: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(
                client.post(
                    url + "/v1/chat/completions",
                    headers={"authorization": f"Bearer {key}"},
                    json={
                        "model": "gpt-fake",
                        "messages": [{"role": "user", "content": DENSE}],
                        "max_tokens": 10,
                    },
                )
                for _ in range(count)
            )
        )


def test_token_dense_prompts_cannot_overdraw_a_token_budget(gateway: Gateway) -> None:
    # Given prompts whose every byte is a token (the worst a byte-level tokenizer does,
    # four times the characters ÷ 4 estimate) and a token budget that affords ten...
    cost_each = len(DENSE) + 10
    budget = 10 * cost_each + cost_each // 2
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    do_set_limits(key=key, token_budget=budget, budget_period="monthly")
    Provider.objects.filter(pk=gateway.openai_provider.pk).update(timeout=60)
    Provider.objects.get(pk=gateway.openai_provider.pk).save()
    gateway.fake.script(
        *[Reply(text="x", input_tokens=len(DENSE), output_tokens=10, delay=1.0)] * REQUESTS
    )

    # ...200 of them at once never spend more than the budget.
    responses = asyncio.run(fire_dense(gateway.url, gateway.key, REQUESTS))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, [r.text[:200] for r in responses if r.status_code >= 500]
    records = gateway.wait_records(REQUESTS, timeout=30)
    spent = sum(record.input_tokens + record.output_tokens for record in records)
    assert spent <= budget, f"spent {spent} of a {budget}-token budget ({spent / budget:.0%})"
    print(  # noqa: T201 -- the issue's figures, shown with pytest -s
        f"dense prompts: {REQUESTS} at once, spent {spent} of a {budget}-token budget ({spent / budget:.0%})"
    )
    assert statuses.count(200) >= 5  # the bound is tight enough to use most of the budget
