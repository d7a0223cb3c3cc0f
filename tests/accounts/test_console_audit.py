"""The console's audit log page, and the audit log in the Django admin (read-only)."""

from __future__ import annotations

import datetime

import pytest
from django.core.management import call_command
from django.test import Client

from accounts.actions import do_set_active
from accounts.audit import Actor, acting, record
from accounts.models import AuditEvent, AuditSource, User

pytestmark = pytest.mark.django_db


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_it_lists_events_with_before_and_after_actor_source_and_address(
    carol: User, alice: User
) -> None:
    client = signed_in(carol)
    client.post(f"/console/users/{alice.pk}/role/", {"role": "finance"}, REMOTE_ADDR="203.0.113.9")
    call_command("user", "disable", "alice@example.com")

    response = client.get("/console/audit/")
    assert response.status_code == 200
    body = response.content.decode()
    rows = response.context["rows"]
    assert [row.event.action for row in rows] == ["disable", "change role"]
    assert ("role", "member", "finance") in rows[1].changes
    assert ("is_active", "yes", "no") in rows[0].changes
    assert "203.0.113.9" in body
    assert "carol@example.com" in body
    assert "command line" in body
    assert "Times are in UTC." in body


def test_it_filters_by_actor_object_type_and_dates(carol: User, alice: User, bob: User) -> None:
    # Events are appended in time order: the older one first
    old = AuditEvent.objects.create(
        actor_label="command line",
        source=AuditSource.COMMAND,
        action="create",
        object_type="apikey",
        object_repr="sk-old…",
        created_at=datetime.datetime(2026, 1, 15, 12, tzinfo=datetime.UTC),
    )
    with acting(Actor(carol, AuditSource.CONSOLE)):
        record("change", alice, changes={"name": ["", "A"]})
    client = signed_in(carol)

    def actions(query: str) -> list[str]:
        response = client.get("/console/audit/" + query)
        assert response.status_code == 200
        return [row.event.object_repr for row in response.context["rows"]]

    assert actions("") == ["alice@example.com", "sk-old…"]
    assert actions(f"?actor={carol.pk}") == ["alice@example.com"]
    assert actions("?actor=command") == ["sk-old…"]
    assert actions("?object_type=apikey") == ["sk-old…"]
    assert actions("?since=2026-01-15&until=2026-01-15") == ["sk-old…"]
    assert actions("?until=2026-01-14") == []
    assert actions("?since=2026-01-16") == ["alice@example.com"]
    refused = client.get("/console/audit/?since=2026-02-01&until=2026-01-01")
    assert refused.context["filters"].errors["until"]
    assert old.pk


def test_it_pages_by_keyset(carol: User, alice: User) -> None:
    with acting(Actor(carol, AuditSource.CONSOLE)):
        for number in range(55):
            record("change", alice, changes={"name": [str(number), str(number + 1)]})
    client = signed_in(carol)
    first = client.get("/console/audit/")
    assert len(first.context["rows"]) == 50
    second = client.get("/console/audit/" + first.context["page"].next_url)
    assert len(second.context["rows"]) == 5


def test_only_admins_see_the_audit_log(frank: User, alice: User) -> None:
    assert signed_in(frank).get("/console/audit/").status_code == 403
    assert signed_in(alice).get("/console/audit/").status_code == 403
    assert Client().get("/console/audit/").status_code == 302


def test_the_django_admin_shows_events_read_only(carol: User, alice: User) -> None:
    do_set_active(user=alice, active=False)
    event = AuditEvent.objects.get()
    client = signed_in(carol)
    assert client.get("/admin/accounts/auditevent/").status_code == 200
    assert client.get(f"/admin/accounts/auditevent/{event.pk}/change/").status_code == 200
    assert client.get("/admin/accounts/auditevent/add/").status_code == 403
    assert (
        client.post(
            f"/admin/accounts/auditevent/{event.pk}/change/", {"action": "nothing"}
        ).status_code
        == 403
    )
    assert (
        client.post(f"/admin/accounts/auditevent/{event.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    event.refresh_from_db()
    assert event.action == "disable"
