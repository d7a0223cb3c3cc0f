"""Roles: admins may do everything, finance reads reports, members chat."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.test import RequestFactory

from accounts.models import Role, User
from accounts.roles import check_role, role_required

pytestmark = pytest.mark.django_db


@role_required(Role.FINANCE)
def finance_report(request: HttpRequest) -> HttpResponse:
    return HttpResponse("report")


@role_required(Role.FINANCE)
async def async_finance_report(request: HttpRequest) -> HttpResponse:
    return HttpResponse("report")


def request_as(user: object) -> HttpRequest:
    request = RequestFactory().get("/reports/")
    request.user = user  # type: ignore[assignment]

    async def auser() -> object:
        return user

    request.auser = auser  # type: ignore[assignment]
    return request


def test_finance_and_admin_pass_a_finance_check(frank: User, carol: User, alice: User) -> None:
    assert finance_report(request_as(frank)).content == b"report"
    assert finance_report(request_as(carol)).content == b"report"
    with pytest.raises(PermissionDenied):
        finance_report(request_as(alice))


def test_anonymous_users_are_sent_to_login() -> None:
    response = finance_report(request_as(AnonymousUser()))
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=/reports/")


async def test_the_decorator_works_on_async_views(frank: User, alice: User) -> None:
    response = await async_finance_report(request_as(frank))
    assert response.content == b"report"
    with pytest.raises(PermissionDenied):
        await async_finance_report(request_as(alice))


def test_check_role_refuses_disabled_and_anonymous_users(frank: User) -> None:
    assert check_role(frank, Role.FINANCE)
    assert not check_role(frank, Role.ADMIN)
    assert not check_role(AnonymousUser(), Role.MEMBER)
    assert not check_role(None, Role.MEMBER)
    frank.is_active = False
    assert not check_role(frank, Role.FINANCE)


def test_only_superusers_reach_the_django_admin(client, carol: User, alice: User) -> None:
    client.force_login(alice)
    assert client.get("/admin/").status_code == 302
    client.force_login(carol)
    assert client.get("/admin/").status_code == 200
    assert client.get("/admin/accounts/user/").status_code == 200
    assert client.get("/admin/accounts/user/add/").status_code == 200
