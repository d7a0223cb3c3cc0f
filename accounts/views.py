from __future__ import annotations

import logging
import math
from typing import Any

from django.conf import settings
from django.contrib import admin
from django.contrib.auth import login as auth_login
from django.contrib.auth import logout as auth_logout
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render, resolve_url
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts import throttle
from accounts.console import EVERYONE, sections_for
from accounts.forms import EmailAuthenticationForm
from accounts.roles import console_page

logger = logging.getLogger(__name__)


def _safe_next(request: HttpRequest, default: str) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return resolve_url(default)


def _too_many_failures(seconds: int) -> str:
    if seconds < 60:
        return ngettext(
            "Too many failed sign-in attempts. Try again in %(seconds)d second.",
            "Too many failed sign-in attempts. Try again in %(seconds)d seconds.",
            seconds,
        ) % {"seconds": seconds}
    return _("Too many failed sign-in attempts. Try again in %(minutes)d minutes.") % {
        "minutes": math.ceil(seconds / 60)
    }


@sensitive_post_parameters("password")
@csrf_protect
@never_cache
@require_http_methods(["GET", "POST"])
def login(request: HttpRequest) -> HttpResponse:
    return _sign_in(request, default_next=settings.LOGIN_REDIRECT_URL)


@sensitive_post_parameters("password")
@csrf_protect
@never_cache
@require_http_methods(["GET", "POST"])
def admin_login(request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
    """The admin site's sign-in (``admin.site.login``): our own page and throttle.

    The admin sends a signed-in user without admin rights here too; showing them the
    sign-in page would send them straight back, so they are refused instead.
    """
    if request.user.is_authenticated and not admin.site.has_permission(request):
        raise PermissionDenied
    return _sign_in(request, default_next="admin:index")


def _sign_in(request: HttpRequest, *, default_next: str) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect(_safe_next(request, default_next))
    next_url = request.POST.get("next") or request.GET.get("next") or resolve_url(default_next)
    form = EmailAuthenticationForm(request, data=request.POST or None)
    status = 200
    retry_after = 0
    if request.method == "POST":
        email = request.POST.get("username", "")
        address = throttle.client_address(request)
        try:
            retry_after = throttle.retry_after(email, address)
            if retry_after:
                # Refused before the password is checked: a paused guesser learns nothing.
                form.add_error(None, _too_many_failures(retry_after))
                status = 429
            elif form.is_valid():
                throttle.record_success(email, address)
                auth_login(request, form.get_user())
                return HttpResponseRedirect(_safe_next(request, default_next))
            else:
                throttle.record_failure(email, address)
                status = 400
        except throttle.ThrottleUnavailable as exc:
            logger.error("sign-in refused: the throttle's cache is unavailable (%s)", exc)
            return render(request, "accounts/unavailable.html", status=503)
    response = render(
        request,
        "accounts/login.html",
        {"form": form, "next": next_url},
        status=status,
    )
    if retry_after:
        response["Retry-After"] = str(retry_after)
    return response


@require_POST
def logout(request: HttpRequest) -> HttpResponse:
    auth_logout(request)
    return redirect(settings.LOGOUT_REDIRECT_URL)


@require_GET
@console_page(read=EVERYONE)
def console_home(request: HttpRequest) -> HttpResponse:
    """``/console/``: the first section the viewer's role may open."""
    sections = sections_for(request.user)
    if not sections:
        raise PermissionDenied
    return redirect(sections[0][1])
