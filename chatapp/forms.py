"""The catalog's console forms: field-level checks before ``chatapp.actions`` writes.

Each form validates with the model's own ``full_clean`` (a ModelForm), so the console
refuses exactly what the management commands and the admin refuse; the ``do_*``
action then writes and records the change.  A form never writes by itself.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.utils.translation import gettext_lazy as _

from chatapp.models import CatalogModel, Provider, ProviderType, Route
from chatapp.relay import params, upstreams


def provider_type_choices() -> list[tuple[str, Any]]:
    """The registered upstream types (``upstreams.UPSTREAMS``), with readable names."""
    labels = dict(ProviderType.choices)
    return [(name, labels.get(name, name)) for name in upstreams.UPSTREAMS]


class ProviderForm(forms.ModelForm):
    """A provider's connection.  The credential is write-only: never rendered back."""

    api_key = forms.CharField(
        label=_("API key"),
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
    )

    class Meta:
        model = Provider
        fields = ["name", "type", "base_url", "model_path", "timeout"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["type"] = forms.ChoiceField(
            label=_("Type"), choices=provider_type_choices(), initial=ProviderType.OPENAI
        )
        stored = self.instance.pk is not None and bool(self.instance.api_key_encrypted)
        self.fields["api_key"].label = _("Replace API key") if stored else _("API key")
        self.fields["api_key"].help_text = (
            _("Stored encrypted, never shown. Leave blank to keep the current key.")
            if stored
            else _("Stored encrypted, never shown. Leave blank for upstreams that need none.")
        )
        self.fields["model_path"].required = False
        self.fields["name"].label = _("Name")
        for name in ("name", "base_url", "model_path"):
            self.fields[name].widget.attrs["autocomplete"] = "off"

    def changes(self) -> dict[str, Any]:
        """The provider fields as validated (for ``do_add_provider`` / ``do_update_provider``).

        Read from the form's own instance: the model's ``clean()`` normalised them
        there (the base URL's trailing slash, a local model's default file).
        """
        return {name: getattr(self.instance, name) for name in self.Meta.fields}


class ParamRulesField(forms.CharField):
    """Parameter rules as text, one per line (``temperature: drop``), stored as JSON."""

    widget = forms.Textarea(attrs={"rows": 4, "spellcheck": "false", "class": "mono"})

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list):
            return params.as_text(params.from_json(value))
        return value

    def to_python(self, value: Any) -> list[dict[str, Any]]:  # type: ignore[override]
        text = super().to_python(value) or ""
        try:
            return [rule.as_json() for rule in params.parse_text(text)]
        except params.RuleError as exc:
            raise ValidationError(str(exc)) from None


class ModelForm(forms.ModelForm):
    """A catalog model's description, capabilities and parameter rules."""

    param_rules = ParamRulesField(
        label=_("Parameter rules"),
        required=False,
        help_text=_(
            "What the upstream model accepts, one rule per line, for the body sent upstream: "
            "“temperature: drop”, “max_tokens: rename max_completion_tokens”, “top_p: fix 1”, "
            "“logprobs: refuse” (a 400 naming the parameter). A dot reaches into nested "
            "objects: “generationConfig.temperature: drop”."
        ),
    )

    class Meta:
        model = CatalogModel
        fields = [
            "display_name",
            "description",
            "context_window",
            "max_output_tokens",
            "supports_chat",
            "supports_vision",
            "supports_tools",
            "supports_embeddings",
            "param_rules",
            "fold_system",
        ]
        widgets = {"description": forms.Textarea(attrs={"rows": 3})}


class AddModelForm(forms.Form):
    """A new model routed to one provider (or one more route for a model that exists)."""

    name = forms.CharField(
        label=_("Public name"),
        max_length=128,
        help_text=_("What clients put in the request's model field."),
    )
    provider = forms.ModelChoiceField(
        label=_("Provider"), queryset=Provider.objects.order_by("name"), to_field_name="name"
    )
    upstream_model = forms.CharField(label=_("Upstream model"), max_length=200)
    priority = forms.IntegerField(label=_("Priority"), initial=0)
    weight = forms.IntegerField(label=_("Weight"), initial=1, min_value=1)


class RouteForm(forms.ModelForm):
    """One route of a model, edited in place."""

    class Meta:
        model = Route
        fields = ["provider", "upstream_model", "priority", "weight", "enabled"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        provider = self.fields["provider"]
        assert isinstance(provider, forms.ModelChoiceField)
        provider.queryset = Provider.objects.order_by("name")
        provider.empty_label = None
        self.fields["upstream_model"].widget.attrs["autocomplete"] = "off"
        if self.instance.pk is not None:
            # Edited in a table row: the inputs sit in the row's cells, tied to the
            # one <form> in its last cell (a form cannot wrap a <tr>).
            for field in self.fields.values():
                field.widget.attrs["form"] = f"route-form-{self.instance.pk}"

    def changes(self) -> dict[str, Any]:
        return {name: self.cleaned_data[name] for name in self.Meta.fields}


class ImportForm(forms.Form):
    """The upstream models chosen for import (checkboxes; choices from the upstream's list)."""

    models = forms.MultipleChoiceField(
        label=_("Models to add"), widget=forms.CheckboxSelectMultiple, required=True
    )

    def __init__(self, *args: Any, offered: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["models"]
        assert isinstance(field, forms.MultipleChoiceField)
        field.choices = [(name, name) for name in offered]
