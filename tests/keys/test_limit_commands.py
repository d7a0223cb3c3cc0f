"""``manage.py price`` and ``manage.py key limits|usage``."""

from __future__ import annotations

import json
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from accounts.models import User
from chatapp.models import CatalogModel
from keys.models import ApiKey, ModelPrice

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def key(alice: User) -> ApiKey:
    return ApiKey.issue(user=alice, name="cli")[0]


def test_price_set_keeps_history_and_lists_newest_first(db) -> None:  # type: ignore[no-untyped-def]
    CatalogModel.objects.create(name="gpt-x")
    run("price", "set", "gpt-x", "--input", "0.15", "--output", "0.60", "--from", "2030-01-01")
    run(
        "price",
        "set",
        "gpt-x",
        "--input",
        "1.25",
        "--output",
        "10",
        "--cached-input",
        "0.125",
        "--from",
        "2031-01-01T00:00+08:00",
    )
    rows = json.loads(run("price", "list", "gpt-x", "--json"))
    assert [(row["input"], row["output"], row["cached_input"]) for row in rows] == [
        ("1.25", "10", "0.125"),
        ("0.15", "0.6", None),
    ]
    assert rows[0]["effective_from"] == "2030-12-31T16:00:00+00:00"
    assert rows[0]["currency"] == "USD"
    assert ModelPrice.objects.count() == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("price", "set", "nope", "--input", "1", "--output", "1"), "no model named 'nope'"),
        (
            ("price", "set", "gpt-x", "--input", "-1", "--output", "1"),
            "expected a price of at least 0",
        ),
        (
            ("price", "set", "gpt-x", "--input", "abc", "--output", "1"),
            "expected a price such as 0.15",
        ),
    ],
)
def test_price_set_refuses_bad_input(db, args: tuple[str, ...], message: str) -> None:  # type: ignore[no-untyped-def]
    CatalogModel.objects.create(name="gpt-x")
    with pytest.raises(CommandError, match=message):
        run(*args)


def test_key_limits_sets_and_clears(key: ApiKey) -> None:
    output = run(
        "key",
        "limits",
        key.prefix,
        "--rpm",
        "30",
        "--tpd",
        "100000",
        "--money-budget",
        "12.50",
        "--period",
        "weekly",
        "--max-output",
        "512",
        "--clamp",
        "--json",
    )
    limits = json.loads(output)["limits"]
    assert (limits["rpm"], limits["tpd"], limits["money_budget"], limits["period"], limits["max_output"], limits["clamp"]) == (
        30, 100000, "12.5", "weekly", 512, True,
    )  # fmt: skip
    key.refresh_from_db()
    assert key.money_budget == Decimal("12.5")
    run("key", "limits", str(key.pk), "--rpm", "none", "--money-budget", "0")
    key.refresh_from_db()
    assert (key.rpm, key.money_budget, key.tpd) == (None, None, 100000)


def test_key_limits_refuses_junk(key: ApiKey) -> None:
    with pytest.raises(CommandError, match="expected a whole number, 0 or none"):
        run("key", "limits", key.prefix, "--rpm", "lots")
    with pytest.raises(CommandError, match="money_budget: At most 9,000,000 USD"):
        run("key", "limits", key.prefix, "--money-budget", "10000000")
    with pytest.raises(CommandError, match="no key with id 999"):
        run("key", "limits", "999", "--rpm", "1")


def test_key_usage_reports_every_limit(key: ApiKey) -> None:
    run(
        "key",
        "limits",
        key.prefix,
        "--rpm",
        "10",
        "--token-budget",
        "5000",
        "--money-budget",
        "3",
        "--period",
        "daily",
    )
    report = json.loads(run("key", "usage", key.prefix, "--json"))
    assert report["rpm"] == {"limit": 10, "used": 0, "resets_at": report["rpm"]["resets_at"]}
    assert report["token_budget"]["limit"] == 5000
    assert report["token_budget"]["period"] == "daily"
    assert report["money_budget"]["limit"] == "3"
    assert report["money_budget"]["spent"] == "0"
    text = run("key", "usage", key.prefix)
    assert "rpm          0 / 10" in text
    if report["source"] == "redis":
        assert report["concurrency"] == {"limit": None, "in_flight": 0}
        assert "money_budget 0 USD spent + 0 reserved / 3" in text
    else:
        # Embedded: what is in flight only the server process knows.
        assert report["concurrency"] == {"limit": None, "in_flight": None}
        assert "money_budget 0 USD spent / 3" in text


def test_the_admin_shows_limits_and_prices(client, carol: User, key: ApiKey) -> None:  # type: ignore[no-untyped-def]
    client.force_login(carol)
    page = client.get(f"/admin/keys/apikey/{key.pk}/change/").content.decode()
    assert "Rate limits" in page
    assert 'name="money_budget"' in page
    CatalogModel.objects.create(name="gpt-x")
    response = client.post(
        "/admin/keys/modelprice/add/",
        {
            "model": CatalogModel.objects.get().pk,
            "input_per_mtok": "0.5",
            "output_per_mtok": "1.5",
            "effective_from_0": "2030-01-01",
            "effective_from_1": "00:00:00",
        },
    )
    assert response.status_code == 302
    assert ModelPrice.objects.get().currency == "USD"


def test_the_admin_applies_the_same_rules_as_the_commands(client, carol: User, key: ApiKey) -> None:  # type: ignore[no-untyped-def]
    # Given an admin editing a key in Django's admin...
    client.force_login(carol)
    form = {
        "name": key.name,
        "enabled": "on",
        "allowed_models": "[]",
        "budget_period": "monthly",
        "money_budget": "9000001",
    }
    # ...a money budget past the limiter's exact range is refused, as `key limits` refuses it.
    response = client.post(f"/admin/keys/apikey/{key.pk}/change/", form)
    assert response.status_code == 200
    assert "At most 9,000,000 USD" in response.content.decode()
    key.refresh_from_db()
    assert key.money_budget is None
    # And a negative price is refused there as `price set` refuses it.
    CatalogModel.objects.create(name="gpt-y")
    response = client.post(
        "/admin/keys/modelprice/add/",
        {
            "model": CatalogModel.objects.get(name="gpt-y").pk,
            "input_per_mtok": "-1",
            "output_per_mtok": "1",
            "effective_from_0": "2030-01-01",
            "effective_from_1": "00:00:00",
        },
    )
    assert response.status_code == 200
    assert "A price cannot be negative." in response.content.decode()
    assert not ModelPrice.objects.filter(model__name="gpt-y").exists()
