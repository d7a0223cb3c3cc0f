"""The catalog in Django's admin: providers, models and their routes.

Enable/disable actions go through ``chatapp.actions`` row by row rather than
``queryset.update()``, so the post_save signals refresh the relay's cached catalog
(``chatapp.apps``) and each change is in the audit log.  Edits are audited too
(``AuditedModelAdmin``; the provider's credential and the model's inline routes by
hand below), with the same field lists and masking as the actions.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from accounts import audit
from accounts.audit import AuditedModelAdmin
from chatapp import actions
from chatapp.models import CatalogModel, Provider, Route


class ProviderForm(forms.ModelForm):
    """Takes a new API key but never shows the stored one; blank keeps it."""

    api_key = forms.CharField(
        label=_("API key"),
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text=_("Stored encrypted. Leave blank to keep the current key."),
    )
    clear_api_key = forms.BooleanField(
        label=_("Remove the stored API key"),
        required=False,
        help_text=_("For upstreams that need no key, such as a local Ollama."),
    )

    class Meta:
        model = Provider
        fields = ["name", "type", "base_url", "timeout", "extra_headers", "enabled"]

    def save(self, commit: bool = True) -> Provider:
        provider: Provider = super().save(commit=False)
        if self.cleaned_data.get("api_key"):
            provider.api_key = self.cleaned_data["api_key"]
        elif self.cleaned_data.get("clear_api_key"):
            provider.api_key = ""
        if commit:
            provider.save()
        return provider


def _set_enabled(
    admin_: admin.ModelAdmin[Any], request: HttpRequest, queryset: QuerySet[Any], enabled: bool
) -> None:
    changed = 0
    with audit.acting_for(request):
        for obj in queryset:
            if obj.enabled == enabled:
                continue
            if isinstance(obj, Provider):
                actions.do_set_provider_enabled(name=obj.name, enabled=enabled)
            elif isinstance(obj, CatalogModel):
                actions.do_set_model_enabled(name=obj.name, enabled=enabled)
            else:
                actions.do_update_route(route=obj, changes={"enabled": enabled})
            changed += 1
    admin_.message_user(
        request,
        ngettext("%(count)d row changed.", "%(count)d rows changed.", changed) % {"count": changed},
        messages.SUCCESS,
    )


@admin.action(description=_("Enable selected"))
def enable_selected(
    modeladmin: admin.ModelAdmin[Any], request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    _set_enabled(modeladmin, request, queryset, True)


@admin.action(description=_("Disable selected"))
def disable_selected(
    modeladmin: admin.ModelAdmin[Any], request: HttpRequest, queryset: QuerySet[Any]
) -> None:
    _set_enabled(modeladmin, request, queryset, False)


@admin.register(Provider)
class ProviderAdmin(AuditedModelAdmin, admin.ModelAdmin):
    form = ProviderForm
    audit_fields = actions.PROVIDER_FIELDS
    list_display = ["name", "type", "base_url", "has_api_key", "enabled", "route_count"]
    list_filter = ["type", "enabled"]
    search_fields = ["name", "base_url"]
    actions = [enable_selected, disable_selected]
    fieldsets = (
        (None, {"fields": ("name", "type", "base_url", "enabled")}),
        (_("Credentials"), {"fields": ("api_key", "clear_api_key")}),
        (_("Connection"), {"fields": ("timeout", "extra_headers")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Provider]:
        return super().get_queryset(request).annotate(route_count=Count("routes"))

    def save_model(self, request: HttpRequest, obj: Provider, form: Any, change: bool) -> None:
        replaced = change and bool(form.cleaned_data.get("api_key"))
        if not replaced:
            super().save_model(request, obj, form, change)
            return
        # A replaced key is masked on both sides, so the mixin's diff cannot see it.
        stored = Provider.objects.get(pk=obj.pk)
        before = audit.snapshot(stored, actions.PROVIDER_FIELDS)
        admin.ModelAdmin.save_model(self, request, obj, form, change)
        changes = audit.diff(before, audit.snapshot(obj, actions.PROVIDER_FIELDS))
        changes["api_key"] = [before["api_key"], audit.SECRET_SHOWN]
        with audit.acting_for(request):
            audit.record("update", obj, changes=changes)

    @admin.display(boolean=True, description=_("API key set"))
    def has_api_key(self, provider: Provider) -> bool:
        return bool(provider.api_key_encrypted)

    @admin.display(description=_("routes"), ordering="route_count")
    def route_count(self, provider: Provider) -> int:
        return provider.route_count  # type: ignore[attr-defined]


class RouteInline(admin.TabularInline):
    model = Route
    extra = 1
    fields = ["provider", "upstream_model", "priority", "weight", "enabled"]


@admin.register(CatalogModel)
class CatalogModelAdmin(AuditedModelAdmin, admin.ModelAdmin):
    inlines = [RouteInline]
    audit_fields = actions.MODEL_FIELDS
    list_display = [
        "name",
        "display_name",
        "supports_chat",
        "supports_vision",
        "supports_tools",
        "supports_embeddings",
        "enabled",
        "is_chat_default",
        "route_count",
    ]
    list_filter = [
        "enabled",
        "supports_chat",
        "supports_vision",
        "supports_tools",
        "supports_embeddings",
    ]
    search_fields = ["name", "display_name", "routes__upstream_model"]
    actions = [enable_selected, disable_selected]
    fieldsets = (
        (None, {"fields": ("name", "display_name", "description", "enabled", "is_chat_default")}),
        (
            _("Capabilities"),
            {
                "fields": (
                    "supports_chat",
                    "supports_vision",
                    "supports_tools",
                    "supports_embeddings",
                    "context_window",
                    "max_output_tokens",
                )
            },
        ),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[CatalogModel]:
        return super().get_queryset(request).annotate(route_count=Count("routes", distinct=True))

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        """The inline routes, each added, changed or deleted route audited."""
        if formset.model is not Route:
            super().save_formset(request, form, formset, change)
            return
        # Read the stored rows first: validation already changed the forms' instances.
        pks = [f.instance.pk for f in formset.forms if f.instance.pk is not None]
        before = {
            route.pk: audit.snapshot(route, actions.ROUTE_FIELDS)
            for route in Route.objects.filter(pk__in=pks).select_related("model", "provider")
        }
        super().save_formset(request, form, formset, change)
        with audit.acting_for(request):
            for route in formset.new_objects:
                after = audit.snapshot(route, actions.ROUTE_FIELDS)
                audit.record("create", route, changes=audit.diff({}, after))
            for route, _fields in formset.changed_objects:
                changes = audit.diff(
                    before.get(route.pk, {}), audit.snapshot(route, actions.ROUTE_FIELDS)
                )
                if changes:
                    audit.record("change", route, changes=changes)
            for route in formset.deleted_objects:
                audit.record("delete", route, changes=audit.diff(before.get(route.pk, {}), {}))

    @admin.display(description=_("routes"), ordering="route_count")
    def route_count(self, model: CatalogModel) -> int:
        return model.route_count  # type: ignore[attr-defined]


@admin.register(Route)
class RouteAdmin(AuditedModelAdmin, admin.ModelAdmin):
    audit_fields = actions.ROUTE_FIELDS
    list_display = ["model", "provider", "upstream_model", "priority", "weight", "enabled"]
    list_filter = ["enabled", "provider"]
    list_select_related = ["model", "provider"]
    search_fields = ["model__name", "upstream_model", "provider__name"]
    actions = [enable_selected, disable_selected]
