"""People: a custom user who signs in by email and holds one role."""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.contrib.auth.models import PermissionsMixin
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class Role(models.TextChoices):
    MEMBER = "member", _("Member")  # chats, manages their own keys
    ADMIN = "admin", _("Admin")  # manages everything
    FINANCE = "finance", _("Finance")  # reads usage and cost reports


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def create_user(self, email: str, password: str | None = None, **extra: Any) -> User:
        if not email:
            raise ValueError("An email address is required")
        user = self.model(email=User.normalize_address(email), **extra)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.full_clean(exclude=["password"])
        user.save(using=self._db)
        return user

    def create_superuser(self, email: str, password: str | None = None, **extra: Any) -> User:
        # ``createsuperuser``: the admin role is what makes a superuser (User.save).
        extra["role"] = Role.ADMIN
        extra.pop("is_superuser", None)
        return self.create_user(email, password, **extra)

    def get_by_natural_key(self, username: str | None) -> User:
        return self.get(email=User.normalize_address(username or ""))


class User(AbstractBaseUser, PermissionsMixin):
    email = models.EmailField(_("email address"), unique=True)
    name = models.CharField(_("name"), max_length=150, blank=True)
    role = models.CharField(_("role"), max_length=16, choices=Role.choices, default=Role.MEMBER)
    is_active = models.BooleanField(
        _("active"),
        default=True,
        help_text=_("Disabled users cannot sign in; their sessions and keys stop working."),
    )
    date_joined = models.DateTimeField(_("date joined"), default=timezone.now)

    objects: ClassVar[UserManager] = UserManager()

    EMAIL_FIELD = "email"
    USERNAME_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    class Meta:
        verbose_name = _("user")
        verbose_name_plural = _("users")
        ordering = ["email"]
        # The console's user list filters by role and status and pages by id
        # (accounts.console.keyset_page): each filter is one index range scan.
        indexes = [
            models.Index(fields=["role", "id"], name="user_role_id"),
            models.Index(fields=["is_active", "id"], name="user_active_id"),
        ]

    def __str__(self) -> str:
        return self.email

    @staticmethod
    def normalize_address(email: str) -> str:
        """Emails are compared case-insensitively: store them lower-cased."""
        return email.strip().lower()

    def clean(self) -> None:
        super().clean()
        self.email = self.normalize_address(self.email)

    def save(self, *args: Any, **kwargs: Any) -> None:
        # The role is the one source of truth for rights: whichever way it is set
        # (the console, the Django admin's form, a command, the shell), the admin
        # role and Django's superuser flag (the admin site, every permission) agree.
        self.is_superuser = self.role == Role.ADMIN
        update_fields = kwargs.get("update_fields")
        if update_fields is not None and "role" in update_fields:
            kwargs["update_fields"] = {*update_fields, "is_superuser"}
        super().save(*args, **kwargs)

    @property
    def is_staff(self) -> bool:
        """Django's admin site is for superusers only."""
        return self.is_superuser

    def has_role(self, *roles: str) -> bool:
        """True for an active user holding one of ``roles``; admins hold them all."""
        if not self.is_active:
            return False
        return self.role == Role.ADMIN or self.role in roles


class AuditSource(models.TextChoices):
    CONSOLE = "console", _("Console")
    ADMIN = "admin", _("Django admin")
    COMMAND = "command", _("Command line")


class AuditEvent(models.Model):
    """One change an admin made, in the console, the Django admin or a command.

    Append-only: rows are created by ``accounts.audit.record`` and never changed or
    deleted (``save`` refuses an update; the admin shows them read-only).  ``changes``
    maps each changed field to ``[before, after]``, secrets already masked.
    """

    created_at = models.DateTimeField(_("time"), default=timezone.now, db_index=True)
    actor = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_label = models.CharField(_("actor"), max_length=254)
    source = models.CharField(_("source"), max_length=16, choices=AuditSource.choices)
    action = models.CharField(_("action"), max_length=32)
    object_type = models.CharField(_("object type"), max_length=64)
    object_id = models.CharField(_("object id"), max_length=64, blank=True)
    object_repr = models.CharField(_("object"), max_length=200, blank=True)
    changes = models.JSONField(_("changes"), default=dict, blank=True)
    address = models.CharField(_("client address"), max_length=64, blank=True)

    class Meta:
        verbose_name = _("audit event")
        verbose_name_plural = _("audit log")
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["object_type", "-created_at"], name="audit_type_time"),
            models.Index(fields=["actor", "-created_at"], name="audit_actor_time"),
        ]

    def __str__(self) -> str:
        return f"{self.actor_label} {self.action} {self.object_type} {self.object_repr}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        # The log is evidence: a row once written is never rewritten.
        if not self._state.adding:
            raise ValueError("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("audit events are append-only")
