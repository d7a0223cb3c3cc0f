"""The console's users pages: list, create with a set-password link, role, disable, links."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.sessions.models import Session
from django.test import Client
from django.utils import timezone

from accounts.models import AuditEvent, Role, User
from keys.models import ApiKey, UsageRecord
from tests.conftest import PASSWORD, make_user

pytestmark = pytest.mark.django_db


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def emails(response) -> list[str]:
    return [row.email for row in response.context["page"].rows]


# --- the list ---


def test_the_list_searches_filters_and_counts_active_keys(
    carol: User, alice: User, bob: User, frank: User
) -> None:
    ApiKey.issue(user=alice, name="laptop")
    ApiKey.issue(user=alice, name="old", revoked_at=timezone.now())
    ApiKey.issue(user=alice, name="off", enabled=False)
    ApiKey.issue(user=alice, name="gone", expires_at=timezone.now() - timedelta(days=1))
    bob.name = "Bob Builder"
    bob.is_active = False
    bob.save()
    client = signed_in(carol)

    response = client.get("/console/users/")
    assert response.status_code == 200
    assert set(emails(response)) == {u.email for u in (carol, alice, bob, frank)}
    counts = {row.email: row.active_keys for row in response.context["page"].rows}
    assert counts["alice@example.com"] == 1
    assert counts["bob@example.com"] == 0

    assert emails(client.get("/console/users/?q=ALICE")) == ["alice@example.com"]
    assert emails(client.get("/console/users/?q=builder")) == ["bob@example.com"]
    assert emails(client.get("/console/users/?role=finance")) == ["frank@example.com"]
    assert emails(client.get("/console/users/?status=disabled")) == ["bob@example.com"]
    assert "bob@example.com" not in emails(client.get("/console/users/?status=active"))


def test_the_list_pages_by_keyset_and_keeps_the_filters(carol: User) -> None:
    for number in range(60):
        make_user(f"member{number:02}@example.com")
    client = signed_in(carol)

    first = client.get("/console/users/?role=member")
    assert len(emails(first)) == 50
    next_url = first.context["page"].next_url
    assert "role=member" in next_url
    assert "after=" in next_url
    second = client.get("/console/users/" + next_url)
    assert len(emails(second)) == 10
    assert not set(emails(first)) & set(emails(second))
    assert second.context["page"].next_url is None
    back = client.get("/console/users/" + second.context["page"].previous_url)
    assert emails(back) == emails(first)


def test_the_list_costs_the_same_queries_for_many_users(
    carol: User, django_assert_max_num_queries
) -> None:
    for number in range(40):
        user = make_user(f"member{number:02}@example.com")
        ApiKey.issue(user=user)
    client = signed_in(carol)
    client.get("/console/users/")  # warm the session and caches
    with django_assert_max_num_queries(6):
        response = client.get("/console/users/")
    assert response.status_code == 200


def test_htmx_filtering_gets_only_the_results(carol: User, alice: User) -> None:
    response = signed_in(carol).get("/console/users/?q=alice", headers={"HX-Request": "true"})
    body = response.content.decode()
    assert 'id="results"' in body
    assert "alice@example.com" in body
    assert "<html" not in body


# --- creating a user, and the set-password link ---


def create(client: Client, **fields: str):
    return client.post("/console/users/new/", {"role": Role.MEMBER, "name": "", **fields})


def link_in(response) -> str:
    match = re.search(r'<code id="password-link">([^<]+)</code>', response.content.decode())
    assert match, "the set-password link is shown"
    return match.group(1)


def test_an_admin_creates_a_user_and_gets_a_one_time_link_that_works_once(carol: User) -> None:
    response = create(signed_in(carol), email="Dora@Example.com", name="Dora", role="finance")
    assert response.status_code == 200
    dora = User.objects.get(email="dora@example.com")
    assert (dora.name, dora.role, dora.is_superuser) == ("Dora", Role.FINANCE, False)
    assert not dora.has_usable_password()
    link = link_in(response)
    assert link.startswith("http://testserver/accounts/set-password/")

    # The link opens the set-password form (Django moves the token into the session)
    visitor = Client()
    form_page = visitor.get(link, follow=True)
    assert form_page.status_code == 200
    assert form_page.context["validlink"]
    done = visitor.post(
        form_page.redirect_chain[-1][0],
        {"new_password1": "a fresh long password 9", "new_password2": "a fresh long password 9"},
    )
    assert done.status_code == 302
    assert done["Location"] == "/accounts/set-password/done/"
    assert Client().login(username="dora@example.com", password="a fresh long password 9")

    # Used once, the link is dead
    again = Client().get(link, follow=True)
    assert not again.context["validlink"]
    assert "does not work" in again.content.decode()


def test_a_set_password_link_expires_after_72_hours(carol: User, alice: User, settings) -> None:
    assert settings.PASSWORD_RESET_TIMEOUT == 72 * 3600
    response = signed_in(carol).post(f"/console/users/{alice.pk}/password-link/")
    link = link_in(response)
    assert Client().get(link, follow=True).context["validlink"]

    settings.PASSWORD_RESET_TIMEOUT = -1  # every token issued before now is too old
    assert not Client().get(link, follow=True).context["validlink"]


def test_a_disabled_users_link_does_not_work(carol: User, alice: User) -> None:
    link = link_in(signed_in(carol).post(f"/console/users/{alice.pk}/password-link/"))
    User.objects.filter(pk=alice.pk).update(is_active=False)
    assert not Client().get(link, follow=True).context["validlink"]


def test_a_refused_create_shows_the_error_beside_the_field_and_changes_nothing(
    carol: User, alice: User
) -> None:
    client = signed_in(carol)
    response = create(client, email="ALICE@example.com")
    assert response.status_code == 400
    assert response.context["form"].errors["email"] == [
        "a user with email alice@example.com already exists"
    ]
    response = create(client, email="not an email", role="boss")
    assert set(response.context["form"].errors) == {"email", "role"}
    assert User.objects.count() == 2
    assert not AuditEvent.objects.exists()


# --- role, disable, enable ---


def test_an_admin_changes_a_role_and_superuser_follows(carol: User, alice: User) -> None:
    response = signed_in(carol).post(f"/console/users/{alice.pk}/role/", {"role": "admin"})
    assert response.status_code == 302
    alice.refresh_from_db()
    assert (alice.role, alice.is_superuser) == (Role.ADMIN, True)
    event = AuditEvent.objects.get(action="change role")
    assert event.changes == {"role": ["member", "admin"], "is_superuser": [False, True]}
    assert event.actor == carol
    assert event.source == "console"


def test_the_last_active_admin_cannot_be_demoted_or_disabled(carol: User) -> None:
    client = signed_in(carol)
    response = client.post(f"/console/users/{carol.pk}/role/", {"role": "member"})
    assert response.status_code == 400
    assert "last active admin" in response.context["role_form"].errors["role"][0]
    client.post(f"/console/users/{carol.pk}/active/", {"active": "0"})
    carol.refresh_from_db()
    assert (carol.role, carol.is_active) == (Role.ADMIN, True)
    assert not AuditEvent.objects.exists()


# /v1 views are async: their ORM calls run in another thread, which needs committed rows.
@pytest.mark.django_db(transaction=True)
def test_disabling_ends_sessions_and_refuses_the_api_key_on_the_next_request(
    carol: User, alice: User
) -> None:
    # Given alice signed in, with a key that works
    _key, raw = ApiKey.issue(user=alice, name="laptop")
    auth = {"Authorization": f"Bearer {raw}"}
    alice_browser = Client()
    assert alice_browser.login(username="alice@example.com", password=PASSWORD)
    assert alice_browser.get("/v1/models", headers=auth).status_code == 200
    other = signed_in(bob := make_user("bob@example.com"))

    # When an admin disables her
    response = signed_in(carol).post(f"/console/users/{alice.pk}/active/", {"active": "0"})
    assert response.status_code == 302

    # Then her sessions are gone, her key is refused at once, other sessions stay
    assert not [
        s for s in Session.objects.all() if s.get_decoded().get("_auth_user_id") == str(alice.pk)
    ]
    assert alice_browser.get("/console/users/")["Location"].startswith("/accounts/login/")
    refused = Client().get("/v1/models", headers=auth)
    assert refused.status_code in (401, 403)
    assert "owner" in refused.content.decode()
    assert other.get("/console/users/").status_code == 403  # bob: still signed in, a member
    assert bob.is_active

    # And enabling her again lets the key through
    signed_in(carol).post(f"/console/users/{alice.pk}/active/", {"active": "1"})
    assert Client().get("/v1/models", headers=auth).status_code == 200
    actions = list(AuditEvent.objects.order_by("id").values_list("action", "changes"))
    assert actions == [
        ("disable", {"is_active": [True, False]}),
        ("enable", {"is_active": [False, True]}),
    ]


# --- the user's page ---


def test_a_users_page_shows_their_keys_and_this_months_usage(carol: User, alice: User) -> None:
    key, _raw = ApiKey.issue(user=alice, name="laptop")
    now = timezone.now()
    for number, (model, cost) in enumerate(
        [("gpt-4o", "0.5"), ("gpt-4o", "0.25"), ("claude", "1")]
    ):
        UsageRecord.objects.create(
            request_id=f"r{number}",
            user=alice,
            key=key,
            endpoint="chat.completions",
            dialect="openai",
            model=model,
            status="ok",
            input_tokens=10,
            output_tokens=5,
            cost=cost,
            currency="USD",
        )
    UsageRecord.objects.create(
        request_id="old",
        user=alice,
        key=key,
        endpoint="chat.completions",
        dialect="openai",
        model="gpt-4o",
        status="ok",
        cost="100",
        currency="USD",
        created_at=now.replace(day=1) - timedelta(days=2),
    )
    response = signed_in(carol).get(f"/console/users/{alice.pk}/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "laptop" in body
    assert key.prefix in body
    assert key.key_hash not in body
    usage = {row["model"]: row for row in response.context["usage"]}
    assert usage["gpt-4o"]["requests"] == 2
    assert usage["gpt-4o"]["input_tokens"] == 20
    assert str(usage["gpt-4o"]["cost"]).startswith("0.75")
    assert response.context["usage_requests"] == 3
    assert [(c, str(v).rstrip("0")) for c, v in response.context["usage_totals"]] == [
        ("USD", "1.75")
    ]


def test_an_unknown_user_is_404(carol: User) -> None:
    assert signed_in(carol).get("/console/users/999999/").status_code == 404


# --- who may do what ---


def test_finance_sees_the_users_but_changes_nothing(frank: User, alice: User) -> None:
    client = signed_in(frank)
    page = client.get(f"/console/users/{alice.pk}/")
    assert page.status_code == 200
    assert "Change role" not in page.content.decode()
    assert "New user" not in client.get("/console/users/").content.decode()
    assert client.post(f"/console/users/{alice.pk}/role/", {"role": "admin"}).status_code == 403
    assert client.post(f"/console/users/{alice.pk}/active/", {"active": "0"}).status_code == 403
    assert client.post(f"/console/users/{alice.pk}/password-link/").status_code == 403
    assert client.get("/console/users/new/").status_code == 403
    alice.refresh_from_db()
    assert (alice.role, alice.is_active) == (Role.MEMBER, True)


def test_members_get_403(alice: User, bob: User) -> None:
    client = signed_in(alice)
    assert client.get("/console/users/").status_code == 403
    assert client.get(f"/console/users/{bob.pk}/").status_code == 403
    assert client.post(f"/console/users/{bob.pk}/active/", {"active": "0"}).status_code == 403


def test_the_audit_events_of_user_changes_hold_no_secret(carol: User) -> None:
    response = create(signed_in(carol), email="dora@example.com")
    link = link_in(response)
    token = link.rstrip("/").rsplit("/", 1)[-1]
    events = list(AuditEvent.objects.order_by("id"))
    assert [event.action for event in events] == ["create", "password link"]
    created = events[0].changes
    assert created["email"] == [None, "dora@example.com"]
    assert created["role"] == [None, "member"]
    assert created["password"] == [None, "••••••"]
    for event in events:
        assert token not in str(event.changes)
        assert "set-password" not in str(event.changes)
        assert event.actor == carol
