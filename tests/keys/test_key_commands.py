"""``manage.py key``, and API keys and usage in the admin."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from accounts.models import User
from chatapp.models import CatalogModel
from keys import auth
from keys.exceptions import KeyRefused
from keys.models import ApiKey, UsageRecord, hash_key

pytestmark = pytest.mark.django_db

RAW_KEY = re.compile(r"sk-[A-Za-z0-9]{48}")


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def create_json(*args: str) -> dict[str, Any]:
    return json.loads(run("key", "create", "--json", *args))


# --- key create ---


@pytest.mark.django_db(transaction=True)
def test_key_create_prints_the_full_key_once_and_it_authenticates(alice: User) -> None:
    output = run("key", "create", "--user", "Alice@Example.com", "--name", "laptop")

    (raw,) = RAW_KEY.findall(output)
    assert output.count(raw) == 1
    assert "shown only this once" in output
    key = ApiKey.objects.get()
    assert key.key_hash == hash_key(raw)
    assert raw not in key.key_hash
    assert (key.user, key.name, key.allowed_models, key.expires_at) == (alice, "laptop", [], None)
    principal = asyncio.run(auth.aauthenticate(raw))
    assert principal.user_id == alice.pk
    assert principal.user_email == "alice@example.com"


def test_key_create_json_has_the_key_and_its_fields(alice: User) -> None:
    CatalogModel.objects.create(name="gpt-4o")
    CatalogModel.objects.create(name="claude-sonnet-4-5")

    row = create_json(
        "--user=alice@example.com",
        "--name=ci",
        "--models",
        "gpt-4o, claude-sonnet-4-5,gpt-4o",
        "--expires=2099-01-31T18:00:00+08:00",
    )

    key = ApiKey.objects.get()
    assert row["id"] == key.pk
    assert row["prefix"] == key.prefix
    assert isinstance(row["key"], str)
    assert row["key"].startswith(key.prefix)
    assert hash_key(row["key"]) == key.key_hash
    assert row["name"] == "ci"
    assert row["user"] == "alice@example.com"
    assert row["models"] == ["claude-sonnet-4-5", "gpt-4o"]
    assert row["expires_at"] == "2099-01-31T10:00:00+00:00"
    assert row["state"] == "active"
    assert key.expires_at == datetime(2099, 1, 31, 10, tzinfo=UTC)


def test_key_create_reads_an_expiry_without_offset_in_the_configured_time_zone(
    alice: User, settings
) -> None:
    settings.TIME_ZONE = "Asia/Shanghai"

    create_json("--user=alice@example.com", "--expires=2099-06-01")
    create_json("--user=alice@example.com", "--expires=2099-06-01T09:30")

    later, earlier = ApiKey.objects.order_by("-expires_at")
    assert earlier.expires_at == datetime(2099, 5, 31, 16, tzinfo=UTC)
    assert later.expires_at == datetime(2099, 6, 1, 1, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user=nobody@example.com"], "^no user with email nobody@example.com$"),
        (["--models=gpt-4o,gpt-5,o9"], "^unknown models: gpt-5, o9$"),
        (["--models=gpt-5"], "^unknown model: gpt-5$"),
        (["--expires=2020-01-01"], r"^expires_at: 2020-01-01T00:00:00\+00:00 is in the past\.$"),
        (["--expires=next tuesday"], "^--expires 'next tuesday': expected an ISO-8601 date"),
    ],
)
def test_key_create_rejects_bad_input_in_one_line(
    alice: User, args: list[str], message: str
) -> None:
    CatalogModel.objects.create(name="gpt-4o")
    with pytest.raises(CommandError, match=message):
        run("key", "create", "--user=alice@example.com", *args)
    assert not ApiKey.objects.exists()


def test_key_create_refuses_a_disabled_user(alice: User) -> None:
    alice.is_active = False
    alice.save()
    with pytest.raises(CommandError, match="^user: alice@example.com is disabled.$"):
        run("key", "create", "--user=alice@example.com")


# --- key list ---


def test_key_list_shows_every_key_without_its_secret(alice: User, bob: User) -> None:
    alice_row = create_json("--user=alice@example.com", "--name=laptop")
    bob_row = create_json("--user=bob@example.com")
    revoked, _raw = ApiKey.issue(user=bob, name="old", revoked_at=timezone.now(), enabled=False)
    ApiKey.objects.filter(pk=alice_row["id"]).update(
        allowed_models=["gpt-4o"], last_used_at=timezone.now()
    )

    text = run("key", "list")
    rows = json.loads(run("key", "list", "--json"))

    lines = text.splitlines()
    assert len(lines) == 3
    alice_line = next(line for line in lines if line.startswith(f"{alice_row['id']}\t"))
    fields = alice_line.split("\t")
    assert fields[:6] == [
        str(alice_row["id"]),
        alice_row["prefix"],
        "laptop",
        "alice@example.com",
        "active",
        "gpt-4o",
    ]
    assert fields[6] == "no expiry"
    assert fields[7].startswith("created ")
    assert fields[8].startswith("last used ")
    assert any("\tbob@example.com\trevoked\tall models\t" in line for line in lines)
    assert {row["id"]: row["state"] for row in rows} == {
        alice_row["id"]: "active",
        bob_row["id"]: "active",
        revoked.pk: "revoked",
    }
    assert set(rows[0]) >= {
        "id",
        "prefix",
        "name",
        "user",
        "state",
        "models",
        "expires_at",
        "created_at",
        "last_used_at",
    }
    for output in (text, json.dumps(rows)):
        for key in ApiKey.objects.all():
            assert key.key_hash not in output
        assert alice_row["key"] not in output
        assert bob_row["key"] not in output


def test_key_list_filters_by_user(alice: User, bob: User) -> None:
    create_json("--user=alice@example.com")
    create_json("--user=bob@example.com")

    rows = json.loads(run("key", "list", "--user=bob@example.com", "--json"))

    assert [row["user"] for row in rows] == ["bob@example.com"]
    with pytest.raises(CommandError, match="^no user with email carol@example.com$"):
        run("key", "list", "--user=carol@example.com")


# --- key revoke ---


@pytest.mark.django_db(transaction=True)
def test_key_revoke_makes_the_key_fail_with_403(alice: User) -> None:
    row = create_json("--user=alice@example.com")
    raw = str(row["key"])
    asyncio.run(auth.aauthenticate(raw))  # authenticates, and now sits in the key cache

    output = run("key", "revoke", str(row["prefix"]))

    assert output.strip() == f"revoked key {row['id']} ({row['prefix']}…) of alice@example.com"
    assert ApiKey.objects.get().state == "revoked"
    with pytest.raises(KeyRefused) as error:
        asyncio.run(auth.aauthenticate(raw))
    assert error.value.reason == "revoked"


def test_key_revoke_by_id_says_when_the_key_was_already_revoked(alice: User) -> None:
    row = create_json("--user=alice@example.com")
    run("key", "revoke", str(row["id"]))
    revoked_at = ApiKey.objects.get().revoked_at
    assert revoked_at is not None

    output = run("key", "revoke", str(row["id"]))

    assert output.strip() == (
        f"key {row['id']} ({row['prefix']}…) was already revoked at {revoked_at.isoformat()}"
    )
    assert ApiKey.objects.get().revoked_at == revoked_at


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("sk-nosuchkey", "^no key with id or prefix 'sk-nosuchkey'$"),
        ("sk-", "^no key with id or prefix 'sk-'$"),
        ("424242", "^no key with id 424242$"),
    ],
)
def test_key_revoke_rejects_a_bad_prefix_or_id(alice: User, ref: str, message: str) -> None:
    create_json("--user=alice@example.com")
    with pytest.raises(CommandError, match=message):
        run("key", "revoke", ref)


def test_key_revoke_rejects_an_ambiguous_prefix(alice: User) -> None:
    for digest in ("a" * 64, "b" * 64):
        ApiKey.objects.create(user=alice, prefix=f"sk-same{digest[:5]}", key_hash=digest)
    with pytest.raises(CommandError, match="^prefix 'sk-same' is ambiguous$"):
        run("key", "revoke", "sk-same")
    assert ApiKey.objects.filter(revoked_at__isnull=True).count() == 2


# --- the admin ---


def test_admin_key_and_usage_pages_render(client, carol: User, alice: User) -> None:
    key, _raw = ApiKey.issue(user=alice, name="laptop")
    record = UsageRecord.objects.create(
        request_id="req-1",
        user=alice,
        key=key,
        endpoint="chat.completions",
        dialect="openai",
        model="gpt-4o",
        status="ok",
    )
    client.force_login(carol)

    assert client.get("/admin/keys/apikey/").status_code == 200
    assert client.get("/admin/keys/apikey/add/").status_code == 200
    change = client.get(f"/admin/keys/apikey/{key.pk}/change/")
    assert change.status_code == 200
    assert "laptop" in change.content.decode()
    assert client.get("/admin/keys/usagerecord/").status_code == 200
    assert client.get(f"/admin/keys/usagerecord/{record.pk}/change/").status_code == 200
    # The ledger is read-only.
    assert client.get("/admin/keys/usagerecord/add/").status_code == 403
    assert client.post(f"/admin/keys/usagerecord/{record.pk}/delete/").status_code == 403


def test_admin_add_form_issues_a_key_and_shows_it_once(client, carol: User, alice: User) -> None:
    CatalogModel.objects.create(name="gpt-4o")
    client.force_login(carol)

    response = client.post(
        "/admin/keys/apikey/add/",
        {"user": alice.pk, "name": "from admin", "allowed_models": '["gpt-4o"]'},
        follow=True,
    )

    assert response.status_code == 200
    shown = [str(message) for message in response.context["messages"]]
    (raw,) = RAW_KEY.findall(" ".join(shown))
    assert "shown only this once" in " ".join(shown)
    key = ApiKey.objects.get()
    assert key.key_hash == hash_key(raw)
    assert (key.user, key.name, key.allowed_models) == (alice, "from admin", ["gpt-4o"])
    assert response.content.decode().count(raw) == 1
    assert raw not in client.get("/admin/keys/apikey/").content.decode()
    assert raw not in client.get(f"/admin/keys/apikey/{key.pk}/change/").content.decode()


def test_admin_add_form_rejects_unknown_models_and_a_past_expiry(
    client, carol: User, alice: User
) -> None:
    client.force_login(carol)
    yesterday = timezone.localtime() - timedelta(days=1)

    response = client.post(
        "/admin/keys/apikey/add/",
        {
            "user": alice.pk,
            "allowed_models": '["gpt-5"]',
            "expires_at_0": yesterday.strftime("%Y-%m-%d"),
            "expires_at_1": yesterday.strftime("%H:%M:%S"),
        },
    )

    assert response.status_code == 200
    html = response.content.decode()
    assert "unknown model: gpt-5" in html
    assert "is in the past." in html
    assert not ApiKey.objects.exists()


def test_admin_revoke_action_revokes_the_selected_keys(client, carol: User, alice: User) -> None:
    first, _ = ApiKey.issue(user=alice)
    second, _ = ApiKey.issue(user=alice)
    client.force_login(carol)

    response = client.post(
        "/admin/keys/apikey/",
        {"action": "revoke_selected", "_selected_action": [first.pk]},
        follow=True,
    )

    assert response.status_code == 200
    assert "1 key revoked." in response.content.decode()
    first.refresh_from_db()
    second.refresh_from_db()
    assert first.state == "revoked"
    assert second.state == "active"
