"""The admin site signs in through our own page, under the same throttle."""

from __future__ import annotations

import pytest
from django.test import Client

from accounts.models import User
from tests.conftest import PASSWORD

pytestmark = pytest.mark.django_db


def admin_sign_in(client: Client, email: str, password: str = PASSWORD):
    return client.post("/admin/login/?next=/admin/", {"username": email, "password": password})


def test_the_admin_sends_visitors_to_our_sign_in_page(client: Client) -> None:
    response = client.get("/admin/", follow=True)
    assert response.redirect_chain == [("/admin/login/?next=/admin/", 302)]
    page = response.content.decode()
    assert 'action="/accounts/login/"' in page
    assert 'name="next" value="/admin/"' in page


def test_wrong_passwords_at_the_admin_login_do_not_let_the_right_one_through(
    client: Client, carol: User
) -> None:
    # Given 50 wrong passwords for an admin at the admin's own login URL
    statuses = {admin_sign_in(client, carol.email, f"guess {n}").status_code for n in range(50)}
    assert statuses == {400, 429}
    # when the right one comes while the pause lasts, it is refused
    response = admin_sign_in(client, carol.email)
    assert response.status_code == 429
    assert "Too many failed sign-in attempts" in response.content.decode()
    # and the admin stays closed.
    assert "_auth_user_id" not in client.session
    assert client.get("/admin/").status_code == 302


def test_an_admin_signs_in_at_the_admin_login_and_lands_in_the_admin(
    client: Client, carol: User
) -> None:
    response = admin_sign_in(client, carol.email)
    assert response.status_code == 302
    assert response["Location"] == "/admin/"
    assert client.get("/admin/").status_code == 200


def test_a_member_who_signs_in_at_the_admin_login_gets_no_admin(
    client: Client, alice: User
) -> None:
    response = admin_sign_in(client, alice.email)
    assert response.status_code == 302
    # The admin refuses her; its login page refuses too instead of looping back.
    response = client.get("/admin/", follow=True)
    assert response.status_code == 403
    assert client.get("/admin/accounts/user/", follow=True).status_code == 403
