from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from accounts.actions import USER_FIELDS
from accounts.audit import AuditedModelAdmin
from accounts.forms import UserChangeForm, UserCreationForm
from accounts.models import AuditEvent, User
from accounts.views import admin_login

# One sign-in page and one throttle: the admin's own login form would be a second,
# unthrottled way to guess passwords.  The admin sends visitors here with ``next``.
admin.site.login = admin_login  # type: ignore[method-assign]


@admin.register(User)
class UserAdmin(AuditedModelAdmin, BaseUserAdmin):
    form = UserChangeForm
    add_form = UserCreationForm
    audit_fields = (*USER_FIELDS, "password")
    ordering = ["email"]
    list_display = ["email", "name", "role", "is_active", "date_joined"]
    list_filter = ["role", "is_active"]
    search_fields = ["email", "name"]
    # The superuser flag follows the role (User.save): shown, never edited.
    readonly_fields = ["is_superuser", "last_login", "date_joined"]
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        (_("Profile"), {"fields": ("name", "role")}),
        (_("Status"), {"fields": ("is_active", "is_superuser")}),
        (_("Dates"), {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = (
        (None, {"classes": ("wide",), "fields": ("email", "role", "password1", "password2")}),
    )
    filter_horizontal = ()


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """The audit log, read-only: nobody adds, changes or deletes an event here."""

    list_display = ["created_at", "actor_label", "source", "action", "object_type", "object_repr"]
    list_filter = ["source", "object_type"]
    search_fields = ["actor_label", "object_repr"]
    date_hierarchy = "created_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
