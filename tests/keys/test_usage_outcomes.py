"""How a request ended, and what it cost, as the usage ledger and the key's budget say it.

Reports tell a stopped reply from a client that went away and from an upstream that
failed; a request the upstream never served costs nothing and takes nothing from
the key's budget, and one cut mid-stream is billed for what it produced.
"""

from __future__ import annotations

import json
from decimal import Decimal
from io import StringIO

import openai
import pytest
from django.core.management import call_command

from chatapp.models import CatalogModel
from keys import limiter
from keys.actions import do_set_limits, do_set_price
from keys.models import ApiKey, UsageRecord
from tests.fake_upstream import DropMidStream, Fail, Reply
from tests.gateway import Gateway

USER = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def priced_key(gateway: Gateway, budget: str = "10") -> ApiKey:
    """Alice's key with a money budget, on a model priced high enough to see any charge."""
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal(1000),
        output_price=Decimal(1000),
    )
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    do_set_limits(key=key, money_budget=Decimal(budget), budget_period="monthly")
    key.refresh_from_db()
    return key


def spent(key: ApiKey) -> str:
    key.refresh_from_db()
    return str(limiter.usage(key_id=key.pk, limits=key.limits)["money_budget"]["spent"])


def spent_as_enforced(gateway: Gateway, key: ApiKey) -> str:
    """What the limiter itself counts as spent: the refusal of a request over a tiny budget."""
    do_set_limits(key=key, money_budget=Decimal("0.000001"), budget_period="monthly")
    with pytest.raises(openai.RateLimitError) as refused:
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER, max_tokens=5)  # type: ignore[arg-type]
    message = refused.value.message
    assert "money budget" in message
    return message.split("is exhausted: ", 1)[1].split(" of ", 1)[0]


def test_an_upstream_500_is_recorded_as_an_error_at_no_cost_and_spends_no_budget(
    gateway: Gateway,
) -> None:
    key = priced_key(gateway)
    # Given an upstream that answers 500 to every attempt,
    gateway.fake.script(*[Fail(500, "provider down")] * 3)
    # when alice's request fails,
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    assert caught.value.status_code == 502
    # then it is in the ledger with its failure, and nothing was charged for it:
    [record] = gateway.wait_records(1)
    assert (record.status, record.http_status) == ("error", 502)
    assert (record.input_tokens, record.output_tokens, record.cost) == (0, 0, Decimal(0))
    assert record.estimated is False
    assert spent(key) == "0"
    assert spent_as_enforced(gateway, key) == "0"


def test_a_stream_that_breaks_after_some_output_is_an_error_billed_for_what_it_produced(
    gateway: Gateway,
) -> None:
    key = priced_key(gateway)
    gateway.fake.script(
        DropMidStream(after_chunks=4, text="Once upon a time there was a lighthouse keeper.")
    )
    received: list[str] = []

    def read_story() -> None:
        stream = gateway.openai().chat.completions.create(
            model="gpt-fake",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
        )
        received.extend(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    with pytest.raises(openai.APIError):
        read_story()
    assert "".join(received)  # some of the story reached alice before the upstream broke
    [record] = gateway.wait_records(1)
    assert record.status == "error"
    assert record.output_tokens > 0
    assert record.input_tokens > 0  # the upstream read the prompt to write that much
    assert record.cost > 0
    assert record.estimated is True
    assert Decimal(spent(key)) == record.cost


def test_a_client_that_leaves_a_stream_is_recorded_as_client_disconnected(
    gateway: Gateway,
) -> None:
    gateway.fake.script(Reply(text=" ".join(["wave"] * 300), chunk_delay=0.02))
    stream = gateway.openai().chat.completions.create(
        model="gpt-fake",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()  # alice's program goes away mid-reply
    [record] = gateway.wait_records(1, timeout=10)
    assert record.status == "client_disconnected"
    assert record.http_status == 499
    assert 0 < record.output_tokens < 300


def test_a_complete_stream_is_recorded_ok(gateway: Gateway) -> None:
    gateway.fake.script(Reply(text="The end.", input_tokens=12, output_tokens=3))
    stream = gateway.openai().chat.completions.create(
        model="gpt-fake",
        messages=USER,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "The end."
    [record] = gateway.wait_records(1)
    assert (record.status, record.input_tokens, record.output_tokens) == ("ok", 12, 3)
    assert UsageRecord.objects.count() == 1


def test_key_usage_shows_the_requests_the_server_counted(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    do_set_limits(key=key, rpm=100, rpd=1000, tpm=100_000)
    for _ in range(3):
        gateway.fake.script(Reply(text="ok", input_tokens=10, output_tokens=5))
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # type: ignore[arg-type]
    gateway.wait_records(3)
    # ``manage.py key usage`` runs in a process of its own: in the embedded mode its
    # in-process limiter has counted nothing (Redis: the same counters as the server).
    monkeypatch.setattr(limiter, "local_backend", limiter.LocalBackend())
    out = StringIO()
    call_command("key", "usage", key.prefix, "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert (report["rpm"]["used"], report["rpd"]["used"]) == (3, 3)
    assert (report["tpm"]["used"], report["tpd"]["used"]) == (45, 45)
    assert report["source"] in ("ledger", "redis")
    out = StringIO()
    call_command("key", "usage", key.prefix, stdout=out)
    text = out.getvalue()
    assert "rpm          3 / 100" in text
    if report["source"] == "ledger":
        assert "counted from the usage ledger" in text
        assert report["concurrency"]["in_flight"] is None
