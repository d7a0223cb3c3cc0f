"""The console's price pages: current prices, history, a new price from a moment on."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone, translation

from accounts.models import AuditEvent, AuditSource, User
from chatapp.models import CatalogModel
from keys.actions import do_set_price
from keys.models import ModelPrice
from tests.fake_upstream import Reply
from tests.gateway import Gateway

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _english_afterwards() -> Iterator[None]:
    """A request in Chinese leaves its language active in this thread: reset it."""
    yield
    translation.deactivate()


USER = [{"role": "user", "content": "hi"}]


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def text(response) -> str:  # type: ignore[no-untyped-def]
    return response.content.decode()


def local_input(when) -> str:  # type: ignore[no-untyped-def]
    return timezone.localtime(when).strftime("%Y-%m-%dT%H:%M")


@pytest.fixture
def models() -> tuple[CatalogModel, CatalogModel, CatalogModel]:
    priced = CatalogModel.objects.create(name="gpt-priced")
    unpriced = CatalogModel.objects.create(name="gpt-unpriced")
    off = CatalogModel.objects.create(name="gpt-off", enabled=False)
    do_set_price(
        model=priced,
        input_price=Decimal("1"),
        output_price=Decimal("2"),
        effective_from=timezone.now() - timedelta(days=10),
    )
    do_set_price(model=priced, input_price=Decimal("0.15"), output_price=Decimal("0.6"))
    do_set_price(
        model=priced,
        input_price=Decimal("9"),
        output_price=Decimal("9"),
        effective_from=timezone.now() + timedelta(days=5),
    )
    return priced, unpriced, off


def test_staff_see_current_prices_and_enabled_models_without_one(
    carol: User, frank: User, models
) -> None:
    for viewer in (carol, frank):
        page = text(signed_in(viewer).get(reverse("console:prices")))
        assert ">0.15<" in page
        assert ">0.6<" in page
        assert ">9<" not in page
        unpriced = page.split("Enabled models without a price", 1)[1].split("</ul>", 1)[0]
        assert "gpt-unpriced" in unpriced
        assert "gpt-priced" not in unpriced
        assert "gpt-off" not in unpriced


def test_members_may_not_open_the_price_pages(alice: User, models) -> None:
    client = signed_in(alice)
    assert client.get(reverse("console:prices")).status_code == 403
    assert client.get(reverse("console:price_history", args=["gpt-priced"])).status_code == 403


def test_the_history_lists_every_price_of_a_model_by_name_or_id(carol: User, models) -> None:
    priced = models[0]
    client = signed_in(carol)
    by_name = text(client.get(reverse("console:price_history", args=["gpt-priced"])))
    by_id = text(client.get(reverse("console:price_history", args=[str(priced.pk)])))
    for page in (by_name, by_id):
        assert page.count("<tr>") == 4  # heading + three prices
        assert "current" in page
        assert "scheduled" in page
        assert "past" in page
    assert client.get(reverse("console:price_history", args=["nope"])).status_code == 404


def test_finance_reads_prices_but_cannot_add_one(frank: User, models) -> None:
    client = signed_in(frank)
    page = text(client.get(reverse("console:prices")))
    assert "Add price" not in page
    assert '<form class="panel"' not in page
    response = client.post(
        reverse("console:prices"),
        {"model": models[0].pk, "input_per_mtok": "5", "output_per_mtok": "5"},
    )
    assert response.status_code == 403
    assert ModelPrice.objects.count() == 3


def test_an_admin_adds_a_future_price_and_history_is_kept(carol: User, models) -> None:
    priced, unpriced, _off = models
    when = timezone.now() + timedelta(days=30)
    client = signed_in(carol)

    response = client.post(
        reverse("console:price_history", args=["gpt-unpriced"]),
        {
            "model": priced.pk,  # ignored: this page prices its own model
            "input_per_mtok": "3",
            "cached_input_per_mtok": "0.3",
            "output_per_mtok": "15",
            "effective_from": local_input(when),
        },
    )

    assert response.status_code == 302
    price = ModelPrice.objects.get(model=unpriced)
    assert (price.input_per_mtok, price.cached_input_per_mtok, price.output_per_mtok) == (
        Decimal(3),
        Decimal("0.3"),
        Decimal(15),
    )
    assert abs(price.effective_from - when) < timedelta(minutes=1)
    assert ModelPrice.objects.filter(model=priced).count() == 3
    event = AuditEvent.objects.get(object_type="modelprice", object_id=str(price.pk))
    assert event.action == "create"
    assert event.actor == carol
    assert event.source == AuditSource.CONSOLE
    assert Decimal(event.changes["input_per_mtok"][1]) == 3


def test_a_price_without_a_time_takes_effect_now(carol: User, models) -> None:
    before = timezone.now()
    response = signed_in(carol).post(
        reverse("console:prices"),
        {"model": models[1].pk, "input_per_mtok": "1", "output_per_mtok": "2"},
    )
    assert response.status_code == 302
    price = ModelPrice.objects.get(model=models[1])
    assert before <= price.effective_from <= timezone.now()


def test_a_refused_price_shows_errors_beside_the_fields_and_adds_nothing(
    carol: User, models
) -> None:
    response = signed_in(carol).post(
        reverse("console:prices"),
        {"model": models[1].pk, "input_per_mtok": "-1", "output_per_mtok": "abc"},
    )
    assert response.status_code == 400
    page = text(response)
    assert "A price cannot be negative." in page
    assert page.count('class="errorlist"') == 2
    assert ModelPrice.objects.count() == 3
    assert AuditEvent.objects.filter(object_type="modelprice").count() == 3  # the fixture's


def test_a_new_price_changes_the_next_calls_cost_and_not_an_earlier_record(
    gateway: Gateway, carol: User
) -> None:
    model = CatalogModel.objects.get(name="gpt-fake")
    do_set_price(model=model, input_price=Decimal(1), output_price=Decimal(2))
    gateway.fake.script(Reply(text="a", input_tokens=1_000_000, output_tokens=1_000_000))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    [first] = gateway.wait_records(1)
    assert first.cost == Decimal(3)

    response = signed_in(carol).post(
        reverse("console:price_history", args=["gpt-fake"]),
        {"input_per_mtok": "10", "output_per_mtok": "20"},
    )
    assert response.status_code == 302
    gateway.fake.script(Reply(text="b", input_tokens=1_000_000, output_tokens=1_000_000))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    first_again, second = gateway.wait_records(2)

    assert second.cost == Decimal(30)
    assert first_again.cost == Decimal(3)  # a usage record keeps its cost


def test_the_price_pages_are_translated(carol: User, models) -> None:
    client = signed_in(carol)
    client.cookies["django_language"] = "zh-hans"
    page = text(client.get(reverse("console:prices")))
    assert "未定价的已启用模型" in page
    assert "添加价格" in page
