"""``manage.py user`` for scripted administration."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from accounts.models import AuditEvent, Role, User

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = StringIO()
    call_command("user", *args, stdout=out)
    return out.getvalue()


def test_user_add_creates_a_user_who_can_sign_in(client) -> None:
    assert run(
        "add", "Dora@Example.com", "--role", "finance", "--password", "a long passphrase"
    ) == ("created finance dora@example.com\n")
    dora = User.objects.get(email="dora@example.com")
    assert dora.role == Role.FINANCE
    assert client.login(username="dora@example.com", password="a long passphrase")


def test_user_add_refuses_duplicates_bad_emails_and_weak_passwords(alice: User) -> None:
    with pytest.raises(CommandError, match="already exists"):
        run("add", "ALICE@example.com")
    with pytest.raises(CommandError, match="is not a valid email address"):
        run("add", "not-an-email")
    with pytest.raises(CommandError, match="password rejected: This password is too short"):
        run("add", "eve@example.com", "--password", "abc")
    assert User.objects.count() == 1


def test_user_list_json(alice: User, frank: User) -> None:
    rows = json.loads(run("list", "--json"))
    assert [(row["email"], row["role"], row["active"]) for row in rows] == [
        ("alice@example.com", "member", True),
        ("frank@example.com", "finance", True),
    ]


def test_user_disable_stops_sign_in(client, alice: User) -> None:
    assert run("disable", "alice@example.com") == "disabled alice@example.com\n"
    alice.refresh_from_db()
    assert not alice.is_active
    assert "alice@example.com\tmember\tdisabled" in run("list")
    with pytest.raises(CommandError, match="no user with email nobody@example.com"):
        run("disable", "nobody@example.com")


def test_user_role_and_password_link_use_the_consoles_actions(alice: User) -> None:
    assert run("role", "alice@example.com", "admin").strip() == "alice@example.com is now admin"
    alice.refresh_from_db()
    assert alice.is_superuser
    link = run("password-link", "alice@example.com", "--base-url=https://llm.example.com/").strip()
    assert link.startswith("https://llm.example.com/accounts/set-password/")
    events = list(AuditEvent.objects.order_by("id").values_list("action", "actor_label"))
    assert events == [("change role", "command line"), ("password link", "command line")]
