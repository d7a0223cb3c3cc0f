"""The model catalog: upstream providers, the models clients ask for, and the routes between.

Admins manage these rows; the relay reads them through ``chatapp.relay.catalog``,
which caches them per process and drops its copy whenever any row changes.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, URLValidator
from django.db import models
from django.utils.translation import gettext_lazy as _

from chatapp import credentials


class ProviderType(models.TextChoices):
    OPENAI = "openai", _("OpenAI-compatible")
    ANTHROPIC = "anthropic", _("Anthropic Messages API")
    GEMINI = "gemini", _("Google Gemini API")
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
            "servers, https://api.anthropic.com (no /v1) for Anthropic, "
            "https://generativelanguage.googleapis.com (no /v1beta) for Gemini."
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
        from chatapp.relay import upstreams

        super().clean()
        self.base_url = self.base_url.strip().rstrip("/")
        try:
            upstream = upstreams.get(self.type)
        except LookupError:
            return  # the field's choices already name the problem
        if upstream.needs_base_url:
            try:
                URLValidator(schemes=["http", "https"])(self.base_url)
            except ValidationError:
                raise ValidationError(
                    {"base_url": _("Enter an http:// or https:// URL.")}
                ) from None
        if not isinstance(self.extra_headers, dict) or not all(
            isinstance(key, str) and isinstance(value, str)
            for key, value in self.extra_headers.items()
        ):
            raise ValidationError(
                {"extra_headers": _("Enter an object of header names to strings.")}
            )
        upstream.clean_provider(self)


def validate_param_rules(value: Any) -> None:
    """The stored form of parameter rules: a list of {"param", "action", "value"} objects."""
    from chatapp.relay import params

    if not isinstance(value, list):
        raise ValidationError(_("Parameter rules must be a list."))
    try:
        text = params.as_text(
            [
                params.Rule(str(item["param"]), str(item["action"]), item.get("value"))
                for item in value
            ]
        )
        params.parse_text(text)
    except (KeyError, TypeError, params.RuleError) as exc:
        raise ValidationError(_("Invalid parameter rules: %(error)s") % {"error": exc}) from None


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
    # What the upstream model accepts (chatapp.relay.params): [{"param", "action", "value"}].
    param_rules = models.JSONField(
        _("parameter rules"), default=list, blank=True, validators=[validate_param_rules]
    )
    fold_system = models.BooleanField(
        _("fold the system message into the first user turn"),
        default=False,
        help_text=_("For models that refuse system messages."),
    )
    enabled = models.BooleanField(_("enabled"), default=True)
    is_chat_default = models.BooleanField(
        _("default for new chats"),
        default=False,
        help_text=_(
            "The model a new browser chat starts with (at most one). Without one, the "
            "local model is the default."
        ),
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = _("model")
        verbose_name_plural = _("models")
        constraints = [
            models.UniqueConstraint(
                fields=["is_chat_default"],
                condition=models.Q(is_chat_default=True),
                name="one_default_chat_model",
                violation_error_message=_("Another model is already the default for new chats."),
            )
        ]

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


# --- The browser chat: conversations, messages (one row each), attachments. ---


class ConversationQuerySet(models.QuerySet["Conversation"]):
    def visible_to(self, user: Any) -> ConversationQuerySet:
        return self.filter(owner=user)

    def search(self, query: str) -> ConversationQuerySet:
        """Title or any message's text contains ``query`` (case-insensitive)."""
        query = query.strip()
        if not query:
            return self
        return self.filter(
            models.Q(title__icontains=query) | models.Q(messages__content__icontains=query)
        ).distinct()


class Conversation(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="conversations"
    )
    title = models.CharField(_("title"), max_length=200, blank=True)
    title_generated = models.BooleanField(default=False)
    model = models.CharField(_("model"), max_length=128)
    system_prompt = models.TextField(_("system prompt"), blank=True)
    temperature = models.FloatField(
        _("temperature"),
        null=True,
        blank=True,
        validators=[MinValueValidator(0.0), MaxValueValidator(2.0)],
    )
    # The last message of the branch on display; each edit or regeneration starts
    # a sibling branch, and switching moves this pointer.
    current_leaf = models.ForeignKey(
        "Message", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    objects = ConversationQuerySet.as_manager()

    class Meta:
        ordering = ["-updated_at", "-id"]
        indexes = [models.Index(fields=["owner", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"

    def messages_with_attachments(self) -> list[Message]:
        """Every message with its attachments (``Message.attached``), oldest first (two queries)."""
        return list(
            Message.objects.filter(conversation_id=self.pk)
            .prefetch_related(models.Prefetch("attachments", to_attr=ATTACHED))
            .order_by("created_at", "id")
        )

    def branch(self, messages: list[Message] | None = None) -> list[Message]:
        """The messages on display, oldest first: the current leaf and its ancestors.

        ``messages``: the conversation's messages when the caller has them already.
        """
        if self.current_leaf_id is None:
            return []
        if messages is None:
            messages = list(self.messages.all())
        by_id = {message.pk: message for message in messages}
        path: list[Message] = []
        node = by_id.get(self.current_leaf_id)
        while node is not None:
            path.append(node)
            node = by_id.get(node.parent_id) if node.parent_id is not None else None
        path.reverse()
        return path


class MessageStatus(models.TextChoices):
    STREAMING = "streaming", _("streaming")
    COMPLETE = "complete", _("complete")
    STOPPED = "stopped", _("stopped")
    FAILED = "failed", _("failed")
    INTERRUPTED = "interrupted", _("interrupted")  # its process died or shut down mid-reply


# Where a message keeps its attachments once read (``Message.attached``).
ATTACHED = "attached_list"


class Message(models.Model):
    conversation = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="messages"
    )
    parent = models.ForeignKey(
        "self", on_delete=models.CASCADE, null=True, blank=True, related_name="children"
    )
    role = models.CharField(max_length=16, choices=[("user", "user"), ("assistant", "assistant")])
    content = models.TextField(blank=True)
    # The model's reasoning before its answer (a reply's thinking), shown folded above it.
    reasoning = models.TextField(blank=True)
    model = models.CharField(max_length=128, blank=True)
    status = models.CharField(
        max_length=16, choices=MessageStatus.choices, default=MessageStatus.COMPLETE
    )
    error = models.TextField(blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=24, decimal_places=12, default=0)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    left_out = models.PositiveIntegerField(
        default=0, help_text=_("Earlier turns left out of the request to fit the context window.")
    )
    request_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["conversation", "parent"])]

    def __str__(self) -> str:
        return f"{self.role} #{self.pk}"

    def attached(self) -> list[Attachment]:
        """Its attachments: as read or written with it, else read now (and kept).

        A plain list, not a prefetched queryset: Django builds a filtered queryset per
        message to hold one, which cost a send more than any of its INSERTs.
        """
        found: list[Attachment] | None = getattr(self, ATTACHED, None)
        if found is None:
            found = list(self.attachments.all())
            setattr(self, ATTACHED, found)
        return found

    def siblings(self) -> list[Message]:
        """This message's versions: same parent, same role (edits and regenerations)."""
        return list(
            Message.objects.filter(
                conversation_id=self.conversation_id, parent_id=self.parent_id, role=self.role
            ).order_by("created_at", "id")
        )

    def latest_leaf(self) -> Message:
        """Follow the most recent child down to the end of this message's own branch."""
        node = self
        while True:
            child = node.children.order_by("-created_at", "-id").first()
            if child is None:
                return node
            node = child


def attachment_path(instance: Attachment, filename: str) -> str:
    return f"attachments/{instance.owner_id}/{uuid.uuid4().hex}{Path(filename).suffix.lower()}"


class Attachment(models.Model):
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="attachments"
    )
    message = models.ForeignKey(
        Message, on_delete=models.CASCADE, null=True, blank=True, related_name="attachments"
    )
    file = models.FileField(upload_to=attachment_path)
    media_type = models.CharField(max_length=32)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    size = models.PositiveIntegerField()
    original_name = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return self.original_name or str(self.file)
