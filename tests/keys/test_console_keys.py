"""The console's API-key pages: list, key page, create, edit, revoke, rotate, policies."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import openai
import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone, translation

from accounts.models import AuditEvent, AuditSource, User
from chatapp.models import CatalogModel
from keys.actions import do_create_key, do_get_web_key, do_set_policy
from keys.models import ApiKey, KeyPolicy, hash_key
from tests.gateway import Gateway

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _english_afterwards() -> Iterator[None]:
    """A request in Chinese leaves its language active in this thread: reset it."""
    yield
    translation.deactivate()


RAW_KEY = re.compile(r"sk-[A-Za-z0-9]{48}")
USER = [{"role": "user", "content": "hi"}]


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def text(response) -> str:  # type: ignore[no-untyped-def]
    return response.content.decode()


def new_key(user: User, **fields: object) -> ApiKey:
    key, _raw = do_create_key(user=user, **fields)  # type: ignore[arg-type]
    return key


# --- the list ---


def test_members_see_only_their_own_keys(alice: User, bob: User) -> None:
    mine = new_key(alice, name="alice-laptop")
    new_key(bob, name="bob-server")

    page = text(signed_in(alice).get(reverse("console:keys")))

    assert "alice-laptop" in page
    assert mine.prefix in page
    assert "bob-server" not in page


def test_admins_and_finance_see_every_key_and_never_a_secret(
    alice: User, bob: User, carol: User, frank: User
) -> None:
    key, raw = do_create_key(user=alice, name="alice-laptop")
    new_key(bob, name="bob-server")

    for viewer in (carol, frank):
        page = text(signed_in(viewer).get(reverse("console:keys")))
        assert "alice-laptop" in page
        assert "bob-server" in page
        assert "alice@example.com" in page
        assert raw not in page
        assert key.key_hash not in page


def test_the_list_filters_by_user_status_model_and_expiry(
    alice: User, bob: User, carol: User
) -> None:
    CatalogModel.objects.create(name="gpt-a")
    CatalogModel.objects.create(name="gpt-b")
    only_a = new_key(alice, name="only-a", models=["gpt-a"])
    only_b = new_key(alice, name="only-b", models=["gpt-b"])
    soon = new_key(bob, name="soon", expires_at=timezone.now() + timedelta(days=2))
    later = new_key(bob, name="later", expires_at=timezone.now() + timedelta(days=40))
    revoked = new_key(bob, name="gone")
    revoked.revoked_at = timezone.now()
    revoked.save()
    client = signed_in(carol)

    def names(**params: str) -> set[str]:
        response = client.get(reverse("console:keys"), params)
        assert response.status_code == 200
        shown = {key.name for key in ApiKey.objects.all() if f">{key.name}<" in text(response)}
        return shown

    assert names(user="alice") == {"only-a", "only-b"}
    assert names(status="revoked") == {"gone"}
    assert names(status="active") == {"only-a", "only-b", "soon", "later"}
    # A key listing no model may use every model.
    assert names(model="gpt-a") == {"only-a", "soon", "later", "gone"}
    assert names(expiring="7") == {"soon"}
    assert {only_a.name, only_b.name, soon.name, later.name} <= names()


def test_the_list_pages_by_keyset_and_htmx_gets_only_the_rows(alice: User, carol: User) -> None:
    ApiKey.objects.bulk_create(
        ApiKey(user=alice, name=f"k{i}", prefix=f"sk-{i:09d}", key_hash=hash_key(str(i)))
        for i in range(60)
    )
    client = signed_in(carol)

    first = text(client.get(reverse("console:keys")))
    assert ">k59<" in first
    assert ">k10<" in first
    assert ">k9<" not in first
    next_url = re.search(r'href="(\?after=\d+)"', first)
    assert next_url is not None
    second = client.get(
        reverse("console:keys") + next_url.group(1).replace("&amp;", "&"),
        headers={"HX-Request": "true", "HX-Target": "key-rows"},
    )
    body = text(second)
    assert ">k9<" in body
    assert ">k0<" in body
    assert ">k59<" not in body
    assert "<html" not in body  # only the rows partial


def test_the_list_stays_fast_with_many_keys(
    alice: User, carol: User, django_assert_max_num_queries
) -> None:
    ApiKey.objects.bulk_create(
        ApiKey(user=alice, name=f"k{i}", prefix=f"sk-{i:09d}", key_hash=hash_key(str(i)))
        for i in range(300)
    )
    client = signed_in(carol)
    with django_assert_max_num_queries(12):
        client.get(reverse("console:keys"), {"user": "alice", "status": "active"})


def test_the_list_shows_ask_an_admin_when_members_keys_are_off(alice: User, settings) -> None:
    settings.SWITCHBOARD_MEMBER_KEYS = False
    page = text(signed_in(alice).get(reverse("console:keys")))
    assert "Ask an admin for a key" in page
    assert reverse("console:key_create") not in page
    assert signed_in(alice).get(reverse("console:key_create")).status_code == 403


def test_anonymous_visitors_are_sent_to_sign_in(client: Client) -> None:
    response = client.get(reverse("console:keys"))
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]


# --- the key page ---


def test_the_key_page_shows_use_against_every_limit_as_gauges(alice: User) -> None:
    key = new_key(alice, name="laptop")
    key.rpm, key.tpd, key.money_budget = 10, 5000, Decimal("2.5")
    key.save()

    page = text(signed_in(alice).get(reverse("console:key", args=[key.pk])))

    assert page.count("<meter") == 7
    assert 'max="10"' in page
    assert 'max="5000"' in page
    assert 'max="2.5"' in page
    assert "Requests this minute" in page
    assert "Money budget spent" in page
    assert "resets" in page
    assert "Only an admin can change these." in page
    assert reverse("console:key_edit", args=[key.pk]) not in page


def test_members_get_404_for_other_peoples_keys(alice: User, bob: User) -> None:
    key = new_key(bob)
    client = signed_in(alice)

    assert client.get(reverse("console:key", args=[key.pk])).status_code == 404
    assert client.post(reverse("console:key_revoke", args=[key.pk])).status_code == 404
    assert client.post(reverse("console:key_rotate", args=[key.pk])).status_code == 404
    assert client.get(reverse("console:key", args=[999999])).status_code == 404
    key.refresh_from_db()
    assert key.revoked_at is None


def test_finance_reads_but_changes_nothing(alice: User, frank: User) -> None:
    key = new_key(alice)
    client = signed_in(frank)

    page = text(client.get(reverse("console:key", args=[key.pk])))
    assert "<meter" in page
    for name in ("console:key_edit", "console:key_rotate", "console:key_revoke"):
        assert reverse(name, args=[key.pk]) not in page
    assert reverse("console:key_create") not in text(client.get(reverse("console:keys")))
    assert client.post(reverse("console:key_revoke", args=[key.pk])).status_code == 403
    assert client.post(reverse("console:key_rotate", args=[key.pk])).status_code == 403
    assert client.post(reverse("console:key_edit", args=[key.pk]), {"rpm": 1}).status_code == 403
    assert client.post(reverse("console:key_create"), {"name": "x"}).status_code == 403
    assert client.post(reverse("console:key_policy", args=[alice.pk])).status_code == 403
    key.refresh_from_db()
    assert key.revoked_at is None
    assert ApiKey.objects.count() == 1


# --- create ---


def admin_create(client: Client, **fields: object):  # type: ignore[no-untyped-def]
    data = {"user": "alice@example.com", "name": "ci", "budget_period": "monthly", **fields}
    return client.post(reverse("console:key_create"), data)


def test_an_admin_creates_a_key_with_limits_and_sees_the_secret_once(
    alice: User, carol: User
) -> None:
    CatalogModel.objects.create(name="gpt-a")
    CatalogModel.objects.create(name="gpt-b")
    client = signed_in(carol)

    response = admin_create(
        client,
        user="Alice@Example.com",
        allowed_models=["gpt-b"],
        rpm="30",
        tpd="100000",
        concurrency="2",
        money_budget="12.50",
        budget_period="weekly",
        max_output_tokens="512",
        clamp_max_tokens="on",
        expires_at=(timezone.localtime() + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M"),
    )

    assert response.status_code == 201
    (raw,) = set(RAW_KEY.findall(text(response)))
    assert 'class="secret"' in text(response)
    assert 'data-copy="#new-secret"' in text(response)
    assert "no-store" in response["Cache-Control"]
    key = ApiKey.objects.get()
    assert key.key_hash == hash_key(raw)
    assert (key.user, key.name, key.allowed_models) == (alice, "ci", ["gpt-b"])
    assert (key.rpm, key.tpd, key.concurrency, key.max_output_tokens) == (30, 100000, 2, 512)
    assert (key.money_budget, key.budget_period, key.clamp_max_tokens) == (
        Decimal("12.5"),
        "weekly",
        True,
    )
    assert key.expires_at is not None
    # Never again: not on the key page, the list or anywhere else.
    for url in (reverse("console:key", args=[key.pk]), reverse("console:keys")):
        assert raw not in text(client.get(url))
    event = AuditEvent.objects.get(action="create", object_type="apikey")
    assert event.actor == carol
    assert event.source == AuditSource.CONSOLE
    assert raw not in str(event.changes)
    assert key.key_hash not in str(event.changes)


def test_a_refused_create_shows_errors_beside_the_fields_and_creates_nothing(
    carol: User, alice: User
) -> None:
    response = admin_create(
        signed_in(carol),
        user="nobody@example.com",
        rpm="-3",
        money_budget="99999999999",
        expires_at="2001-01-01T00:00",
        allowed_models=["no-such-model"],
    )

    assert response.status_code == 400
    page = text(response)
    assert page.count('class="errorlist"') >= 4
    assert "No user with this email address." in page
    assert "is in the past" in page
    assert "larger budgets cannot be counted exactly" in page
    assert ApiKey.objects.count() == 0
    assert not AuditEvent.objects.exists()


def test_a_member_creates_their_own_key_with_default_limits_within_their_caps(
    alice: User, carol: User, settings
) -> None:
    settings.SWITCHBOARD_KEY_DEFAULTS = {**settings.SWITCHBOARD_KEY_DEFAULTS, "rpm": 60, "tpm": 0}
    do_set_policy(user=alice, max_keys=1, rpm=20, tpm=1000)
    client = signed_in(alice)

    # A member cannot choose limits or another owner: those fields are ignored.
    response = client.post(
        reverse("console:key_create"), {"name": "mine", "user": "bob@example.com", "rpm": "999"}
    )

    assert response.status_code == 201
    key = ApiKey.objects.get()
    assert (key.user, key.rpm, key.tpm) == (alice, 20, 1000)
    again = client.post(reverse("console:key_create"), {"name": "second"})
    assert again.status_code == 400
    assert "You already have 1 usable key, your limit" in text(again)
    assert ApiKey.objects.count() == 1


def test_a_member_gets_five_keys_without_a_policy(alice: User) -> None:
    client = signed_in(alice)
    for number in range(5):
        assert client.post(reverse("console:key_create"), {"name": f"k{number}"}).status_code == 201
    assert client.post(reverse("console:key_create"), {"name": "k5"}).status_code == 400
    assert ApiKey.objects.filter(user=alice).count() == 5


def test_an_admin_sets_a_members_key_policy(alice: User, carol: User) -> None:
    client = signed_in(carol)
    listing = text(client.get(reverse("console:keys"), {"user": "alice@example.com"}))
    assert reverse("console:key_policy", args=[alice.pk]) in listing

    refused = client.post(
        reverse("console:key_policy", args=[alice.pk]), {"max_keys": "-1", "rpm": "x"}
    )
    assert refused.status_code == 400
    assert not KeyPolicy.objects.exists()

    saved = client.post(
        reverse("console:key_policy", args=[alice.pk]),
        {"max_keys": "2", "rpm": "10", "money_budget": "5"},
    )
    assert saved.status_code == 302
    policy = KeyPolicy.objects.get(user=alice)
    assert (policy.max_keys, policy.rpm, policy.money_budget) == (2, 10, Decimal(5))
    event = AuditEvent.objects.get(object_type="keypolicy")
    assert event.changes["rpm"] == [None, 10]


# --- edit ---


def test_an_admin_edits_limits_models_and_expiry(alice: User, carol: User) -> None:
    CatalogModel.objects.create(name="gpt-a")
    key = new_key(alice, name="laptop")
    client = signed_in(carol)
    form = text(client.get(reverse("console:key_edit", args=[key.pk])))
    assert 'name="rpm"' in form
    assert 'value="gpt-a"' in form

    response = client.post(
        reverse("console:key_edit", args=[key.pk]),
        {
            "name": "laptop",
            "enabled": "on",
            "allowed_models": ["gpt-a"],
            "rpm": "7",
            "token_budget": "1000",
            "budget_period": "daily",
            "expires_at": (timezone.localtime() + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M"),
        },
    )

    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.rpm, key.token_budget, key.budget_period) == (7, 1000, "daily")
    assert key.allowed_models == ["gpt-a"]
    assert key.expires_at is not None
    event = AuditEvent.objects.get(action="update")
    assert event.changes["rpm"][1] == 7
    assert event.changes["allowed_models"] == [[], ["gpt-a"]]


def test_a_refused_edit_changes_nothing(alice: User, carol: User) -> None:
    key = new_key(alice, name="laptop")
    before = (key.rpm, key.name, key.expires_at)

    response = signed_in(carol).post(
        reverse("console:key_edit", args=[key.pk]),
        {"name": "renamed", "rpm": "5", "tpm": "-1", "budget_period": "daily",
         "expires_at": "2001-01-01T00:00"},
    )  # fmt: skip

    assert response.status_code == 400
    assert "is in the past" in text(response)
    key.refresh_from_db()
    assert (key.rpm, key.name, key.expires_at) == before
    assert not AuditEvent.objects.filter(action="update").exists()


def test_members_cannot_open_the_edit_page(alice: User) -> None:
    key = new_key(alice)
    assert signed_in(alice).get(reverse("console:key_edit", args=[key.pk])).status_code == 403


# --- revoke and rotate, against the live gateway ---


def test_revoke_refuses_the_very_next_call(gateway: Gateway, carol: User) -> None:
    key = ApiKey.objects.get(user=gateway.user, name="tests")
    sdk = gateway.openai()
    assert sdk.chat.completions.create(model="gpt-fake", messages=USER).choices  # cached now

    page = text(signed_in(carol).get(reverse("console:key", args=[key.pk])))
    assert "data-confirm=" in page
    assert reverse("console:key_revoke", args=[key.pk]) in page
    response = signed_in(carol).post(reverse("console:key_revoke", args=[key.pk]))

    assert response.status_code == 302
    # The relay refuses a known but revoked key with 403 key_revoked (chatapp/relay/errors.py).
    with pytest.raises(openai.PermissionDeniedError) as refused:
        sdk.chat.completions.create(model="gpt-fake", messages=USER)
    assert refused.value.status_code == 403
    assert refused.value.code == "key_revoked"
    assert AuditEvent.objects.get(action="revoke").object_id == str(key.pk)


def test_a_member_revokes_their_own_key(alice: User) -> None:
    key = new_key(alice)
    response = signed_in(alice).post(reverse("console:key_revoke", args=[key.pk]))
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_the_chat_key_is_listed_but_cannot_be_revoked(alice: User, carol: User) -> None:
    web = do_get_web_key(user=alice)
    client = signed_in(alice)
    assert "Browser chat" in text(client.get(reverse("console:keys")))
    page = text(client.get(reverse("console:key", args=[web.pk])))
    assert reverse("console:key_revoke", args=[web.pk]) not in page

    for user in (alice, carol):
        refused = signed_in(user).post(reverse("console:key_revoke", args=[web.pk]))
        assert refused.status_code == 400
        assert "browser chat&#x27;s own key: it cannot be revoked" in text(refused)
    web.refresh_from_db()
    assert web.revoked_at is None
    # Made on first use of the chat, by no one's decision: not an audited change.
    assert not AuditEvent.objects.exists()


def test_members_cannot_revoke_when_member_keys_are_off(alice: User, settings) -> None:
    settings.SWITCHBOARD_MEMBER_KEYS = False
    key = new_key(alice)
    client = signed_in(alice)
    assert reverse("console:key_revoke", args=[key.pk]) not in text(
        client.get(reverse("console:key", args=[key.pk]))
    )
    assert client.post(reverse("console:key_revoke", args=[key.pk])).status_code == 403
    key.refresh_from_db()
    assert key.revoked_at is None


def test_rotate_with_grace_keeps_the_old_key_until_then(gateway: Gateway, carol: User) -> None:
    old = ApiKey.objects.get(user=gateway.user, name="tests")
    old.rpm, old.allowed_models = 50, ["gpt-fake"]
    old.save()
    client = signed_in(carol)
    assert "grace" in text(client.get(reverse("console:key_rotate", args=[old.pk])))

    response = client.post(reverse("console:key_rotate", args=[old.pk]), {"grace": "3600"})

    assert response.status_code == 201
    (raw,) = set(RAW_KEY.findall(text(response)))
    new = ApiKey.objects.get(key_hash=hash_key(raw))
    assert (new.name, new.rpm, new.allowed_models, new.user) == (
        "tests",
        50,
        ["gpt-fake"],
        gateway.user,
    )
    old.refresh_from_db()
    assert old.replaced_by == new
    assert old.revoked_at is None
    assert old.expires_at is not None
    assert timedelta(minutes=59) < old.expires_at - timezone.now() <= timedelta(hours=1)
    # During the grace period both keys work.
    assert gateway.openai().chat.completions.create(model="gpt-fake", messages=USER).choices
    assert gateway.openai(raw).chat.completions.create(model="gpt-fake", messages=USER).choices
    # Once it is over, the old one is refused and the new one still works.
    old.expires_at = timezone.now() - timedelta(seconds=1)
    old.save()
    with pytest.raises(openai.PermissionDeniedError, match="expired"):
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    assert gateway.openai(raw).chat.completions.create(model="gpt-fake", messages=USER).choices
    assert AuditEvent.objects.filter(action="rotate", object_id=str(old.pk)).exists()


def test_rotate_without_grace_revokes_the_old_key_at_once(gateway: Gateway, carol: User) -> None:
    old = ApiKey.objects.get(user=gateway.user, name="tests")
    response = signed_in(carol).post(reverse("console:key_rotate", args=[old.pk]), {"grace": "0"})
    (raw,) = set(RAW_KEY.findall(text(response)))
    with pytest.raises(openai.PermissionDeniedError, match="revoked"):
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
    assert gateway.openai(raw).chat.completions.create(model="gpt-fake", messages=USER).choices
    again = signed_in(carol).post(reverse("console:key_rotate", args=[old.pk]), {"grace": "0"})
    assert again.status_code == 400


def test_a_key_in_its_grace_period_cannot_be_rotated_again(alice: User, carol: User) -> None:
    key = new_key(alice)
    client = signed_in(carol)
    assert (
        client.post(reverse("console:key_rotate", args=[key.pk]), {"grace": "86400"}).status_code
        == 201
    )

    again = client.post(reverse("console:key_rotate", args=[key.pk]), {"grace": "0"})

    assert again.status_code == 400
    assert "already rotated" in text(again)
    assert ApiKey.objects.count() == 2
    key.refresh_from_db()
    assert key.revoked_at is None


# --- the audit log covers the command line too ---


def test_key_commands_are_audited_as_the_command_line(alice: User) -> None:
    call_command("key", "create", "--user", "alice@example.com", "--name", "cli", stdout=None)
    key = ApiKey.objects.get()
    call_command("key", "limits", str(key.pk), "--rpm", "9", stdout=None)
    call_command("key", "revoke", str(key.pk), stdout=None)

    events = list(AuditEvent.objects.order_by("id"))
    assert [event.action for event in events] == ["create", "update", "revoke"]
    assert {event.source for event in events} == {AuditSource.COMMAND}
    assert events[1].changes["rpm"] == [60, 9]
    assert all("key_hash" not in event.changes for event in events)


def test_the_chinese_console_is_translated(alice: User) -> None:
    client = signed_in(alice)
    client.cookies["django_language"] = "zh-hans"
    new_key(alice, name="laptop")
    page = text(client.get(reverse("console:keys")))
    assert "新建密钥" in page
    assert "API keys" not in page.split("<main", 1)[1]


def test_the_django_admin_is_audited_once_per_change(alice: User, carol: User) -> None:
    client = signed_in(carol)
    added = client.post(
        "/admin/keys/apikey/add/", {"user": alice.pk, "name": "from-admin", "allowed_models": "[]"}
    )
    assert added.status_code == 302
    key = ApiKey.objects.get()
    changed = client.post(
        f"/admin/keys/apikey/{key.pk}/change/",
        {"name": "renamed", "enabled": "on", "allowed_models": "[]", "rpm": "5",
         "budget_period": "monthly"},
    )  # fmt: skip
    assert changed.status_code == 302
    assert client.get("/admin/keys/keypolicy/add/").status_code == 200

    events = list(AuditEvent.objects.order_by("id"))
    assert [event.action for event in events] == ["create", "change"]
    assert {event.source for event in events} == {AuditSource.ADMIN}
    assert events[1].changes["name"] == ["from-admin", "renamed"]
