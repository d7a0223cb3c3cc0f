"""The console's pages for API keys, members' key policies and prices.

Admins and finance see every key, a member only their own (others' → 404, never
403, so ids are not confirmed).  Finance reads, never changes.  Every change goes
through ``keys.actions`` (the same checks and audit records as the commands).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db import connection, transaction
from django.db.models import Prefetch, Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import pgettext_lazy
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django_htmx.middleware import HtmxDetails

from accounts.console import ADMINS, EVERYONE, STAFF, keyset_page
from accounts.models import Role, User
from accounts.roles import console_page
from chatapp.models import CatalogModel
from keys import alerts, limiter
from keys.actions import (
    LIMIT_FIELDS,
    KeyActionError,
    check_may_revoke,
    check_member_keys_allowed,
    do_create_key,
    do_create_member_key,
    do_edit_key,
    do_revoke_key,
    do_rotate_key,
    do_set_alert_thresholds,
    do_set_policy,
    do_set_price,
    member_limits,
    policy_for,
    usable_keys,
)
from keys.exceptions import LimiterUnavailable
from keys.forms import (
    AlertThresholdsForm,
    ConsoleKeyCreateForm,
    ConsoleKeyForm,
    ConsolePriceForm,
    KeyPolicyForm,
    MemberKeyForm,
    RotateForm,
)
from keys.models import AlertThresholds, ApiKey, ModelPrice


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def _label(name: str) -> Any:
    """A key field's verbose name (translated)."""
    return getattr(ApiKey._meta.get_field(name), "verbose_name", name)


# Members change only their own keys; finance changes nothing (accounts.roles).
MEMBERS_AND_ADMINS = (Role.MEMBER, Role.ADMIN)

STATUSES = [
    ("active", pgettext_lazy("key status", "Active")),
    ("revoked", pgettext_lazy("key status", "Revoked")),
    ("expired", pgettext_lazy("key status", "Expired")),
    ("disabled", pgettext_lazy("key status", "Disabled")),
]


def _sees_all(user: Any) -> bool:
    return isinstance(user, User) and user.has_role(Role.FINANCE, Role.ADMIN)


def _is_admin(user: Any) -> bool:
    return isinstance(user, User) and user.has_role(Role.ADMIN)


def visible_keys(user: User) -> QuerySet[ApiKey]:
    keys = ApiKey.objects.select_related("user")
    return keys if _sees_all(user) else keys.filter(user=user)


def _key_or_404(request: HttpRequest, pk: int) -> ApiKey:
    return get_object_or_404(visible_keys(request.user), pk=pk)  # type: ignore[arg-type]


def _may_manage_own(request: HttpRequest, key: ApiKey) -> bool:
    """A member's own key, when members manage their own keys."""
    return settings.SWITCHBOARD_MEMBER_KEYS and key.user_id == request.user.pk


def _int_param(value: str) -> int | None:
    try:
        number = int(value)
    except ValueError:
        return None
    return number if 0 < number <= 3650 else None


def filtered_keys(request: HttpRequest) -> tuple[QuerySet[ApiKey], dict[str, Any]]:
    """The keys the viewer may see, narrowed by the GET filters (each one indexed)."""
    keys = visible_keys(request.user)  # type: ignore[arg-type]
    now = timezone.now()
    filters = {
        "user": request.GET.get("user", "").strip(),
        "status": request.GET.get("status", ""),
        "model": request.GET.get("model", "").strip(),
        "expiring": request.GET.get("expiring", "").strip(),
    }
    if filters["user"] and _sees_all(request.user):
        # Users first (their table is small), then keys by their indexed user_id.
        keys = keys.filter(
            user__in=User.objects.filter(email__icontains=filters["user"]).values("pk")
        )
    status = filters["status"]
    if status == "active":
        keys = keys.filter(revoked_at__isnull=True, enabled=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        )
    elif status == "revoked":
        keys = keys.filter(revoked_at__isnull=False)
    elif status == "expired":
        keys = keys.filter(revoked_at__isnull=True, expires_at__lte=now)
    elif status == "disabled":
        keys = keys.filter(revoked_at__isnull=True, enabled=False)
    if filters["model"]:
        # A key may use the model when it lists it or lists none (every model).
        if connection.vendor == "postgresql":
            listed = Q(allowed_models__contains=[filters["model"]])
        else:  # SQLite has no JSON containment: match the quoted name in the JSON text
            listed = Q(allowed_models__icontains=json.dumps(filters["model"]))
        keys = keys.filter(listed | Q(allowed_models=[]))
    days = _int_param(filters["expiring"]) if filters["expiring"] else None
    if filters["expiring"] and days is None:
        filters["expiring_error"] = _("Enter a number of days from 1 to 3650.")
    if days:
        keys = keys.filter(
            revoked_at__isnull=True, expires_at__gt=now, expires_at__lte=now + timedelta(days=days)
        )
    return keys, filters


def _status_badge(key: ApiKey) -> tuple[str, str]:
    state = key.state
    label = dict(STATUSES).get(state, state)
    if state == "active" and key.replaced_by_id is not None:
        return "warn", _("Replaced")
    if (
        state == "active"
        and key.expires_at
        and key.expires_at <= timezone.now() + timedelta(days=7)
    ):
        return "warn", str(label)
    return ("ok" if state == "active" else "bad"), str(label)


def _can_create(request: HttpRequest) -> bool:
    user = request.user
    if _is_admin(user):
        return True
    return bool(
        settings.SWITCHBOARD_MEMBER_KEYS
        and isinstance(user, User)
        and user.role == Role.MEMBER
        and user.is_active
    )


@require_GET
@console_page(read=EVERYONE)
def key_list(request: HtmxHttpRequest) -> HttpResponse:
    keys, filters = filtered_keys(request)
    page = keyset_page(request, keys)
    rows = [(key, *_status_badge(key)) for key in page.rows]
    policy_user = None
    if _is_admin(request.user) and filters["user"]:
        policy_user = User.objects.filter(email=User.normalize_address(filters["user"])).first()
    context = {
        "page": page,
        "rows": rows,
        "filters": filters,
        "statuses": STATUSES,
        "catalog": CatalogModel.objects.order_by("name").values_list("name", flat=True),
        "sees_all": _sees_all(request.user),
        "can_create": _can_create(request),
        "member_keys": settings.SWITCHBOARD_MEMBER_KEYS,
        "policy_user": policy_user,
    }
    template = "keys/console/key_list.html"
    if request.htmx and request.htmx.target == "key-rows":
        template += "#rows"
    return render(request, template, context)


def _when(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _gauge(
    label: str, used: Any, limit: Any, resets_at: datetime | None, unit: str = ""
) -> dict[str, Any]:
    """One <meter>: ``used`` of ``limit`` (None: no limit); ``used`` None: not known here."""
    used_value = Decimal(str(used)) if used is not None else Decimal(0)
    limit_value = Decimal(str(limit)) if limit not in (None, "") else None
    return {
        "label": label,
        "used": used,
        "limit": limit,
        "left": max(limit_value - used_value, Decimal(0)) if limit_value is not None else None,
        "max": limit_value if limit_value else Decimal(1),
        "value": min(used_value, limit_value) if limit_value else Decimal(0),
        "high": limit_value * Decimal("0.8") if limit_value else None,
        "resets_at": resets_at,
        "unit": unit,
    }


def _plus(spent: Any, reserved: Any) -> Decimal:
    return Decimal(str(spent)) + Decimal(str(reserved or 0))


def key_gauges(key: ApiKey) -> list[dict[str, Any]]:
    """The key's use against each limit and budget: the numbers of ``manage.py key usage``
    (``keys.limiter.usage``); budgets count what is spent plus what is reserved."""
    report = limiter.usage(key_id=key.pk, limits=key.limits)
    concurrency = report["concurrency"]
    tokens, money = report["token_budget"], report["money_budget"]
    return [
        _gauge(_("Requests this minute"), report["rpm"]["used"], report["rpm"]["limit"],
               _when(report["rpm"]["resets_at"])),
        _gauge(_("Requests today"), report["rpd"]["used"], report["rpd"]["limit"],
               _when(report["rpd"]["resets_at"])),
        _gauge(_("Tokens this minute"), report["tpm"]["used"], report["tpm"]["limit"],
               _when(report["tpm"]["resets_at"])),
        _gauge(_("Tokens today"), report["tpd"]["used"], report["tpd"]["limit"],
               _when(report["tpd"]["resets_at"])),
        _gauge(_("Requests in flight"), concurrency["in_flight"], concurrency["limit"], None),
        _gauge(_("Token budget spent"), _plus(tokens["spent"], tokens["reserved"]),
               tokens["limit"], _when(tokens["resets_at"])),
        _gauge(_("Money budget spent"), _plus(money["spent"], money["reserved"]).normalize(),
               money["limit"], _when(money["resets_at"]), money["currency"]),
    ]  # fmt: skip


def _limit_shown(key: ApiKey, name: str) -> Any:
    value = getattr(key, name)
    if name == "budget_period":
        return key.get_budget_period_display()
    if name == "money_budget" and value is not None:
        return f"{value.normalize():f} {settings.SWITCHBOARD_CURRENCY}"
    return value


def _detail(
    request: HttpRequest, key: ApiKey, *, status: int = 200, error: str | None = None
) -> HttpResponse:
    try:
        gauges: list[dict[str, Any]] | None = key_gauges(key)
    except LimiterUnavailable:
        gauges = None
    own = _may_manage_own(request, key) and request.user.role == Role.MEMBER  # type: ignore[union-attr]
    can_change = _is_admin(request.user) or own
    context = {
        "key": key,
        "badge": _status_badge(key),
        "gauges": gauges,
        "error": error,
        "zone": timezone.get_current_timezone_name(),
        "currency": settings.SWITCHBOARD_CURRENCY,
        "can_edit": _is_admin(request.user),
        "can_revoke": can_change and key.revoked_at is None and not key.is_web_key,
        "can_rotate": can_change
        and key.revoked_at is None
        and key.replaced_by_id is None
        and not key.is_web_key
        and key.state != "expired",
        "replaces": list(key.replaces.all()),
        "thresholds": _thresholds_shown(key),
        "limits": [(_label(name), _limit_shown(key, name)) for name in LIMIT_FIELDS],  # fmt: skip
    }
    return render(request, "keys/console/key_detail.html", context, status=status)


def _thresholds_shown(key: ApiKey) -> dict[str, Any]:
    """The key's alert thresholds as they apply: its own, else its owner's."""
    rows = {
        (row.key_id is not None): row.percents
        for row in AlertThresholds.objects.filter(Q(key=key) | Q(user_id=key.user_id))
    }
    own = rows.get(True) or []
    return {
        "percents": own or rows.get(False) or [],
        "inherited": not own and bool(rows.get(False)),
    }


@require_GET
@console_page(read=EVERYONE)
def key_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return _detail(request, _key_or_404(request, pk))


def _secret_page(
    request: HttpRequest, key: ApiKey, raw: str, *, rotated: ApiKey | None = None
) -> HttpResponse:
    # The one response that holds the secret: its views are @never_cache (no-store).
    return render(
        request,
        "keys/console/key_secret.html",
        {"key": key, "raw": raw, "rotated": rotated},
        status=201,
    )


@never_cache
@require_http_methods(["GET", "POST"])
@console_page(read=MEMBERS_AND_ADMINS, write=MEMBERS_AND_ADMINS)
def key_create(request: HttpRequest) -> HttpResponse:
    user: User = request.user  # type: ignore[assignment]
    if _is_admin(user):
        return _admin_create(request)
    if not settings.SWITCHBOARD_MEMBER_KEYS:
        raise PermissionDenied(_("Ask an admin for a key."))
    form = MemberKeyForm(request.POST or None)
    policy = policy_for(user)
    context = {
        "form": form,
        "admin": False,
        "policy": policy,
        "held": usable_keys(user),
        "limits": [(_label(name), value) for name, value in member_limits(policy).items()],
    }
    if request.method == "POST" and form.is_valid():
        try:
            key, raw = do_create_member_key(
                user=user,
                name=form.cleaned_data["name"],
                models=form.cleaned_data["allowed_models"],
                expires_at=form.cleaned_data["expires_at"],
            )
        except KeyActionError as exc:
            form.add_error(None, str(exc))
        else:
            return _secret_page(request, key, raw)
    status = 400 if request.method == "POST" else 200
    return render(request, "keys/console/key_form.html", context, status=status)


def _admin_create(request: HttpRequest) -> HttpResponse:
    initial: dict[str, Any] = {
        field: value or None for field, value in settings.SWITCHBOARD_KEY_DEFAULTS.items()
    }
    if request.GET.get("user"):
        initial["user"] = request.GET["user"].strip().lower()
    form = ConsoleKeyCreateForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            with transaction.atomic():  # the key and its thresholds, or neither
                key, raw = do_create_key(
                    user=data["user"],
                    name=data["name"],
                    models=data["allowed_models"],
                    expires_at=data["expires_at"],
                    limits={field: data[field] for field in LIMIT_FIELDS},
                )
                if data["alert_thresholds"]:
                    do_set_alert_thresholds(key=key, percents=data["alert_thresholds"])
        except KeyActionError as exc:
            form.add_error(None, str(exc))
        else:
            return _secret_page(request, key, raw)
    status = 400 if request.method == "POST" else 200
    return render(
        request, "keys/console/key_form.html", {"form": form, "admin": True}, status=status
    )


@require_http_methods(["GET", "POST"])
@console_page(read=ADMINS, write=ADMINS)
def key_edit(request: HttpRequest, pk: int) -> HttpResponse:
    key = get_object_or_404(ApiKey.objects.select_related("user"), pk=pk)
    form = ConsoleKeyForm(request.POST or None, instance=ApiKey.objects.get(pk=pk))
    if request.method == "POST" and form.is_valid():
        changes = {name: form.cleaned_data[name] for name in form.changed_data}
        thresholds = changes.pop("alert_thresholds", None)
        try:
            with transaction.atomic():  # the key's settings and its thresholds together
                do_edit_key(key=key, **changes)
                if thresholds is not None:
                    do_set_alert_thresholds(key=key, percents=thresholds)
        except KeyActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Key saved."))
            return redirect("console:key", pk=key.pk)
    status = 400 if request.method == "POST" else 200
    return render(request, "keys/console/key_edit.html", {"form": form, "key": key}, status=status)


def _changeable(request: HttpRequest, pk: int) -> ApiKey:
    """A key the viewer may revoke or rotate: an admin any, a member their own (else 404)."""
    key = _key_or_404(request, pk)
    if not _is_admin(request.user):
        if key.user_id != request.user.pk:
            raise Http404
        try:
            check_member_keys_allowed()
        except KeyActionError as exc:
            raise PermissionDenied(str(exc)) from None
    return key


@require_POST
@console_page(read=MEMBERS_AND_ADMINS, write=MEMBERS_AND_ADMINS)
def key_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    key = _changeable(request, pk)
    try:
        check_may_revoke(key=key)
    except KeyActionError as exc:
        return _detail(request, key, status=400, error=str(exc))
    do_revoke_key(key=key)
    messages.success(
        request, _("Key %(prefix)s… revoked: it is refused from now on.") % {"prefix": key.prefix}
    )
    return redirect("console:key", pk=key.pk)


@never_cache
@require_http_methods(["GET", "POST"])
@console_page(read=MEMBERS_AND_ADMINS, write=MEMBERS_AND_ADMINS)
def key_rotate(request: HttpRequest, pk: int) -> HttpResponse:
    key = _changeable(request, pk)
    form = RotateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        seconds = form.cleaned_data["grace"]
        try:
            new, raw = do_rotate_key(key=key, grace=timedelta(seconds=seconds) if seconds else None)
        except KeyActionError as exc:
            form.add_error(None, str(exc))
        else:
            key.refresh_from_db()
            return _secret_page(request, new, raw, rotated=key)
    status = 400 if request.method == "POST" else 200
    return render(
        request, "keys/console/key_rotate.html", {"form": form, "key": key}, status=status
    )


@require_http_methods(["GET", "POST"])
@console_page(read=ADMINS, write=ADMINS)
def key_policy(request: HttpRequest, user_id: int) -> HttpResponse:
    owner = get_object_or_404(User, pk=user_id)
    policy = policy_for(owner)
    form = KeyPolicyForm(request.POST or None, instance=policy_for(owner))
    if request.method == "POST" and form.is_valid():
        try:
            do_set_policy(user=owner, **{name: form.cleaned_data[name] for name in form.fields})
        except KeyActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, _("Key policy of %(email)s saved.") % {"email": owner.email})
            return redirect(f"{reverse('console:keys')}?user={owner.email}")
    status = 400 if request.method == "POST" else 200
    context = {"form": form, "owner": owner, "policy": policy, "held": usable_keys(owner),
               "defaults": settings.SWITCHBOARD_KEY_DEFAULTS,
               "thresholds_form": _user_thresholds_form(owner)}  # fmt: skip
    return render(request, "keys/console/key_policy.html", context, status=status)


def _user_thresholds_form(owner: User, data: Any = None) -> AlertThresholdsForm:
    row = AlertThresholds.objects.filter(user=owner).first() or AlertThresholds(user=owner)
    return AlertThresholdsForm(data, instance=row)


@require_POST
@console_page(read=ADMINS, write=ADMINS)
def user_alert_thresholds(request: HttpRequest, user_id: int) -> HttpResponse:
    """A user's budget alert thresholds (their keys without thresholds of their own)."""
    owner = get_object_or_404(User, pk=user_id)
    form = _user_thresholds_form(owner, request.POST)
    if form.is_valid():
        try:
            do_set_alert_thresholds(user=owner, percents=form.cleaned_data["percents"])
        except KeyActionError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(
                request, _("Budget alert thresholds of %(email)s saved.") % {"email": owner.email}
            )
            return redirect("console:key_policy", user_id=owner.pk)
    context = {"form": KeyPolicyForm(instance=policy_for(owner)), "owner": owner,
               "policy": policy_for(owner), "held": usable_keys(owner),
               "defaults": settings.SWITCHBOARD_KEY_DEFAULTS, "thresholds_form": form}  # fmt: skip
    return render(request, "keys/console/key_policy.html", context, status=400)


# --- Budget alerts ---


@require_GET
@console_page(read=EVERYONE)
def alert_list(request: HttpRequest) -> HttpResponse:
    """Budget alerts, newest first: all for admins and finance, a member's own keys' only."""
    rows = alerts.visible_alerts(request.user)  # type: ignore[arg-type]
    key_filter = None
    key_param = request.GET.get("key", "").strip()
    if key_param:  # one key's alerts: a key the viewer may not see shows none
        if key_param.isdigit():
            key_filter = visible_keys(request.user).filter(pk=int(key_param)).first()  # type: ignore[arg-type]
        rows = rows.filter(key=key_filter) if key_filter else rows.none()
    context = {
        "page": keyset_page(request, rows),
        "sees_all": _sees_all(request.user),
        "key_filter": key_filter,
        "currency": settings.SWITCHBOARD_CURRENCY,
        "zone": timezone.get_current_timezone_name(),
    }
    return render(request, "keys/console/alerts.html", context)


# --- Prices ---


def _price_rows(models: QuerySet[CatalogModel]) -> list[dict[str, Any]]:
    now = timezone.now()
    rows = []
    for model in models.prefetch_related(
        Prefetch("prices", queryset=ModelPrice.objects.order_by("-effective_from", "-id"))
    ):
        prices = list(model.prices.all())
        current = next((price for price in prices if price.effective_from <= now), None)
        upcoming = [price for price in prices if price.effective_from > now]
        rows.append(
            {"model": model, "current": current, "next": upcoming[-1] if upcoming else None}
        )
    return rows


def _save_price(request: HttpRequest, form: ConsolePriceForm) -> ModelPrice | None:
    if not form.is_valid():
        return None
    data = form.cleaned_data
    try:
        return do_set_price(
            model=data["model"],
            input_price=data["input_per_mtok"],
            output_price=data["output_per_mtok"],
            cached_input_price=data["cached_input_per_mtok"],
            cache_write_price=data["cache_write_per_mtok"],
            effective_from=data["effective_from"],
        )
    except KeyActionError as exc:
        form.add_error(None, str(exc))
        return None


def _price_saved(request: HttpRequest, price: ModelPrice) -> HttpResponse:
    messages.success(
        request,
        _("New price of %(model)s saved, effective from %(when)s.")
        % {
            "model": price.model.name,
            "when": timezone.localtime(price.effective_from).strftime("%Y-%m-%d %H:%M"),
        },
    )
    return redirect("console:price_history", ref=price.model.name)


@require_http_methods(["GET", "POST"])
@console_page(read=STAFF, write=ADMINS)
def price_list(request: HttpRequest) -> HttpResponse:
    form = ConsolePriceForm(request.POST or None, initial={"model": request.GET.get("model")})
    form.fields["model"].queryset = CatalogModel.objects.order_by("name")  # type: ignore[attr-defined]
    if request.method == "POST":
        price = _save_price(request, form)
        if price is not None:
            return _price_saved(request, price)
    rows = _price_rows(CatalogModel.objects.order_by("name"))
    context = {
        "rows": rows,
        "unpriced": [
            row["model"] for row in rows if row["model"].enabled and row["current"] is None
        ],
        "form": form,
        "currency": settings.SWITCHBOARD_CURRENCY,
        "zone": timezone.get_current_timezone_name(),
    }
    return render(
        request,
        "keys/console/price_list.html",
        context,
        status=400 if request.method == "POST" else 200,
    )


def _model_by_ref(ref: str) -> CatalogModel:
    model = CatalogModel.objects.filter(name=ref).first()
    if model is None and ref.isdigit():
        model = CatalogModel.objects.filter(pk=int(ref)).first()
    if model is None:
        raise Http404
    return model


@require_http_methods(["GET", "POST"])
@console_page(read=STAFF, write=ADMINS)
def price_history(request: HttpRequest, ref: str) -> HttpResponse:
    model = _model_by_ref(ref)
    data = request.POST.copy() if request.method == "POST" else None
    if data is not None:
        data["model"] = str(model.pk)  # this page prices this model only
    form = ConsolePriceForm(data, initial={"model": model.pk})
    if request.method == "POST":
        price = _save_price(request, form)
        if price is not None:
            return _price_saved(request, price)
    now = timezone.now()
    prices = list(model.prices.order_by("-effective_from", "-id"))
    current = next((price for price in prices if price.effective_from <= now), None)
    context = {
        "model": model,
        "prices": prices,
        "current": current,
        "now": now,
        "form": form,
        "currency": settings.SWITCHBOARD_CURRENCY,
        "zone": timezone.get_current_timezone_name(),
    }
    return render(
        request,
        "keys/console/price_history.html",
        context,
        status=400 if request.method == "POST" else 200,
    )
