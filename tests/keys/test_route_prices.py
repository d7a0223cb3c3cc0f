"""Upstream prices per route: each usage record keeps what the provider charged us, and the
roll-ups' margin (charged - upstream cost) is exact to the last digit."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone, translation

from accounts.models import AuditEvent, User
from chatapp.models import CatalogModel, Provider, Route
from keys import limiter, rollups
from keys.actions import KeyActionError, do_set_price, do_set_route_price
from keys.models import RoutePrice, UsageRecord
from keys.pricing import MILLION
from tests.fake_upstream import Fail, Reply
from tests.gateway import UPSTREAM_KEY, Gateway

pytestmark = pytest.mark.django_db

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _english_afterwards() -> Iterator[None]:
    """A request in Chinese leaves its language active in this thread: reset it."""
    yield
    translation.deactivate()


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def route_of(model: str) -> Route:
    return Route.objects.get(model__name=model)


def expected(prices: tuple[str, str, str], tokens: tuple[int, int, int]) -> Decimal:
    """Cost by hand: (input - cached) at the input price, cached at its own, output at its own."""
    input_price, output_price, cached_price = (Decimal(price) for price in prices)
    input_tokens, output_tokens, cached = tokens
    return (
        (input_tokens - cached) * input_price + cached * cached_price + output_tokens * output_price
    ) / MILLION


def test_a_request_through_a_priced_route_records_charged_and_upstream_cost(
    gateway: Gateway,
) -> None:
    model = CatalogModel.objects.get(name="gpt-fake")
    do_set_price(
        model=model,
        input_price=Decimal("2.5"),
        output_price=Decimal("10"),
        cached_input_price=Decimal("1.25"),
    )
    do_set_route_price(
        route=route_of("gpt-fake"),
        input_price=Decimal("1.1"),
        output_price=Decimal("4.4"),
        cached_input_price=Decimal("0.55"),
    )
    gateway.fake.script(Reply(text="ok", input_tokens=12_345, output_tokens=678, cached_tokens=9))

    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)

    [record] = gateway.wait_records(1)
    assert record.cost == expected(("2.5", "10", "1.25"), (12_345, 678, 9))
    assert record.upstream_cost == expected(("1.1", "4.4", "0.55"), (12_345, 678, 9))
    assert record.upstream_cost == Decimal("0.01655775")  # 12336*1.1 + 9*0.55 + 678*4.4, / 1M
    assert record.cost - record.upstream_cost == Decimal("0.0210735")


def test_a_route_without_an_upstream_price_records_an_upstream_cost_of_zero(
    gateway: Gateway,
) -> None:
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal(1),
        output_price=Decimal(1),
    )
    gateway.fake.script(Reply(text="ok", input_tokens=1_000_000, output_tokens=0))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    [record] = gateway.wait_records(1)
    assert (record.cost, record.upstream_cost) == (Decimal(1), Decimal(0))


def test_after_a_failover_the_route_that_answered_is_the_one_priced(gateway: Gateway) -> None:
    # Given two routes of one model: the first (priority 0) fails, the second answers.
    model = CatalogModel.objects.get(name="gpt-fake")
    first = route_of("gpt-fake")
    backup_provider = Provider(
        name="fake-backup", type="openai", base_url=gateway.fake.openai_base_url, timeout=5
    )
    backup_provider.api_key = UPSTREAM_KEY
    backup_provider.save()
    second = Route.objects.create(
        model=model, provider=backup_provider, upstream_model="gpt-backup", priority=1
    )
    do_set_route_price(route=first, input_price=Decimal(100), output_price=Decimal(100))
    do_set_route_price(route=second, input_price=Decimal(3), output_price=Decimal(7))
    gateway.fake.script(Fail(500, "down"), Reply(text="ok", input_tokens=1000, output_tokens=10))

    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)

    [record] = gateway.wait_records(1)
    assert [sent.json["model"] for sent in gateway.fake.requests] == ["gpt-upstream", "gpt-backup"]  # type: ignore[index]
    assert (record.route_id, record.provider, record.attempts) == (second.pk, "fake-backup", 2)
    assert record.upstream_cost == Decimal("0.00307")  # (1000*3 + 10*7) / 1M


def test_a_failed_call_that_produced_nothing_costs_nothing_either_way(gateway: Gateway) -> None:
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal(5),
        output_price=Decimal(5),
    )
    do_set_route_price(route=route_of("gpt-fake"), input_price=Decimal(3), output_price=Decimal(3))
    gateway.fake.script(*[Fail(500, "down")] * 3)

    with pytest.raises(Exception, match="500|down|upstream"):
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)

    [record] = gateway.wait_records(1)
    assert record.status == "error"
    assert (record.cost, record.upstream_cost) == (Decimal(0), Decimal(0))


def test_a_price_change_mid_month_applies_from_its_moment_and_never_rewrites_records(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    route = route_of("gpt-fake")
    do_set_route_price(
        route=route,
        input_price=Decimal(2),
        output_price=Decimal(4),
        effective_from=datetime(2026, 11, 1, tzinfo=UTC),
    )
    do_set_route_price(
        route=route,
        input_price=Decimal(1),
        output_price=Decimal(3),
        effective_from=datetime(2026, 11, 15, 12, 0, tzinfo=UTC),
    )

    def ask_at(when: datetime) -> UsageRecord:
        monkeypatch.setattr(limiter, "clock", lambda: when)
        count = UsageRecord.objects.count()
        gateway.fake.script(Reply(text="ok", input_tokens=1_000_000, output_tokens=1_000_000))
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
        return gateway.wait_records(count + 1)[-1]

    before = ask_at(datetime(2026, 11, 15, 11, 59, 59, tzinfo=UTC))
    after = ask_at(datetime(2026, 11, 15, 12, 0, tzinfo=UTC))
    assert (before.upstream_cost, after.upstream_cost) == (Decimal(6), Decimal(4))

    # A later price (even one back-dated to the start of the month) leaves both records be.
    do_set_route_price(
        route=route,
        input_price=Decimal(9),
        output_price=Decimal(9),
        effective_from=datetime(2026, 11, 1, tzinfo=UTC),
    )
    latest = ask_at(datetime(2026, 11, 16, tzinfo=UTC))
    assert latest.upstream_cost == Decimal(4)  # 11-15 12:00 is still the newest in force
    before.refresh_from_db()
    after.refresh_from_db()
    assert (before.upstream_cost, after.upstream_cost) == (Decimal(6), Decimal(4))


def test_the_rollups_margin_is_charged_minus_upstream_cost_to_the_last_digit(
    gateway: Gateway,
) -> None:
    # Given prices with awkward decimals on the model and on its route...
    model = CatalogModel.objects.get(name="gpt-fake")
    # (6 decimal places per 1M tokens: every cost fits the ledger's 12 places exactly.)
    charged = ("0.150007", "0.600003", "0.075001")
    upstream = ("0.123457", "0.49", "0.061729")
    do_set_price(
        model=model,
        input_price=Decimal(charged[0]),
        output_price=Decimal(charged[1]),
        cached_input_price=Decimal(charged[2]),
    )
    do_set_route_price(
        route=route_of("gpt-fake"),
        input_price=Decimal(upstream[0]),
        output_price=Decimal(upstream[1]),
        cached_input_price=Decimal(upstream[2]),
    )
    usages = [(1, 1, 0), (777, 13, 5), (123_457, 8_191, 1_024), (3, 99_999, 3), (65_537, 1, 0)]
    # ...when requests go through the real relay (one of them streamed)...
    for index, (input_tokens, output_tokens, cached) in enumerate(usages):
        gateway.fake.script(
            Reply(
                text="ok",
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cached_tokens=cached,
            )
        )
        if index == 2:
            list(
                gateway.openai().chat.completions.create(
                    model="gpt-fake",
                    messages=USER,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
        else:
            gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    records = gateway.wait_records(len(usages))
    assert len(records) == len(usages)

    # ...each record holds both amounts exactly, and the roll-ups' margin is their difference.
    want_cost = sum((expected(charged, usage) for usage in usages), Decimal(0))
    want_upstream = sum((expected(upstream, usage) for usage in usages), Decimal(0))
    assert sum((r.cost for r in records), Decimal(0)) == want_cost
    assert sum((r.upstream_cost for r in records), Decimal(0)) == want_upstream
    now = timezone.now()
    start = (now - timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
    periods = rollups.summarize(start, start + timedelta(days=2), zone="UTC", granularity="day")
    cost = sum((period.totals.cost for period in periods), Decimal(0))
    upstream_cost = sum((period.totals.upstream_cost for period in periods), Decimal(0))
    margin = sum((period.totals.margin for period in periods), Decimal(0))
    assert (cost, upstream_cost) == (want_cost, want_upstream)
    assert margin == want_cost - want_upstream
    assert margin == Decimal("0.016927697969")  # to the 12th place: nothing rounded anywhere


def test_an_upstream_price_change_reaches_the_relay_at_once(gateway: Gateway) -> None:
    route = route_of("gpt-fake")
    gateway.fake.script(Reply(text="ok", input_tokens=1_000_000, output_tokens=0))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)  # catalog cached
    do_set_route_price(route=route, input_price=Decimal("0.5"), output_price=Decimal(1))
    gateway.fake.script(Reply(text="ok", input_tokens=1_000_000, output_tokens=0))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    first, second = gateway.wait_records(2)
    assert (first.upstream_cost, second.upstream_cost) == (Decimal(0), Decimal("0.5"))


# --- Setting route prices: the action, the command, the console, the admin ---


@pytest.fixture
def route(db) -> Route:
    provider = Provider.objects.create(name="acme", type="openai", base_url="http://x/v1")
    model = CatalogModel.objects.create(name="acme-large")
    return Route.objects.create(model=model, provider=provider, upstream_model="large-v2")


def test_setting_a_route_price_is_audited_and_refuses_junk(route: Route) -> None:
    price = do_set_route_price(route=route, input_price=Decimal("0.3"), output_price=Decimal(1))
    event = AuditEvent.objects.get(object_type="routeprice")
    assert event.action == "create"
    assert event.changes["input_per_mtok"] == [None, "0.3"]
    assert event.changes["route"] == [None, str(route)]
    assert price.currency == "USD"
    with pytest.raises(KeyActionError, match="negative"):
        do_set_route_price(route=route, input_price=Decimal(-1), output_price=Decimal(1))
    with pytest.raises(KeyActionError, match="12 decimal places"):
        do_set_route_price(
            route=route, input_price=Decimal("0.0000000000001"), output_price=Decimal(1)
        )
    assert RoutePrice.objects.count() == 1


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_the_price_command_sets_and_lists_route_prices(route: Route) -> None:
    printed = run(
        "price",
        "set-route",
        "acme-large",
        "--provider",
        "acme",
        "--input",
        "0.25",
        "--output",
        "1.5",
        "--from",
        "2026-11-01T00:00:00+00:00",
    )
    assert "acme-large via acme/large-v2: upstream input 0.25, output 1.5 USD" in printed
    [row] = json.loads(run("price", "list-routes", "acme-large", "--json"))
    assert row == {
        "route": route.pk,
        "model": "acme-large",
        "provider": "acme",
        "upstream_model": "large-v2",
        "input": "0.25",
        "output": "1.5",
        "cached_input": None,
        "cache_write": None,
        "currency": "USD",
        "per": "1M tokens",
        "effective_from": "2026-11-01T00:00:00+00:00",
    }
    with pytest.raises(CommandError, match="no route through provider 'other'"):
        run(
            "price",
            "set-route",
            "acme-large",
            "--provider",
            "other",
            "--input",
            "1",
            "--output",
            "1",
        )
    # The model prices' subcommands are unchanged.
    assert "acme-large: input 1" in run(
        "price", "set", "acme-large", "--input", "1", "--output", "2"
    )


def test_an_admin_adds_an_upstream_price_in_the_console(route: Route, carol: User) -> None:
    url = reverse("console:route_prices", args=[route.pk])
    client = signed_in(carol)
    assert "No upstream price yet" in client.get(url).content.decode()
    model_page = client.get(reverse("console:model", args=[route.model_id])).content.decode()
    assert url in model_page  # each route row links to its upstream prices

    response = client.post(url, {"input_per_mtok": "0.4", "output_per_mtok": "1.6"})
    assert response.status_code == 302
    page = client.get(url).content.decode()
    assert "0.4" in page
    assert "1.6 USD" in page
    assert "current" in page
    assert RoutePrice.objects.get().route == route

    refused = client.post(url, {"input_per_mtok": "-2", "output_per_mtok": "x"})
    assert refused.status_code == 400
    assert "A price cannot be negative." in refused.content.decode()
    assert RoutePrice.objects.count() == 1


def test_only_admins_see_or_set_upstream_prices(route: Route, frank: User, alice: User) -> None:
    url = reverse("console:route_prices", args=[route.pk])
    for user in (frank, alice):
        client = signed_in(user)
        assert client.get(url).status_code == 403
        assert client.post(url, {"input_per_mtok": "1", "output_per_mtok": "1"}).status_code == 403
    assert not RoutePrice.objects.exists()


def test_the_upstream_price_page_is_translated(route: Route, carol: User) -> None:
    client = signed_in(carol)
    client.cookies["django_language"] = "zh-hans"
    page = client.get(reverse("console:route_prices", args=[route.pk])).content.decode()
    assert "上游价格" in page


def test_the_django_admin_adds_but_never_edits_an_upstream_price(route: Route, carol: User) -> None:
    client = signed_in(carol)
    response = client.post(
        reverse("admin:keys_routeprice_add"),
        {
            "route": route.pk,
            "input_per_mtok": "0.2",
            "output_per_mtok": "0.8",
            "effective_from_0": "2026-11-01",
            "effective_from_1": "00:00:00",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    price = RoutePrice.objects.get()
    assert (price.input_per_mtok, price.currency) == (Decimal("0.2"), "USD")
    assert AuditEvent.objects.filter(object_type="routeprice", source="admin").exists()
    change = client.post(
        reverse("admin:keys_routeprice_change", args=[price.pk]),
        {"route": route.pk, "input_per_mtok": "9", "output_per_mtok": "9"},
    )
    assert change.status_code in (302, 403)
    price.refresh_from_db()
    assert price.input_per_mtok == Decimal("0.2")
