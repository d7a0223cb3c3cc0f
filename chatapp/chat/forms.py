from __future__ import annotations

from typing import Any

from django import forms
from django.utils.translation import gettext_lazy as _

from chatapp.models import CatalogModel, Conversation


class ConversationSettingsForm(forms.ModelForm):
    model = forms.ChoiceField(label=_("Model"))

    class Meta:
        model = Conversation
        fields = ["model", "system_prompt", "temperature"]

    def __init__(self, *args: Any, models: list[CatalogModel], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["model"]
        assert isinstance(field, forms.ChoiceField)
        field.choices = [(model.name, model.label) for model in models]
