"""API keys and the usage ledger."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

KEY_PREFIX = "sk-"
KEY_RANDOM_LENGTH = 48
VISIBLE_PREFIX_LENGTH = 12


def hash_key(raw_key: str) -> str:
    """SHA-256 of the full key.

    The key carries 48 random characters (~285 bits), so a fast unsalted hash is
    safe here and lets every request find its key with one indexed lookup.
    """
    return hashlib.sha256(raw_key.encode()).hexdigest()


def generate_key() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return KEY_PREFIX + "".join(secrets.choice(alphabet) for _ in range(KEY_RANDOM_LENGTH))


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def by_prefix_or_id(self, ref: str) -> ApiKey:
        """One key named by its id or its visible prefix (``sk-AbCdEfGh``)."""
        if ref.isdigit():
            return self.get(pk=int(ref))
        matches = list(self.filter(prefix__startswith=ref)[:2]) if len(ref) >= 6 else []
        if len(matches) != 1:
            raise self.model.DoesNotExist(
                f"no key with id or prefix {ref!r}"
                if not matches
                else f"prefix {ref!r} is ambiguous"
            )
        return matches[0]


class ApiKey(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(_("name"), max_length=100, blank=True)
    prefix = models.CharField(
        _("prefix"), max_length=VISIBLE_PREFIX_LENGTH, db_index=True, editable=False
    )
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    enabled = models.BooleanField(_("enabled"), default=True)
    expires_at = models.DateTimeField(_("expires at"), null=True, blank=True)
    allowed_models = models.JSONField(
        _("allowed models"),
        default=list,
        blank=True,
        help_text=_("Public model names this key may use; empty means every enabled model."),
    )
    is_web_key = models.BooleanField(
        _("web key"), default=False, help_text=_("The user's browser-chat key.")
    )
    created_at = models.DateTimeField(_("created at"), default=timezone.now)
    last_used_at = models.DateTimeField(_("last used at"), null=True, blank=True)
    revoked_at = models.DateTimeField(_("revoked at"), null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = _("API key")
        verbose_name_plural = _("API keys")

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'unnamed'})"

    @classmethod
    def issue(cls, *, user: Any, name: str = "", **fields: Any) -> tuple[ApiKey, str]:
        """A new key and its full secret, which is shown once and never stored."""
        raw = generate_key()
        key = cls.objects.create(
            user=user,
            name=name,
            prefix=raw[:VISIBLE_PREFIX_LENGTH],
            key_hash=hash_key(raw),
            **fields,
        )
        return key, raw

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if not self.enabled:
            return "disabled"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"


class UsageStatus(models.TextChoices):
    OK = "ok", _("ok")
    ERROR = "error", _("error")
    CLIENT_DISCONNECTED = "client_disconnected", _("client disconnected")


class UsageRecord(models.Model):
    """One row per relayed request, whatever its outcome."""

    created_at = models.DateTimeField(_("time"), default=timezone.now, db_index=True)
    request_id = models.CharField(max_length=64, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, related_name="usage_records"
    )
    key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, related_name="usage_records"
    )
    endpoint = models.CharField(max_length=32)  # chat.completions, messages, embeddings, browser
    dialect = models.CharField(max_length=16)  # openai, anthropic, browser
    model = models.CharField(max_length=128)  # the public name the client asked for
    provider = models.CharField(max_length=64, blank=True)
    route_id = models.BigIntegerField(null=True, blank=True)
    upstream_model = models.CharField(max_length=200, blank=True)
    stream = models.BooleanField(default=False)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    estimated = models.BooleanField(
        default=False, help_text=_("Token counts are a local estimate: the upstream reported none.")
    )
    status = models.CharField(max_length=24, choices=UsageStatus.choices)
    http_status = models.PositiveSmallIntegerField(default=200)
    error_type = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["key", "created_at"]),
            models.Index(fields=["user", "created_at"]),
            models.Index(fields=["model", "created_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model} {self.status}"
