"""``manage.py bootstrap`` migrates and creates the first admin, once."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from accounts.models import Role, User

pytestmark = pytest.mark.django_db


def bootstrap() -> str:
    out = StringIO()
    call_command("bootstrap", stdout=out)
    return out.getvalue()


def test_bootstrap_creates_the_admin_from_the_environment_then_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, client
) -> None:
    monkeypatch.setenv("SWITCHBOARD_ADMIN_EMAIL", "root@example.com")
    monkeypatch.setenv("SWITCHBOARD_ADMIN_PASSWORD", "a long admin passphrase")

    first = bootstrap()
    assert "Created the first admin: root@example.com" in first
    assert "Generated password" not in first
    admin = User.objects.get()
    assert admin.role == Role.ADMIN
    assert admin.is_superuser
    assert client.login(username="root@example.com", password="a long admin passphrase")

    second = bootstrap()
    assert "admin root@example.com already exists. Nothing changed." in second
    assert User.objects.count() == 1


def test_bootstrap_generates_a_password_and_prints_it_once(
    monkeypatch: pytest.MonkeyPatch, client
) -> None:
    monkeypatch.delenv("SWITCHBOARD_ADMIN_EMAIL", raising=False)
    monkeypatch.delenv("SWITCHBOARD_ADMIN_PASSWORD", raising=False)
    output = bootstrap()
    line = next(line for line in output.splitlines() if line.startswith("Generated password"))
    password = line.rsplit(" ", 1)[-1]
    assert len(password) >= 20
    assert client.login(username="admin@example.com", password=password)
    assert password not in bootstrap()
