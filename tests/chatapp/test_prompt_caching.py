"""Prompt caching: cache reads and (Anthropic) cache writes recorded apart and priced exactly.

Anthropic reports ``input_tokens`` without the cache: ``cache_read_input_tokens`` and
``cache_creation_input_tokens`` come beside it. We record the total input with the
reads and writes counted separately, price each at its own price, and give each
client its own dialect's view of the same numbers. ``cache_control`` reaches an
Anthropic upstream untouched.
"""

from __future__ import annotations

import io
import json
from decimal import Decimal

import pytest
from django.core.management import call_command

from chatapp.models import CatalogModel
from keys.actions import do_set_price
from keys.models import ModelPrice
from keys.pricing import MILLION
from tests.fake_upstream import Reply
from tests.gateway import Gateway

pytestmark = pytest.mark.django_db

# Anthropic-like prices per 1M: input 3, cache read 0.30, cache write 3.75, output 15.
PRICES = {
    "input_price": Decimal(3),
    "output_price": Decimal(15),
    "cached_input_price": Decimal("0.3"),
    "cache_write_price": Decimal("3.75"),
}
# The upstream's own counts: 100 plain input, 3,000 read from the cache, 2,000 written.
PLAIN, READ, WRITTEN, OUTPUT = 100, 3_000, 2_000, 50
EXPECTED_COST = (
    PLAIN * 3 + READ * Decimal("0.3") + WRITTEN * Decimal("3.75") + OUTPUT * 15
) / MILLION
CACHED_SYSTEM = [
    {
        "type": "text",
        "text": "You are a careful assistant. " * 50,
        "cache_control": {"type": "ephemeral"},
    }
]


@pytest.fixture
def priced(gateway: Gateway) -> Gateway:
    do_set_price(model=CatalogModel.objects.get(name="claude-fake"), **PRICES)
    gateway.fake.script(
        Reply(
            text="cached answer",
            input_tokens=PLAIN,
            cached_tokens=READ,
            cache_write_tokens=WRITTEN,
            output_tokens=OUTPUT,
        )
    )
    return gateway


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_client_sees_its_cache_counts_and_the_record_prices_them(
    priced: Gateway, stream: bool
) -> None:
    client = priced.anthropic()
    arguments = {
        "model": "claude-fake",
        "max_tokens": 100,
        "system": CACHED_SYSTEM,
        "messages": [{"role": "user", "content": "hi"}],
    }
    if stream:
        with client.messages.stream(**arguments) as events:
            usage = events.get_final_message().usage
    else:
        usage = client.messages.create(**arguments).usage
    assert (usage.input_tokens, usage.cache_read_input_tokens) == (PLAIN, READ)
    assert usage.cache_creation_input_tokens == WRITTEN

    [record] = priced.wait_records(1)
    assert record.input_tokens == PLAIN + READ + WRITTEN
    assert (record.cached_tokens, record.cache_write_tokens) == (READ, WRITTEN)
    assert record.cache_write_price == Decimal("3.75")
    assert record.cost == EXPECTED_COST

    # cache_control reached the Anthropic upstream untouched.
    [sent] = [r for r in priced.fake.requests if r.path.endswith("/messages")]
    assert sent.json["system"] == CACHED_SYSTEM


@pytest.mark.parametrize("stream", [False, True])
def test_an_openai_client_of_an_anthropic_model_gets_the_total_and_the_reads(
    priced: Gateway, stream: bool
) -> None:
    client = priced.openai()
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="claude-fake",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
    else:
        usage = client.chat.completions.create(model="claude-fake", messages=messages).usage
    assert usage is not None
    assert usage.prompt_tokens == PLAIN + READ + WRITTEN
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == READ
    [record] = priced.wait_records(1)
    assert record.cost == EXPECTED_COST


def test_without_a_cache_write_price_writes_cost_the_input_price(gateway: Gateway) -> None:
    do_set_price(
        model=CatalogModel.objects.get(name="claude-fake"),
        input_price=Decimal(3),
        output_price=Decimal(15),
    )
    gateway.fake.script(
        Reply(text="ok", input_tokens=PLAIN, cache_write_tokens=WRITTEN, output_tokens=OUTPUT)
    )
    gateway.anthropic().messages.create(
        model="claude-fake", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    [record] = gateway.wait_records(1)
    assert record.cost == ((PLAIN + WRITTEN) * 3 + OUTPUT * 15) / MILLION


def test_the_price_command_sets_a_cache_write_price(gateway: Gateway) -> None:
    out = io.StringIO()
    call_command(
        "price",
        "set",
        "claude-fake",
        "--input",
        "3",
        "--output",
        "15",
        "--cache-write",
        "3.75",
        "--json",
        stdout=out,
    )
    assert json.loads(out.getvalue())["cache_write"] == "3.75"
    assert ModelPrice.objects.get().cache_write_per_mtok == Decimal("3.75")
