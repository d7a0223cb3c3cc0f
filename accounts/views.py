from __future__ import annotations

import datetime
import logging
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth import login as auth_login
from django.contrib.auth import logout as auth_logout
from django.contrib.auth.views import PasswordResetConfirmView
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Count, IntegerField, OuterRef, Q, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, redirect, render, resolve_url
from django.urls import NoReverseMatch, reverse, reverse_lazy
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.utils.translation import gettext as _
from django.utils.translation import ngettext
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.debug import sensitive_post_parameters
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.middleware import HtmxDetails

from accounts import throttle
from accounts.actions import (
    AccountError,
    do_create_user,
    do_issue_password_link,
    do_set_active,
    do_set_role,
)
from accounts.audit import object_type_label
from accounts.console import ADMINS, EVERYONE, STAFF, keyset_page, sections_for
from accounts.forms import (
    AuditFilterForm,
    EmailAuthenticationForm,
    RoleForm,
    UserCreateForm,
    UserFilterForm,
)
from accounts.models import AuditEvent, AuditSource, User
from accounts.roles import console_page


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


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


# --- The console's pages on people: users (staff read, admins change) and the audit log. ---


def _active_keys() -> Subquery:
    """The number of a user's usable API keys, as a correlated subquery.

    Evaluated only for the rows of the page (after the keyset LIMIT), so the list
    costs the same on 100,000 users as on 100; a JOIN + GROUP BY would aggregate
    every user first.
    """
    api_key = User._meta.get_field("api_keys").related_model
    now = timezone.now()
    usable = (
        api_key._default_manager.filter(user=OuterRef("pk"), enabled=True, revoked_at__isnull=True)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .order_by()
        .values("user")
        .annotate(count=Count("pk"))
        .values("count")
    )
    return Subquery(usable, output_field=IntegerField())


@require_GET
@console_page(read=STAFF, write=ADMINS)
def console_users(request: HtmxHttpRequest) -> HttpResponse:
    """``/console/users/``: search by email or name, filter by role and status, keyset pages."""
    filters = UserFilterForm(request.GET)
    users = User.objects.annotate(active_keys=Coalesce(_active_keys(), 0))
    if filters.is_valid():
        query = filters.cleaned_data["q"].strip()
        if query:
            users = users.filter(Q(email__icontains=query) | Q(name__icontains=query))
        if filters.cleaned_data["role"]:
            users = users.filter(role=filters.cleaned_data["role"])
        if filters.cleaned_data["status"]:
            users = users.filter(is_active=filters.cleaned_data["status"] == "active")
    page = keyset_page(request, users)
    template = "accounts/console/users.html"
    if request.htmx and not request.htmx.boosted:
        template += "#results"
    return render(request, template, {"filters": filters, "page": page})


@require_http_methods(["GET", "POST"])
@console_page(read=ADMINS, write=ADMINS)
def console_user_new(request: HtmxHttpRequest) -> HttpResponse:
    """``/console/users/new/``: create a user; the admin gets a set-password link, shown once."""
    form = UserCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            with transaction.atomic():
                user = do_create_user(
                    email=form.cleaned_data["email"],
                    role=form.cleaned_data["role"],
                    name=form.cleaned_data["name"],
                )
                link = do_issue_password_link(user=user)
        except AccountError as exc:
            form.add_error(exc.field if exc.field in form.fields else None, str(exc))
        else:
            # The link is in this response only: nothing stores it, a reload does not repeat it.
            return _user_page(request, user, link=request.build_absolute_uri(link), created=True)
    status = 400 if form.errors else 200
    context = {"form": form, "link_hours": settings.PASSWORD_RESET_TIMEOUT // 3600}
    return render(request, "accounts/console/user_new.html", context, status=status)


def _user_or_404(pk: int) -> User:
    return get_object_or_404(User, pk=pk)


def _month_start() -> datetime.datetime:
    now = timezone.now().astimezone(datetime.UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _user_page(
    request: HttpRequest,
    user: User,
    *,
    link: str = "",
    created: bool = False,
    role_form: RoleForm | None = None,
    status: int = 200,
) -> HttpResponse:
    keys = []
    for key in user.api_keys.order_by("-created_at")[:100]:
        try:
            url = reverse("console:key", kwargs={"pk": key.pk})
        except NoReverseMatch:
            url = ""
        keys.append((key, url))
    month = _month_start()
    usage = list(
        user.usage_records.filter(created_at__gte=month)
        .values("model", "currency")
        .annotate(
            requests=Count("pk"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cost=Sum("cost"),
        )
        .order_by("-cost", "model")
    )
    totals: dict[str, Decimal] = {}
    for row in usage:
        totals[row["currency"]] = totals.get(row["currency"], Decimal(0)) + (row["cost"] or 0)
    context = {
        "subject": user,
        "keys": keys,
        "usage": usage,
        "usage_totals": sorted(totals.items()),
        "usage_requests": sum(row["requests"] for row in usage),
        "month": month,
        "link": link,
        "created": created,
        "link_hours": settings.PASSWORD_RESET_TIMEOUT // 3600,
        "role_form": role_form or RoleForm(initial={"role": user.role}),
        "is_self": user.pk == request.user.pk,
    }
    return render(request, "accounts/console/user.html", context, status=status)


@require_GET
@console_page(read=STAFF, write=ADMINS)
def console_user(request: HttpRequest, pk: int) -> HttpResponse:
    """``/console/users/<id>/``: their facts, keys and this month's usage."""
    return _user_page(request, _user_or_404(pk))


@require_POST
@console_page(read=STAFF, write=ADMINS)
def console_user_role(request: HttpRequest, pk: int) -> HttpResponse:
    user = _user_or_404(pk)
    form = RoleForm(request.POST)
    if form.is_valid():
        try:
            do_set_role(user=user, role=form.cleaned_data["role"])
        except AccountError as exc:
            form.add_error("role", str(exc))
        else:
            messages.success(request, _("Role changed."))
            return redirect("console:user", pk=user.pk)
    return _user_page(request, user, role_form=form, status=400)


@require_POST
@console_page(read=STAFF, write=ADMINS)
def console_user_active(request: HttpRequest, pk: int) -> HttpResponse:
    user = _user_or_404(pk)
    active = request.POST.get("active") == "1"
    try:
        do_set_active(user=user, active=active)
    except AccountError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request,
            _("User enabled.")
            if active
            else _("User disabled: their sessions are ended and their keys refused."),
        )
    return redirect("console:user", pk=user.pk)


@require_POST
@console_page(read=STAFF, write=ADMINS)
def console_user_password_link(request: HttpRequest, pk: int) -> HttpResponse:
    """Issue a one-time set-password link and show it once (this response only)."""
    user = _user_or_404(pk)
    try:
        link = do_issue_password_link(user=user)
    except AccountError as exc:
        messages.error(request, str(exc))
        return redirect("console:user", pk=user.pk)
    return _user_page(request, user, link=request.build_absolute_uri(link))


def _shown(value: Any) -> str:
    """A recorded field value as the audit page shows it."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return _("yes") if value else _("no")
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "—"
    return str(value)


@dataclass(frozen=True)
class AuditRow:
    event: AuditEvent
    changes: list[tuple[str, str, str]]

    @property
    def object_type(self) -> str:
        return object_type_label(self.event.object_type)


@require_GET
@console_page(read=ADMINS)
def console_audit(request: HtmxHttpRequest) -> HttpResponse:
    """``/console/audit/``: the append-only log, newest first, filtered and keyset-paged."""
    object_types = list(
        AuditEvent.objects.order_by("object_type").values_list("object_type", flat=True).distinct()
    )
    filters = AuditFilterForm(request.GET, object_types=object_types)
    events = AuditEvent.objects.all()
    if filters.is_valid():
        data = filters.cleaned_data
        if data["actor"] == AuditFilterForm.COMMAND_LINE:
            events = events.filter(source=AuditSource.COMMAND)
        elif data["actor"]:
            events = events.filter(actor_id=int(data["actor"]))
        if data["object_type"]:
            events = events.filter(object_type=data["object_type"])
        zone = timezone.get_current_timezone()
        if data["since"]:
            start = datetime.datetime.combine(data["since"], datetime.time.min, tzinfo=zone)
            events = events.filter(created_at__gte=start)
        if data["until"]:
            end = datetime.datetime.combine(
                data["until"] + datetime.timedelta(days=1), datetime.time.min, tzinfo=zone
            )
            events = events.filter(created_at__lt=end)
    page = keyset_page(request, events)
    rows = [
        AuditRow(
            event,
            [(name, _shown(pair[0]), _shown(pair[1])) for name, pair in event.changes.items()],
        )
        for event in page.rows
    ]
    template = "accounts/console/audit.html"
    if request.htmx and not request.htmx.boosted:
        template += "#results"
    context = {
        "filters": filters,
        "page": page,
        "rows": rows,
        "zone": timezone.get_current_timezone_name(),
    }
    return render(request, template, context)


# --- The set-password page that the console's one-time links open. ---


class SetPasswordView(PasswordResetConfirmView):
    """``/accounts/set-password/<uidb64>/<token>/``: Django's reset-confirm, our template.

    Django's token stops working once the password changes (it is derived from the
    hash) and after PASSWORD_RESET_TIMEOUT (72 h).  A disabled user's link is dead too.
    """

    template_name = "accounts/set_password.html"
    success_url = reverse_lazy("accounts:set_password_done")
    reset_url_token = "set"  # noqa: S105 - the placeholder in the URL, not a secret

    def get_user(self, uidb64: str) -> Any:
        user = super().get_user(uidb64)
        return user if user is not None and user.is_active else None


@require_GET
def set_password_done(request: HttpRequest) -> HttpResponse:
    return render(request, "accounts/set_password_done.html")
