from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth.forms import AuthenticationForm, BaseUserCreationForm
from django.contrib.auth.forms import UserChangeForm as BaseUserChangeForm
from django.utils.translation import gettext_lazy as _

from accounts.audit import object_type_label
from accounts.models import Role, User


class EmailAuthenticationForm(AuthenticationForm):
    """Sign in by email; the same neutral message for every kind of failure."""

    username = forms.EmailField(
        label=_("Email"),
        widget=forms.EmailInput(attrs={"autofocus": True, "autocomplete": "email"}),
    )

    error_messages = {
        "invalid_login": _("That email and password do not match an active account."),
        "inactive": _("That email and password do not match an active account."),
    }


class UserCreationForm(BaseUserCreationForm):
    class Meta:
        model = User
        fields = ("email", "role")


class UserChangeForm(BaseUserChangeForm):
    class Meta:
        model = User
        fields = "__all__"


# --- The console's forms (accounts/views.py); the actions re-check everything. ---

STATUS_CHOICES = [("", _("Any status")), ("active", _("Active")), ("disabled", _("Disabled"))]


class UserFilterForm(forms.Form):
    """The user list's filters: GET parameters, so a filtered list can be bookmarked."""

    q = forms.CharField(
        label=_("Search"),
        required=False,
        max_length=254,
        widget=forms.TextInput(
            attrs={"type": "search", "placeholder": _("Email or name"), "autocomplete": "off"}
        ),
    )
    role = forms.ChoiceField(
        label=_("Role"), required=False, choices=[("", _("Any role")), *Role.choices]
    )
    status = forms.ChoiceField(label=_("Status"), required=False, choices=STATUS_CHOICES)


class UserCreateForm(forms.Form):
    email = forms.EmailField(
        label=_("Email"), max_length=254, widget=forms.EmailInput(attrs={"autocomplete": "off"})
    )
    name = forms.CharField(label=_("Name"), max_length=150, required=False)
    role = forms.ChoiceField(label=_("Role"), choices=Role.choices, initial=Role.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(label=_("Role"), choices=Role.choices)


class AuditFilterForm(forms.Form):
    actor = forms.ChoiceField(label=_("Actor"), required=False)
    object_type = forms.ChoiceField(label=_("Object type"), required=False)
    since = forms.DateField(
        label=_("From"), required=False, widget=forms.DateInput(attrs={"type": "date"})
    )
    until = forms.DateField(
        label=_("Until"), required=False, widget=forms.DateInput(attrs={"type": "date"})
    )

    COMMAND_LINE = "command"

    def __init__(self, *args: Any, object_types: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Who can act: admins now, anyone who acted before (a former admin), the command line.
        actors = User.objects.filter(role=Role.ADMIN).values_list("pk", "email")
        choices: list[tuple[str, str]] = [("", str(_("Anyone")))]
        choices += [(str(pk), email) for pk, email in actors]
        choices.append((self.COMMAND_LINE, str(_("Command line"))))
        wanted = self.data.get("actor", "")
        if wanted.isdigit() and wanted not in {value for value, _label in choices}:
            former = User.objects.filter(pk=int(wanted)).values_list("email", flat=True).first()
            if former:
                choices.insert(1, (wanted, former))
        self.fields["actor"].choices = choices  # type: ignore[attr-defined]
        self.fields["object_type"].choices = [  # type: ignore[attr-defined]
            ("", _("Any type")),
            *((name, object_type_label(name)) for name in object_types),
        ]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and since > until:
            self.add_error("until", _("The end date is before the start date."))
        return data
