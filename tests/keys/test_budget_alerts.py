"""Budget alerts: crossing a soft threshold records one notification per threshold per period,
shown in the console (admins and finance: all; a member: their own keys') and emailed
when EMAIL_URL is set."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from django.urls import reverse
from django.utils import translation

from accounts.models import AuditEvent, User
from chatapp.celery import app as celery_app
from chatapp.environ import Env
from chatapp.models import CatalogModel
from keys import alerts, ledger
from keys.actions import (
    KeyActionError,
    do_create_key,
    do_set_alert_thresholds,
    do_set_limits,
    do_set_price,
)
from keys.models import AlertThresholds, ApiKey, BudgetAlert
from tests.conftest import make_user
from tests.fake_upstream import Reply
from tests.gateway import Gateway

USER = [{"role": "user", "content": "hi"}]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _english_afterwards() -> Iterator[None]:
    """A request in Chinese leaves its language active in this thread: reset it."""
    yield
    translation.deactivate()


@pytest.fixture
def email_on(settings) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """EMAIL_URL set (Django's test runner already uses the locmem backend); tasks inline.

    With Redis the tasks would go to a Celery worker, which the tests do not run.
    """
    settings.SWITCHBOARD_EMAIL = True
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def ask(gateway: Gateway, input_tokens: int) -> None:
    """One request through the relay costing input_tokens / 1M (the model's price is 1 per 1M)."""
    count = len(gateway.records())
    gateway.fake.script(Reply(text="ok", input_tokens=input_tokens, output_tokens=0))
    gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    assert len(gateway.wait_records(count + 1)) == count + 1


@pytest.fixture
def budgeted(gateway: Gateway) -> ApiKey:
    """The gateway's key (alice's) with a money budget of 1 USD a month, alerts at 80 %."""
    do_set_price(
        model=CatalogModel.objects.get(name="gpt-fake"),
        input_price=Decimal(1),
        output_price=Decimal(0),
    )
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    do_set_limits(key=key, money_budget=Decimal(1), budget_period="monthly")
    do_set_alert_thresholds(key=key, percents=[80])
    return key


def test_crossing_80_percent_records_one_alert_and_emails_admins_finance_and_owner(
    gateway: Gateway, budgeted: ApiKey, carol: User, frank: User, bob: User, email_on: None
) -> None:
    # Given a key at 70 % of its money budget: nothing yet.
    ask(gateway, 700_000)
    assert not BudgetAlert.objects.exists()
    assert mail.outbox == []

    # When a request takes it to 80 %...
    ask(gateway, 100_000)

    # ...one alert is recorded, and one email goes to each admin, finance person and the owner.
    [alert] = BudgetAlert.objects.all()
    assert (alert.key, alert.user, alert.kind, alert.threshold) == (
        budgeted,
        gateway.user,
        "money",
        80,
    )
    assert (alert.spent, alert.budget) == (Decimal("0.8"), Decimal(1))
    assert alert.emailed_at is not None
    assert sorted(message.to[0] for message in mail.outbox) == [
        "alice@example.com",
        "carol@example.com",
        "frank@example.com",
    ]
    assert all(len(message.to) == 1 for message in mail.outbox)  # nobody sees the others
    message = mail.outbox[0]
    assert f"Key {budgeted.prefix}… passed 80% of its money budget" in message.subject
    assert "has used 0.8 USD of its money budget of 1 USD" in message.body

    # When it crosses again in the same period (85 %, then 95 %): nothing more.
    ask(gateway, 50_000)
    ask(gateway, 100_000)
    assert BudgetAlert.objects.count() == 1
    assert len(mail.outbox) == 3


def test_without_email_url_an_alert_is_recorded_and_nobody_is_emailed(
    gateway: Gateway, budgeted: ApiKey, carol: User
) -> None:
    ask(gateway, 900_000)
    [alert] = BudgetAlert.objects.all()
    assert alert.threshold == 80
    assert alert.emailed_at is None
    assert mail.outbox == []


def test_a_token_budget_alerts_too(gateway: Gateway, email_on: None) -> None:
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    do_set_limits(key=key, token_budget=1_000_000, budget_period="daily")
    do_set_alert_thresholds(key=key, percents=[50, 90])
    ask(gateway, 950_000)  # crosses both at once: one alert (and email) for each
    assert sorted(BudgetAlert.objects.values_list("kind", "threshold")) == [
        ("tokens", 50),
        ("tokens", 90),
    ]
    assert len(mail.outbox) == 2  # alice only: no admin or finance in this test


# --- Periods and races, through the ledger writer itself ---


def record(key: ApiKey, when: datetime, cost: str) -> dict[str, object]:
    return {
        "created_at": when,
        "request_id": f"req_{uuid.uuid4().hex}",
        "user_id": key.user_id,
        "key_id": key.pk,
        "endpoint": "chat.completions",
        "dialect": "openai",
        "model": "gpt-fake",
        "status": "ok",
        "input_tokens": 10,
        "output_tokens": 10,
        "cost": Decimal(cost),
        "priced": True,
    }


def write(*records: dict[str, object]) -> None:
    for each in records:
        ledger.submit(each)
    assert ledger.flush(10)


@pytest.fixture
def monthly_key(transactional_db: None) -> ApiKey:
    owner = make_user("dora@example.com")
    key, _raw = do_create_key(
        user=owner, name="monthly", limits={"money_budget": Decimal(10), "budget_period": "monthly"}
    )
    do_set_alert_thresholds(user=owner, percents=[80])
    return key


def test_a_new_period_fires_again(monthly_key: ApiKey, email_on: None) -> None:
    write(record(monthly_key, datetime(2026, 11, 20, tzinfo=UTC), "8.5"))
    write(record(monthly_key, datetime(2026, 11, 25, tzinfo=UTC), "1"))  # 95 %: same period
    assert BudgetAlert.objects.count() == 1
    write(record(monthly_key, datetime(2026, 12, 2, tzinfo=UTC), "7.9"))  # 79 % of December
    assert BudgetAlert.objects.count() == 1
    write(record(monthly_key, datetime(2026, 12, 3, tzinfo=UTC), "0.1"))  # 80 %
    november, december = BudgetAlert.objects.order_by("period_start")
    assert (november.period_start, december.period_start) == (
        datetime(2026, 11, 1, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC),
    )
    assert (november.spent, december.spent) == (Decimal("8.5"), Decimal(8))
    assert len(mail.outbox) == 2  # dora's two: one per period


def test_the_same_crossing_seen_twice_records_and_emails_once(
    monthly_key: ApiKey, email_on: None
) -> None:
    crossing = [record(monthly_key, datetime(2026, 11, 20, tzinfo=UTC), "9")]
    write(*crossing)
    # Another worker checking the same records (or a replayed journal) finds it done.
    assert alerts.check(crossing) == []
    # Even past the "already fired" read, the unique constraint keeps one row.
    assert (
        alerts._record(
            key=monthly_key,
            kind="money",
            period_start=datetime(2026, 11, 1, tzinfo=UTC),
            threshold=80,
            budget=Decimal(10),
            spent=Decimal(9),
        )
        is None
    )
    assert BudgetAlert.objects.count() == 1
    assert alerts.send_alert_emails(BudgetAlert.objects.get().pk) == 0  # a redelivered task
    assert len(mail.outbox) == 1


def test_a_keys_own_thresholds_win_over_its_owners(monthly_key: ApiKey) -> None:
    other, _raw = do_create_key(
        user=monthly_key.user,
        name="other",
        limits={"money_budget": Decimal(10), "budget_period": "monthly"},
    )
    do_set_alert_thresholds(key=other, percents=[95])
    when = datetime(2026, 11, 20, tzinfo=UTC)
    write(record(monthly_key, when, "8.5"), record(other, when, "8.5"))  # 85 % each
    assert list(BudgetAlert.objects.values_list("key_id", "threshold")) == [(monthly_key.pk, 80)]


# --- The console ---


@pytest.fixture
def two_alerts(db, alice: User, bob: User) -> tuple[BudgetAlert, BudgetAlert]:
    made = []
    for owner in (alice, bob):
        key, _raw = do_create_key(user=owner, name=f"{owner.email} key")
        made.append(
            BudgetAlert.objects.create(
                key=key,
                user=owner,
                kind="money",
                period="monthly",
                period_start=datetime(2026, 11, 1, tzinfo=UTC),
                threshold=80,
                budget=Decimal(10),
                spent=Decimal("8.25"),
            )
        )
    return made[0], made[1]


def test_a_member_sees_only_their_own_keys_alerts(
    two_alerts: tuple[BudgetAlert, BudgetAlert], alice: User, frank: User, carol: User
) -> None:
    mine, bobs = two_alerts
    page = signed_in(alice).get(reverse("console:alerts")).content.decode()
    assert mine.key.prefix in page
    assert bobs.key.prefix not in page
    assert "8.25 / 10 USD" in page
    other_key = signed_in(alice).get(reverse("console:alerts") + f"?key={bobs.key_id}")
    assert bobs.key.prefix not in other_key.content.decode()
    for staff in (frank, carol):
        page = signed_in(staff).get(reverse("console:alerts")).content.decode()
        assert mine.key.prefix in page
        assert bobs.key.prefix in page
        assert "bob@example.com" in page


def test_the_navigation_offers_alerts_to_everyone(alice: User) -> None:
    page = signed_in(alice).get(reverse("console:keys")).content.decode()
    assert f'href="{reverse("console:alerts")}"' in page


def test_finance_cannot_change_thresholds(alice: User, frank: User) -> None:
    key, _raw = do_create_key(user=alice, name="k", limits={"money_budget": Decimal(5)})
    client = signed_in(frank)
    refused = client.post(
        reverse("console:user_alert_thresholds", args=[alice.pk]), {"percents": "50"}
    )
    assert refused.status_code == 403
    edit = client.post(reverse("console:key_edit", args=[key.pk]), {"alert_thresholds": "50"})
    assert edit.status_code == 403
    assert not AlertThresholds.objects.exists()
    assert not AuditEvent.objects.filter(object_type="alertthresholds").exists()


def test_a_member_cannot_change_thresholds(alice: User) -> None:
    response = signed_in(alice).post(
        reverse("console:user_alert_thresholds", args=[alice.pk]), {"percents": "50"}
    )
    assert response.status_code == 403
    assert not AlertThresholds.objects.exists()


def test_an_admin_sets_a_users_and_a_keys_thresholds(alice: User, carol: User) -> None:
    client = signed_in(carol)
    response = client.post(
        reverse("console:user_alert_thresholds", args=[alice.pk]), {"percents": "95, 80%, 80"}
    )
    assert response.status_code == 302
    assert AlertThresholds.objects.get(user=alice).percents == [80, 95]
    assert AuditEvent.objects.get(object_type="alertthresholds").action == "create"
    policy_page = client.get(reverse("console:key_policy", args=[alice.pk])).content.decode()
    assert 'value="80, 95"' in policy_page

    refused = client.post(
        reverse("console:user_alert_thresholds", args=[alice.pk]), {"percents": "120"}
    )
    assert refused.status_code == 400
    assert "120 is not a whole percentage from 1 to 100." in refused.content.decode()
    assert AlertThresholds.objects.get(user=alice).percents == [80, 95]

    # A new key with thresholds of its own, then an edit of them.
    created = client.post(
        reverse("console:key_create"),
        {"user": "alice@example.com", "name": "ci", "budget_period": "monthly",
         "money_budget": "20", "alert_thresholds": "90"},
    )  # fmt: skip
    assert created.status_code == 201
    key = ApiKey.objects.get(name="ci")
    assert AlertThresholds.objects.get(key=key).percents == [90]
    detail = client.get(reverse("console:key", args=[key.pk])).content.decode()
    assert "90%" in detail
    edit_page = client.get(reverse("console:key_edit", args=[key.pk])).content.decode()
    assert 'value="90"' in edit_page
    form = {"name": "ci", "enabled": "on", "budget_period": "monthly", "money_budget": "20"}
    saved = client.post(
        reverse("console:key_edit", args=[key.pk]), form | {"alert_thresholds": "60, 70"}
    )
    assert saved.status_code == 302
    assert AlertThresholds.objects.get(key=key).percents == [60, 70]


def test_thresholds_are_checked_in_one_place(alice: User) -> None:
    with pytest.raises(KeyActionError, match="At most 5 thresholds"):
        do_set_alert_thresholds(user=alice, percents="10,20,30,40,50,60")
    with pytest.raises(KeyActionError, match="either a key or a user"):
        do_set_alert_thresholds(percents=[80])


def test_the_alerts_page_is_translated(
    two_alerts: tuple[BudgetAlert, BudgetAlert], carol: User
) -> None:
    client = signed_in(carol)
    client.cookies["django_language"] = "zh-hans"
    page = client.get(reverse("console:alerts")).content.decode()
    assert "预算提醒" in page


# --- EMAIL_URL ---


def test_email_url_becomes_djangos_email_settings() -> None:
    parsed = Env({"EMAIL_URL": "smtp://ops%40example.com:p%3Ass@mail.example.com/?tls=1"}).email(
        "EMAIL_URL"
    )
    assert parsed == {
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "EMAIL_HOST": "mail.example.com",
        "EMAIL_PORT": 587,
        "EMAIL_HOST_USER": "ops@example.com",
        "EMAIL_HOST_PASSWORD": "p:ss",
        "EMAIL_USE_TLS": True,
        "EMAIL_USE_SSL": False,
        "EMAIL_TIMEOUT": 10,
    }
    implicit = Env({"EMAIL_URL": "smtps://mail.example.com:2465?timeout=3"}).email("EMAIL_URL")
    assert implicit is not None
    assert (implicit["EMAIL_PORT"], implicit["EMAIL_USE_SSL"], implicit["EMAIL_TIMEOUT"]) == (
        2465,
        True,
        3,
    )
    assert Env({}).email("EMAIL_URL") is None


@pytest.mark.parametrize(
    "value",
    [
        "http://mail.example.com",
        "smtp://",
        "smtp://mail.example.com:port",
        "smtp://mail.example.com/inbox",
        "smtp://mail.example.com/?tls=maybe",
        "smtp://mail.example.com/?starttls=1",
        "smtps://mail.example.com/?tls=1",
        "smtp://mail.example.com/?timeout=0",
    ],
)
def test_a_bad_email_url_is_refused(value: str) -> None:
    with pytest.raises(ImproperlyConfigured, match="EMAIL_URL"):
        Env({"EMAIL_URL": value}).email("EMAIL_URL")


def test_a_bad_email_url_stops_the_process_with_one_line() -> None:
    environ = {**os.environ, "EMAIL_URL": "smtp://mail.example.com/?tls=maybe"}
    environ.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "switchboard: configuration error: EMAIL_URL: tls='maybe' is not a boolean (1 or 0)"
    ]
