"""Signing in and out, neutral failures, throttling, disabled users."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import User
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db

NEUTRAL = "That email and password do not match an active account."


def sign_in(client: Client, email: str, password: str = PASSWORD, **extra: str):
    return client.post(
        reverse("accounts:login"), {"username": email, "password": password, **extra}
    )


def test_home_sends_anonymous_visitors_to_the_login_page(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 302
    assert response["Location"] == reverse("accounts:login")


def test_a_member_signs_in_by_email_and_out_again(client: Client, alice: User) -> None:
    response = sign_in(client, "Alice@Example.com")
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.get("/")["Location"] == "/chat/"
    chat = client.get("/chat/")
    assert chat.status_code == 200
    assert "alice@example.com" in chat.content.decode()

    response = client.post(reverse("accounts:logout"))
    assert response.status_code == 302
    assert client.get("/").status_code == 302


def test_logout_needs_a_post(client: Client, alice: User) -> None:
    client.force_login(alice)
    assert client.get(reverse("accounts:logout")).status_code == 405
    assert client.get("/chat/").status_code == 200


def test_sign_in_follows_a_safe_next_but_not_an_external_one(client: Client, alice: User) -> None:
    assert sign_in(client, alice.email, next="/admin/")["Location"] == "/admin/"
    client.logout()
    assert sign_in(client, alice.email, next="https://evil.example/")["Location"] == "/"


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("alice@example.com", "wrong password"),
        ("nobody@example.com", PASSWORD),
    ],
    ids=["wrong-password", "unknown-email"],
)
def test_failures_get_one_neutral_message(
    client: Client, alice: User, email: str, password: str
) -> None:
    response = sign_in(client, email, password)
    assert response.status_code == 400
    assert NEUTRAL in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_a_disabled_user_gets_the_same_neutral_message(client: Client, alice: User) -> None:
    alice.is_active = False
    alice.save()
    response = sign_in(client, alice.email)
    assert response.status_code == 400
    assert NEUTRAL in response.content.decode()


def test_a_disabled_users_open_session_stops_working(client: Client, alice: User) -> None:
    sign_in(client, alice.email)
    assert client.get("/chat/").status_code == 200
    User.objects.filter(pk=alice.pk).update(is_active=False)
    response = client.get("/chat/")
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("accounts:login"))


def test_repeated_failures_are_throttled_even_with_the_right_password(
    client: Client, alice: User, settings
) -> None:
    settings.LOGIN_FAILURE_LIMIT = 3
    for _attempt in range(3):
        assert sign_in(client, alice.email, "wrong").status_code == 400
    response = sign_in(client, alice.email)
    assert response.status_code == 429
    assert "Too many failed sign-in attempts" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_throttling_by_address_covers_guessing_across_emails(
    client: Client, alice: User, settings
) -> None:
    settings.LOGIN_FAILURE_LIMIT = 3
    # One address may fail ADDRESS_FACTOR (4) times the limit across emails.
    for number in range(4 * 3):
        assert sign_in(client, f"guess{number}@example.com", "wrong").status_code == 400
    assert sign_in(client, alice.email).status_code == 429


def test_the_login_page_speaks_chinese(client: Client) -> None:
    response = client.get(reverse("accounts:login"), headers={"accept-language": "zh-Hans"})
    assert "登录" in response.content.decode()
