"""Per-key rate limits, concurrency, max output and budgets, seen through the official SDKs.

Runs against whichever backend the run configures: the in-process limiter on the
embedded defaults, Redis (Lua scripts) when TEST_REDIS_URL is set.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import anthropic
import httpx
import openai
import pytest

from chatapp.models import CatalogModel
from keys import limiter
from keys.actions import do_set_limits, do_set_price
from keys.models import ApiKey, UsageRecord
from tests.fake_upstream import Reply
from tests.gateway import Gateway

USER = [{"role": "user", "content": "hi"}]


def key_of(gateway: Gateway) -> ApiKey:
    return ApiKey.objects.get(user=gateway.user, name="tests")


def test_rpm_refuses_the_request_over_the_limit_with_openai_headers(gateway: Gateway) -> None:
    do_set_limits(key=key_of(gateway), rpm=3)
    client = gateway.openai()
    remaining = []
    for _ in range(3):
        response = client.chat.completions.with_raw_response.create(model="gpt-fake", messages=USER)
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == ["2", "1", "0"]

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-fake", messages=USER)
    error = caught.value
    assert error.code == "rate_limit_exceeded"
    assert "requests per minute" in error.message
    assert "limit 3, used 3" in error.message
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(gateway.fake.requests) == 3  # the refused request never reached the upstream


def test_messages_carry_anthropic_ratelimit_headers(gateway: Gateway) -> None:
    do_set_limits(key=key_of(gateway), rpm=2, tpm=100_000)
    client = gateway.anthropic()
    response = client.messages.with_raw_response.create(
        model="claude-fake", max_tokens=50, messages=USER
    )
    assert response.headers["anthropic-ratelimit-requests-limit"] == "2"
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert response.headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert response.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    client.messages.create(model="claude-fake", max_tokens=50, messages=USER)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="claude-fake", max_tokens=50, messages=USER)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert caught.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"


def test_tpm_counts_the_worst_case_then_the_actual_usage(gateway: Gateway) -> None:
    do_set_limits(key=key_of(gateway), tpm=1000)
    client = gateway.openai()
    with pytest.raises(openai.RateLimitError, match="tokens per minute.*needs up to"):
        client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=2000)
    # A request that fits reserves its worst case, then settles at its actual usage.
    gateway.fake.script(Reply(text="ok", input_tokens=10, output_tokens=5))
    response = client.chat.completions.with_raw_response.create(
        model="gpt-fake", messages=USER, max_tokens=500
    )
    assert int(response.headers["x-ratelimit-remaining-tokens"]) < 500
    gateway.wait_records(1)
    time.sleep(0.1)
    report = limiter.usage(key_id=key_of(gateway).pk, limits=limiter.Limits(tpm=1000))
    assert report["tpm"]["used"] == 15


def test_concurrency_limits_requests_in_flight(gateway: Gateway) -> None:
    do_set_limits(key=key_of(gateway), concurrency=1)
    gateway.fake.script(Reply(text=" ".join(["slow"] * 10), chunk_delay=0.1))
    client = gateway.openai()
    started = threading.Event()
    chunks: list[str] = []

    def slow_stream() -> None:
        for chunk in client.chat.completions.create(model="gpt-fake", messages=USER, stream=True):
            started.set()
            chunks.append(chunk.choices[0].delta.content or "" if chunk.choices else "")

    worker = threading.Thread(target=slow_stream)
    worker.start()
    assert started.wait(5)
    with pytest.raises(openai.RateLimitError, match="concurrent requests"):
        client.chat.completions.create(model="gpt-fake", messages=USER)
    worker.join(10)
    gateway.wait_records(2)
    client.chat.completions.create(model="gpt-fake", messages=USER)  # the slot is free again


def test_max_tokens_over_the_keys_limit_is_refused_or_clamped(gateway: Gateway) -> None:
    key = key_of(gateway)
    do_set_limits(key=key, max_output_tokens=256)
    client = gateway.openai()
    with pytest.raises(
        openai.BadRequestError,
        match="max_tokens: 1000 is more than the 256 output tokens this API key allows",
    ):
        client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=1000)
    # Without max_tokens the key's limit bounds the reply.
    client.chat.completions.create(model="gpt-fake", messages=USER)
    assert gateway.fake.requests[-1].json["max_tokens"] == 256

    do_set_limits(key=key, clamp_max_tokens=True)
    client.chat.completions.create(model="gpt-fake", messages=USER, max_completion_tokens=1000)
    assert gateway.fake.requests[-1].json["max_completion_tokens"] == 256
    gateway.anthropic().messages.create(model="claude-fake", max_tokens=1000, messages=USER)
    assert gateway.fake.requests[-1].json["max_tokens"] == 256

    # With clamping on, the model's own limit clamps too (gpt-fake allows 4096).
    do_set_limits(key=key, max_output_tokens=None)
    client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=100_000)
    assert gateway.fake.requests[-1].json["max_tokens"] == 4096


def test_each_record_keeps_the_price_of_its_time(gateway: Gateway) -> None:
    model = CatalogModel.objects.get(name="gpt-fake")
    do_set_price(model=model, input_price=Decimal("0.15"), output_price=Decimal("0.60"))
    gateway.fake.script(Reply(text="a", input_tokens=1234, output_tokens=567))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    [first] = gateway.wait_records(1)
    # 1234 × 0.15 / 1M + 567 × 0.60 / 1M, exactly.
    assert first.cost == Decimal("0.0001851") + Decimal("0.0003402")
    assert (first.input_price, first.output_price, first.priced, first.currency) == (
        Decimal("0.15"),
        Decimal("0.60"),
        True,
        "USD",
    )

    do_set_price(
        model=model,
        input_price=Decimal("3"),
        output_price=Decimal("15"),
        cached_input_price=Decimal("0.3"),
    )
    gateway.fake.script(Reply(text="b", input_tokens=1000, output_tokens=100, cached_tokens=400))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    first_again, second = gateway.wait_records(2)
    assert first_again.cost == Decimal("0.0005253")  # history untouched
    assert second.cost == (600 * Decimal(3) + 400 * Decimal("0.3") + 100 * Decimal(15)) / 1_000_000
    assert isinstance(second.cost, Decimal)


def test_a_future_price_applies_from_its_effective_time(gateway: Gateway) -> None:
    model = CatalogModel.objects.get(name="gpt-fake")
    do_set_price(model=model, input_price=Decimal(1), output_price=Decimal(1))
    do_set_price(
        model=model,
        input_price=Decimal(100),
        output_price=Decimal(100),
        effective_from=datetime.now(tz=ZoneInfo("UTC")) + timedelta(days=1),
    )
    gateway.fake.script(Reply(text="a", input_tokens=1_000_000, output_tokens=0))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    [record] = gateway.wait_records(1)
    assert record.cost == Decimal(1)


def test_an_unpriced_model_costs_zero_and_says_so(gateway: Gateway) -> None:
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    [record] = gateway.wait_records(1)
    assert (record.cost, record.priced) == (Decimal(0), False)


def test_an_exhausted_money_budget_is_insufficient_quota_naming_the_budget(
    gateway: Gateway,
) -> None:
    key = key_of(gateway)
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal(0),
        output_price=Decimal(1000),
    )
    do_set_limits(key=key, money_budget=Decimal("0.25"), budget_period="monthly")
    client = gateway.openai()
    # Each request may cost up to 100 tokens × 1000 / 1M = 0.1: two fit, a third does not.
    for _ in range(2):
        gateway.fake.script(Reply(text="x", input_tokens=5, output_tokens=100))
        client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=100)
    gateway.wait_records(2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=100)
    error = caught.value
    assert error.code == "insufficient_quota"
    assert "monthly money budget" in error.message
    assert "0.2 of 0.25 USD used" in error.message
    assert "resets at" in error.message
    # Anthropic clients get rate_limit_error for the same refusal.
    with pytest.raises(anthropic.RateLimitError, match="money budget"):
        gateway.anthropic().messages.create(model="gpt-fake", max_tokens=100, messages=USER)


def test_a_token_budget_resets_at_the_period_boundary_in_the_time_zone(
    gateway: Gateway, settings, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    settings.TIME_ZONE = "Asia/Shanghai"
    shanghai = ZoneInfo("Asia/Shanghai")
    now = {"value": datetime(2031, 1, 31, 23, 59, 0, tzinfo=shanghai)}
    monkeypatch.setattr(limiter, "clock", lambda: now["value"])
    # A reservation is the request's upper bound: about 150 tokens for this small prompt
    # (its JSON body's bytes) plus max_tokens.
    do_set_limits(key=key_of(gateway), token_budget=400, budget_period="monthly")
    client = gateway.openai()
    gateway.fake.script(Reply(text="x", input_tokens=50, output_tokens=100))
    client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=150)
    gateway.wait_records(1)
    with pytest.raises(
        openai.RateLimitError,
        match=r"monthly token budget .* 150 of 400 tokens used.*resets at 2031-02-01T00:00:00\+08:00",
    ):
        client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=200)

    # One minute later it is February in Shanghai (still January in UTC): a new period.
    now["value"] = datetime(2031, 2, 1, 0, 0, 30, tzinfo=shanghai)
    client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=200)


def test_a_reservation_of_a_request_that_never_settles_expires(
    settings, monkeypatch: pytest.MonkeyPatch, db
) -> None:  # type: ignore[no-untyped-def]
    settings.SWITCHBOARD_RESERVATION_TTL = 60
    start = datetime(2031, 3, 1, 12, 0, tzinfo=ZoneInfo("UTC"))
    now = {"value": start}
    monkeypatch.setattr(limiter, "clock", lambda: now["value"])
    limits = limiter.Limits(concurrency=1)
    import asyncio

    async def admit(request_id: str) -> limiter.Ticket:
        return await limiter.aadmit(
            key_id=424242, request_id=request_id, limits=limits, tokens=10, money_nano=0
        )

    # Given a request admitted whose worker was killed before it could settle...
    asyncio.run(admit("req_killed"))
    with pytest.raises(Exception, match="concurrent requests"):
        asyncio.run(admit("req_second"))
    # ...its reservation is released by itself once it expires.
    now["value"] = start + timedelta(seconds=61)
    ticket = asyncio.run(admit("req_third"))
    assert ticket.request_id == "req_third"


def test_budget_counters_are_rebuilt_from_the_ledger_after_a_flush(gateway: Gateway) -> None:
    key = key_of(gateway)
    do_set_limits(key=key, token_budget=500, budget_period="lifetime")
    client = gateway.openai()
    gateway.fake.script(Reply(text="x", input_tokens=100, output_tokens=150))
    client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=150)
    gateway.wait_records(1)

    # Given the counters are lost (a Redis restart or flush)...
    if limiter._redis():
        from chatapp import hotstore

        hotstore.sync_client().flushdb()
    else:
        limiter.local_backend.drop_spent()
    # ...the 250 tokens already spent are still counted: a 200-token request does not fit.
    with pytest.raises(openai.RateLimitError, match="250 of 500 tokens used"):
        client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=200)
    gateway.fake.script(Reply(text="y", input_tokens=10, output_tokens=10))
    client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=50)


def test_new_keys_get_the_default_limits(gateway: Gateway) -> None:
    from keys.actions import do_create_key

    key, raw = do_create_key(user=gateway.user, name="fresh")
    assert (key.rpm, key.rpd, key.tpm, key.concurrency) == (60, None, None, None)
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {raw}"},
        json={"model": "gpt-fake", "messages": USER},
    )
    assert response.headers["x-ratelimit-limit-requests"] == "60"
    assert UsageRecord.objects.count() <= 1


def test_a_thinking_request_reserves_up_to_the_models_output_limit(gateway: Gateway) -> None:
    # Thinking may raise the upstream's max_tokens above the client's (up to the model's
    # output limit): the budget's reservation must cover that, or thinking overspends it.
    model = CatalogModel.objects.get(name="gpt-fake")
    model.max_output_tokens = 8000
    model.save()
    do_set_limits(key=key_of(gateway), token_budget=3000, budget_period="monthly")
    client = gateway.openai()
    gateway.fake.script(Reply(text="plain", input_tokens=5, output_tokens=10))
    client.chat.completions.create(model="gpt-fake", messages=USER, max_tokens=100)
    with pytest.raises(openai.RateLimitError, match="token budget"):
        client.chat.completions.create(
            model="gpt-fake", messages=USER, max_tokens=100, reasoning_effort="low"
        )


def test_the_money_reservation_prices_input_at_the_cache_write_price(gateway: Gateway) -> None:
    # Anthropic bills cache writes at 1.25x input: a prompt written to the cache costs more
    # than its plain input, so the worst case is priced at the dearer of the two.
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal(1),
        output_price=Decimal(0),
        cache_write_price=Decimal(1000),
    )
    do_set_limits(key=key_of(gateway), money_budget=Decimal("0.001"), budget_period="monthly")
    # The input bound of a short prompt (tens of tokens) costs under 0.0001 at the input
    # price, over 0.001 at the write price.
    with pytest.raises(openai.RateLimitError, match="money budget"):
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER, max_tokens=1)
