"""The role is the one source of truth: the superuser flag (the Django admin) follows it.

Issue 18: a user given the role "Admin" in the Django admin's form was an admin
nowhere.  Whatever way the role is set, the admin site and the console agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
from django.apps import apps
from django.core.management import call_command
from django.db import connection
from django.test import Client

from accounts.actions import do_set_role
from accounts.models import AuditEvent, Role, User
from tests.conftest import make_user

pytestmark = pytest.mark.django_db


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def via_console(carol: User, user: User, role: str) -> None:
    response = signed_in(carol).post(f"/console/users/{user.pk}/role/", {"role": role})
    assert response.status_code == 302


def via_django_admin(carol: User, user: User, role: str) -> None:
    response = signed_in(carol).post(
        f"/admin/accounts/user/{user.pk}/change/",
        {"email": user.email, "name": user.name, "role": role, "is_active": "on"},
    )
    assert response.status_code == 302, response.content.decode()[:2000]


def via_command(carol: User, user: User, role: str) -> None:
    call_command("user", "role", user.email, role)


def via_action(carol: User, user: User, role: str) -> None:
    do_set_role(user=user, role=role)


def via_shell(carol: User, user: User, role: str) -> None:
    user.role = role
    user.save()


WAYS: list[Callable[[User, User, str], None]] = [
    via_console,
    via_django_admin,
    via_command,
    via_action,
    via_shell,
]


def rights(user: User) -> tuple[bool, bool, bool]:
    """(superuser flag, reaches the Django admin, reaches the console's audit log)."""
    user.refresh_from_db()
    client = signed_in(user)
    return (
        user.is_superuser,
        client.get("/admin/").status_code == 200,
        client.get("/console/audit/").status_code == 200,
    )


@pytest.mark.parametrize("way", WAYS, ids=lambda way: way.__name__)
def test_the_role_alone_decides_admin_rights(way, carol: User, alice: User) -> None:
    assert rights(alice) == (False, False, False)

    way(carol, alice, Role.ADMIN)
    assert rights(alice) == (True, True, True)

    way(carol, alice, Role.FINANCE)
    assert rights(alice) == (False, False, False)
    assert signed_in(alice).get("/console/users/").status_code == 200  # finance reads users


def test_the_django_admin_records_its_changes_in_the_audit_log(carol: User, alice: User) -> None:
    via_django_admin(carol, alice, Role.ADMIN)
    event = AuditEvent.objects.get()
    assert (event.action, event.source, event.actor) == ("change", "admin", carol)
    assert event.changes == {"role": ["member", "admin"], "is_superuser": [False, True]}


def test_a_user_created_in_the_django_admin_as_admin_is_a_superuser(carol: User) -> None:
    response = signed_in(carol).post(
        "/admin/accounts/user/add/",
        {
            "email": "dora@example.com",
            "role": "admin",
            "password1": "a long fresh password 7",
            "password2": "a long fresh password 7",
            "usable_password": "true",
        },
    )
    assert response.status_code == 302, response.content.decode()[:3000]
    dora = User.objects.get(email="dora@example.com")
    assert dora.is_superuser
    event = AuditEvent.objects.get(action="create")
    assert event.changes["password"] == [None, "••••••"]
    assert "a long fresh password" not in str(event.changes)


def test_no_way_to_be_a_superuser_without_the_admin_role(db) -> None:
    user = User.objects.create_user("eve@example.com", "x", role=Role.MEMBER, is_superuser=True)
    assert not user.is_superuser
    boss = User.objects.create_superuser("boss@example.com", "x", role=Role.MEMBER)
    assert (boss.role, boss.is_superuser) == (Role.ADMIN, True)


def test_the_command_line_creates_admins_as_superusers(db) -> None:
    call_command("user", "add", "root@example.com", "--role=admin", "--password=a fine long one 3")
    assert User.objects.get(email="root@example.com").is_superuser
    assert AuditEvent.objects.get().source == "command"


def test_the_migration_aligns_existing_rows(db) -> None:
    admin = make_user("a@example.com", Role.ADMIN)
    member = make_user("m@example.com")
    # Rows as the old code left them: flags out of step with the role
    User.objects.filter(pk=admin.pk).update(is_superuser=False)
    User.objects.filter(pk=member.pk).update(is_superuser=True)

    migration = importlib.import_module("accounts.migrations.0003_user_role_is_the_source_of_truth")
    migration.superuser_follows_role(apps, connection.schema_editor())

    assert User.objects.get(pk=admin.pk).is_superuser
    assert not User.objects.get(pk=member.pk).is_superuser
