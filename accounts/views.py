from __future__ import annotations

from django.conf import settings
from django.contrib.auth import login as auth_login
from django.contrib.auth import logout as auth_logout
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render, resolve_url
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_http_methods, require_POST

from accounts import throttle
from accounts.forms import EmailAuthenticationForm


def _client_address(request: HttpRequest) -> str:
    return request.META.get("REMOTE_ADDR") or "unknown"


def _safe_next(request: HttpRequest) -> str:
    target = request.POST.get("next") or request.GET.get("next") or ""
    if url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return resolve_url(settings.LOGIN_REDIRECT_URL)


@sensitive_post_parameters("password")
@csrf_protect
@never_cache
@require_http_methods(["GET", "POST"])
def login(request: HttpRequest) -> HttpResponse:
    if request.user.is_authenticated:
        return redirect(_safe_next(request))
    form = EmailAuthenticationForm(request, data=request.POST or None)
    status = 200
    if request.method == "POST":
        email = request.POST.get("username", "")
        address = _client_address(request)
        if throttle.is_throttled(email, address):
            minutes = max(1, settings.LOGIN_FAILURE_WINDOW // 60)
            form.add_error(
                None,
                _("Too many failed sign-in attempts. Try again in %(minutes)d minutes.")
                % {"minutes": minutes},
            )
            status = 429
        elif form.is_valid():
            throttle.clear_failures(email, address)
            auth_login(request, form.get_user())
            return HttpResponseRedirect(_safe_next(request))
        else:
            throttle.record_failure(email, address)
            status = 400
    return render(
        request,
        "accounts/login.html",
        {"form": form, "next": request.POST.get("next") or request.GET.get("next", "")},
        status=status,
    )


@require_POST
def logout(request: HttpRequest) -> HttpResponse:
    auth_logout(request)
    return redirect(settings.LOGOUT_REDIRECT_URL)
