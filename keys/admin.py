"""API keys and the usage ledger in Django's admin.

A key's secret exists only at creation: the add form issues it through
``do_create_key`` and shows it once, in a message; only its hash is stored.
Every change is audited (``accounts.audit.AuditedModelAdmin``; a new key and a
revocation by their actions, which record themselves).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from accounts.audit import AuditedModelAdmin
from keys import alerts  # noqa: F401 - registers its Celery task wherever the admin loads
from keys.actions import (
    KEY_AUDIT_FIELDS,
    PRICE_AUDIT_FIELDS,
    ROUTE_PRICE_AUDIT_FIELDS,
    THRESHOLD_AUDIT_FIELDS,
    do_create_key,
    do_revoke_key,
)
from keys.forms import (
    AlertThresholdsForm,
    KeyCreateForm,
    KeyForm,
    KeyPolicyForm,
    PriceForm,
    RoutePriceForm,
)
from keys.models import (
    AlertThresholds,
    ApiKey,
    BudgetAlert,
    KeyPolicy,
    ModelPrice,
    RoutePrice,
    UsageRecord,
)


@admin.register(ApiKey)
class ApiKeyAdmin(AuditedModelAdmin, admin.ModelAdmin):
    # The rules of keys.forms, as the commands and the console apply them.
    form = KeyForm
    audit_fields = tuple(KEY_AUDIT_FIELDS)
    add_form = KeyCreateForm
    list_display = ["prefix", "name", "user", "state", "created_at", "last_used_at"]
    list_filter = ["enabled", "is_web_key", ("revoked_at", admin.EmptyFieldListFilter)]
    list_select_related = ["user"]
    search_fields = ["prefix", "name", "user__email"]
    date_hierarchy = "created_at"
    actions = ["revoke_selected"]
    readonly_fields = [
        "user",
        "prefix",
        "key_hash",
        "state",
        "is_web_key",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    fieldsets = (
        (None, {"fields": ("user", "name", "prefix", "state", "enabled", "is_web_key")}),
        (_("Access"), {"fields": ("expires_at", "allowed_models")}),
        (
            _("Rate limits"),
            {
                "fields": (
                    "rpm",
                    "rpd",
                    "tpm",
                    "tpd",
                    "concurrency",
                    "max_output_tokens",
                    "clamp_max_tokens",
                )
            },
        ),
        (_("Budgets"), {"fields": ("token_budget", "money_budget", "budget_period")}),
        (_("History"), {"fields": ("created_at", "last_used_at", "revoked_at", "key_hash")}),
    )
    add_fieldsets = ((None, {"fields": ("user", "name", "expires_at", "allowed_models")}),)

    def get_form(
        self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm[ApiKey]]:
        if obj is None:
            kwargs["form"] = self.add_form
        return super().get_form(request, obj, change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return self.add_fieldsets if obj is None else self.fieldsets

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        return () if obj is None else self.readonly_fields

    @admin.display(description=_("state"))
    def state(self, key: ApiKey) -> str:
        return key.state

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)  # audited by the mixin
            return
        # A new key: do_create_key records it (the mixin would record it twice).
        key, raw = do_create_key(
            user=obj.user,
            name=obj.name,
            models=list(obj.allowed_models or []),
            expires_at=obj.expires_at,
        )
        # The admin carries on with ``obj`` (log entry, redirect): make it the issued row.
        for field in ApiKey._meta.concrete_fields:
            setattr(obj, field.attname, getattr(key, field.attname))
        obj._state.adding = False
        obj._state.db = key._state.db
        self.message_user(
            request,
            _(
                "New API key for %(user)s: %(key)s — copy it now: it is shown only this once "
                "and cannot be recovered."
            )
            % {"user": key.user.email, "key": raw},
            messages.WARNING,
        )

    @admin.action(description=_("Revoke selected keys"))
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = 0
        for key in queryset:
            if key.revoked_at is None:
                do_revoke_key(key=key)
                revoked += 1
        self.message_user(
            request,
            ngettext("%(count)d key revoked.", "%(count)d keys revoked.", revoked)
            % {"count": revoked},
            messages.SUCCESS,
        )


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    """The ledger is written by the relay only; here it can be read, never edited."""

    list_display = [
        "created_at",
        "user",
        "key",
        "model",
        "provider",
        "upstream_model",
        "status",
        "http_status",
        "input_tokens",
        "output_tokens",
        "cost",
        "priced",
        "latency_ms",
    ]
    list_filter = ["status", "dialect", "model", "endpoint", "stream", "priced"]
    list_select_related = ["user", "key"]
    search_fields = ["request_id", "model", "user__email", "key__prefix"]
    date_hierarchy = "created_at"
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False


@admin.register(ModelPrice)
class ModelPriceAdmin(AuditedModelAdmin, admin.ModelAdmin):
    """Prices are history: add a new row to change a price, never edit an old one."""

    form = PriceForm
    audit_fields = tuple(PRICE_AUDIT_FIELDS)
    list_display = [
        "model",
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "currency",
        "effective_from",
    ]
    list_filter = ["model", "currency"]
    date_hierarchy = "effective_from"
    fields = [
        "model",
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "effective_from",
    ]

    def has_change_permission(self, request: HttpRequest, obj: ModelPrice | None = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: ModelPrice, form: Any, change: bool) -> None:
        obj.currency = settings.SWITCHBOARD_CURRENCY
        super().save_model(request, obj, form, change)


@admin.register(KeyPolicy)
class KeyPolicyAdmin(AuditedModelAdmin, admin.ModelAdmin):
    """Caps on the keys a member creates for themselves (also in the console's key pages)."""

    form = KeyPolicyForm
    list_display = ["user", "max_keys", "rpm", "tpm", "money_budget", "updated_at"]
    list_select_related = ["user"]
    search_fields = ["user__email"]
    raw_id_fields = ["user"]

    def get_fields(self, request: HttpRequest, obj: KeyPolicy | None = None) -> Any:
        return ["user", *KeyPolicyForm._meta.fields]  # type: ignore[misc]


@admin.register(RoutePrice)
class RoutePriceAdmin(AuditedModelAdmin, admin.ModelAdmin):
    """Upstream prices are history: add a new row to change one, never edit or delete one."""

    form = RoutePriceForm
    audit_fields = tuple(ROUTE_PRICE_AUDIT_FIELDS)
    list_display = [
        "route",
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "currency",
        "effective_from",
    ]
    list_select_related = ["route__model", "route__provider"]
    list_filter = ["route__provider", "currency"]
    date_hierarchy = "effective_from"
    fields = [
        "route",
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "effective_from",
    ]

    def has_change_permission(self, request: HttpRequest, obj: RoutePrice | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: RoutePrice | None = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: RoutePrice, form: Any, change: bool) -> None:
        obj.currency = settings.SWITCHBOARD_CURRENCY
        super().save_model(request, obj, form, change)


class AlertThresholdsAdminForm(AlertThresholdsForm):
    class Meta:
        model = AlertThresholds
        fields = ["key", "user", "percents"]


@admin.register(AlertThresholds)
class AlertThresholdsAdmin(AuditedModelAdmin, admin.ModelAdmin):
    """Budget alert thresholds of a key or of a user (also on the console's key pages)."""

    form = AlertThresholdsAdminForm
    audit_fields = tuple(THRESHOLD_AUDIT_FIELDS)
    list_display = ["key", "user", "percents", "updated_at"]
    list_select_related = ["key", "user"]
    search_fields = ["user__email", "key__prefix"]
    raw_id_fields = ["key", "user"]


@admin.register(BudgetAlert)
class BudgetAlertAdmin(admin.ModelAdmin):
    """Budget alerts are recorded by the ledger writer only: read here, never edited."""

    list_display = [
        "created_at",
        "key",
        "user",
        "kind",
        "threshold",
        "spent",
        "budget",
        "period_start",
        "emailed_at",
    ]
    list_filter = ["kind", "period", "threshold"]
    list_select_related = ["key", "user"]
    search_fields = ["user__email", "key__prefix"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: BudgetAlert | None = None) -> bool:
        return False
