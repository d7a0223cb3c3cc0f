"""The one place a key's and a price's rules are written.

The admin, the management commands (through ``keys.actions``) and the console use
these forms, so no path can store what another would refuse: a money budget past
the limiter's exact range, a negative limit, an expiry in the past, an unknown model.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from keys.limiter import MAX_MONEY_BUDGET
from keys.models import AlertThresholds, ApiKey, KeyPolicy, ModelPrice, RoutePrice

LIMIT_FIELDS = [
    "rpm",
    "rpd",
    "tpm",
    "tpd",
    "concurrency",
    "token_budget",
    "money_budget",
    "budget_period",
    "max_output_tokens",
    "clamp_max_tokens",
]


def describe(errors: dict[str, Any]) -> str:
    """A form's errors as one line naming each field: ``money_budget: Ensure ...``."""
    parts = []
    for field, messages in errors.items():
        text = " ".join(str(message) for message in messages)
        parts.append(text if field == "__all__" else f"{field}: {text}")
    return "; ".join(parts)


class LimitsForm(forms.ModelForm):
    """A key's rate limits and budgets; 0 clears a limit like an empty field."""

    class Meta:
        model = ApiKey
        fields = LIMIT_FIELDS

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        for name in LIMIT_FIELDS:
            if name not in ("budget_period", "clamp_max_tokens") and cleaned.get(name) == 0:
                cleaned[name] = None
        money = cleaned.get("money_budget")
        if money is not None and money > MAX_MONEY_BUDGET:
            # Budgets are counted in integer nano-units inside the limiter (exact up to
            # 2**53): past this they would round.
            self.add_error(
                "money_budget",
                _("At most %(limit)s %(currency)s: larger budgets cannot be counted exactly.")
                % {"limit": f"{MAX_MONEY_BUDGET:,}", "currency": settings.SWITCHBOARD_CURRENCY},
            )
        return cleaned


class AllowedModelsMixin(forms.ModelForm):
    def clean_allowed_models(self) -> list[str]:
        from chatapp.actions import CatalogError, check_model_names

        value = self.cleaned_data.get("allowed_models") or []
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            raise ValidationError(_('Enter a list of model names, e.g. ["gpt-4o", "claude"].'))
        try:
            return check_model_names(names=value)
        except CatalogError as exc:
            raise ValidationError(str(exc)) from None


class KeyCreateForm(AllowedModelsMixin):
    """What issuing a key needs: an active owner, an expiry in the future, known models."""

    class Meta:
        model = ApiKey
        fields = ["user", "name", "expires_at", "allowed_models"]

    def clean_user(self) -> Any:
        user = self.cleaned_data["user"]
        if not user.is_active:
            raise ValidationError(_("%(email)s is disabled.") % {"email": user.email})
        return user

    def clean_expires_at(self) -> Any:
        expires_at = self.cleaned_data.get("expires_at")
        if expires_at is not None and expires_at <= timezone.now():
            raise ValidationError(_("%(time)s is in the past.") % {"time": expires_at.isoformat()})
        return expires_at


class KeyIssueForm(KeyCreateForm, LimitsForm):
    """A new key with its limits and budgets (the console's "new key")."""

    class Meta:
        model = ApiKey
        fields = ["user", "name", "expires_at", "allowed_models", *LIMIT_FIELDS]


class KeyForm(AllowedModelsMixin, LimitsForm):
    """Everything an admin may change on an issued key."""

    class Meta:
        model = ApiKey
        fields = ["name", "enabled", "expires_at", "allowed_models", *LIMIT_FIELDS]

    def clean_expires_at(self) -> Any:
        # A new expiry must be in the future; an unchanged one (a key already expired)
        # does not stop other edits.
        expires_at = self.cleaned_data.get("expires_at")
        if (
            "expires_at" in self.changed_data
            and expires_at is not None
            and expires_at <= timezone.now()
        ):
            raise ValidationError(_("%(time)s is in the past.") % {"time": expires_at.isoformat()})
        return expires_at


class PriceForm(forms.ModelForm):
    """A new price of a model, per 1M tokens, from a moment on."""

    class Meta:
        model = ModelPrice
        fields = [
            "model",
            "input_per_mtok",
            "output_per_mtok",
            "cached_input_per_mtok",
            "cache_write_per_mtok",
            "effective_from",
        ]

    def _price(self, name: str) -> Decimal | None:
        value: Decimal | None = self.cleaned_data.get(name)
        if value is not None and value < 0:
            raise ValidationError(_("A price cannot be negative."))
        return value

    def clean_input_per_mtok(self) -> Decimal | None:
        return self._price("input_per_mtok")

    def clean_output_per_mtok(self) -> Decimal | None:
        return self._price("output_per_mtok")

    def clean_cached_input_per_mtok(self) -> Decimal | None:
        return self._price("cached_input_per_mtok")

    def clean_cache_write_per_mtok(self) -> Decimal | None:
        return self._price("cache_write_per_mtok")

    def save(self, commit: bool = True) -> ModelPrice:
        price: ModelPrice = super().save(commit=False)
        price.currency = settings.SWITCHBOARD_CURRENCY
        if commit:
            price.save()
        return price


class RoutePriceForm(PriceForm):
    """A new upstream price of a route (what its provider charges us), from a moment on."""

    class Meta:
        model = RoutePrice
        fields = [
            "route",
            "input_per_mtok",
            "output_per_mtok",
            "cached_input_per_mtok",
            "cache_write_per_mtok",
            "effective_from",
        ]

    def save(self, commit: bool = True) -> RoutePrice:  # type: ignore[override]
        price: RoutePrice = forms.ModelForm.save(self, commit=False)
        price.currency = settings.SWITCHBOARD_CURRENCY
        if commit:
            price.save()
        return price


MAX_THRESHOLDS = 5


class ThresholdsField(forms.CharField):
    """Budget alert thresholds as whole percentages, ``80, 95`` → ``[80, 95]``.

    Between 1 and 100 (a soft warning before the budget refuses), at most
    ``MAX_THRESHOLDS``, sorted, each once.  Empty: none.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("required", False)
        kwargs.setdefault("label", _("Budget alerts at (%)"))
        kwargs.setdefault(
            "help_text",
            _("Comma-separated percentages of each budget, e.g. 80, 95. Empty: none."),
        )
        super().__init__(**kwargs)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return ", ".join(str(percent) for percent in value)
        return value

    def to_python(self, value: Any) -> list[int]:  # type: ignore[override]
        if isinstance(value, list | tuple):
            parts = [str(item) for item in value]
        else:
            parts = [part.strip().rstrip("%").strip() for part in str(value or "").split(",")]
        percents = set()
        for part in parts:
            if not part:
                continue
            if not part.isdigit() or not 1 <= int(part) <= 100:
                raise ValidationError(
                    _("%(value)s is not a whole percentage from 1 to 100.") % {"value": part}
                )
            percents.add(int(part))
        if len(percents) > MAX_THRESHOLDS:
            raise ValidationError(_("At most %(count)d thresholds.") % {"count": MAX_THRESHOLDS})
        return sorted(percents)


class AlertThresholdsForm(forms.ModelForm):
    """A key's or a user's budget alert thresholds (``keys.actions.do_set_alert_thresholds``)."""

    percents = ThresholdsField()

    class Meta:
        model = AlertThresholds
        fields = ["percents"]


class KeyPolicyForm(forms.ModelForm):
    """An admin's caps on the keys a member creates for themselves."""

    class Meta:
        model = KeyPolicy
        fields = ["max_keys", *KeyPolicy.CAPPED]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        for name in KeyPolicy.CAPPED:
            if cleaned.get(name) == 0:
                cleaned[name] = None
        money = cleaned.get("money_budget")
        if money is not None and money > MAX_MONEY_BUDGET:
            self.add_error(
                "money_budget",
                _("At most %(limit)s %(currency)s: larger budgets cannot be counted exactly.")
                % {"limit": f"{MAX_MONEY_BUDGET:,}", "currency": settings.SWITCHBOARD_CURRENCY},
            )
        return cleaned


# --- The console's forms: the rules above, with widgets for a browser. ---

LOCAL_INPUT = forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M")


class UserByEmailField(forms.ModelChoiceField):
    """A user named by email address (a select of every user would not scale)."""

    def to_python(self, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
        return super().to_python(value)


class CatalogChoicesMixin(forms.BaseForm):
    """Allowed models as checkboxes of the catalog's models (none ticked: every model)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from chatapp.models import CatalogModel

        names = list(CatalogModel.objects.order_by("name").values_list("name", flat=True))
        current = getattr(getattr(self, "instance", None), "allowed_models", None) or []
        names += [name for name in current if name not in names]
        self.fields["allowed_models"] = forms.MultipleChoiceField(
            label=_("Allowed models"),
            choices=[(name, name) for name in names],
            required=False,
            widget=forms.CheckboxSelectMultiple,
            help_text=_("None ticked: every enabled model."),
        )
        if "name" in self.fields:
            self.fields["name"].label = _("Key name")
        if "money_budget" in self.fields:
            self.fields["money_budget"].help_text = _("In %(currency)s.") % {
                "currency": settings.SWITCHBOARD_CURRENCY
            }
        if "expires_at" in self.fields:
            self.fields["expires_at"].widget = LOCAL_INPUT
            self.fields["expires_at"].help_text = _(
                "Empty: never. In your time zone (%(zone)s)."
            ) % {"zone": timezone.get_current_timezone_name()}


class ConsoleKeyCreateForm(CatalogChoicesMixin, KeyIssueForm):
    """An admin issues a key for any user, with every limit and budget."""

    alert_thresholds = ThresholdsField(
        help_text=_(
            "Comma-separated percentages of each budget, e.g. 80, 95. "
            "Empty: the owner's thresholds, if any."
        )
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from accounts.models import User

        self.fields["user"] = UserByEmailField(
            queryset=User.objects.all(),
            to_field_name="email",
            label=_("User (email)"),
            widget=forms.EmailInput,
            error_messages={"invalid_choice": _("No user with this email address.")},
        )


class MemberKeyForm(CatalogChoicesMixin, KeyCreateForm):
    """A member's own key: name, models, expiry; the limits come from their policy."""

    class Meta:
        model = ApiKey
        fields = ["name", "expires_at", "allowed_models"]


class ConsoleKeyForm(CatalogChoicesMixin, KeyForm):
    """An admin edits an issued key (and its budget alert thresholds)."""

    alert_thresholds = ThresholdsField(
        help_text=_(
            "Comma-separated percentages of each budget, e.g. 80, 95. "
            "Empty: the owner's thresholds, if any."
        )
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        own = AlertThresholds.objects.filter(key_id=self.instance.pk).first()
        self.initial["alert_thresholds"] = own.percents if own else []
        money = self.instance.money_budget
        if money is not None:  # 25, not 25.000000000000
            self.initial["money_budget"] = f"{money.normalize():f}"


GRACE_CHOICES = [
    ("0", _("Revoke the old key now")),
    ("3600", _("Keep the old key working for 1 hour")),
    ("86400", _("Keep the old key working for 24 hours")),
    ("604800", _("Keep the old key working for 7 days")),
]


class RotateForm(forms.Form):
    grace = forms.TypedChoiceField(
        label=_("The old key"), choices=GRACE_CHOICES, coerce=int, initial="0"
    )


class ConsolePriceForm(PriceForm):
    """A new price; an empty effective-from means now (``do_set_price``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["effective_from"].required = False
        self.fields["effective_from"].initial = None  # empty means now, not page-load time
        self.fields["effective_from"].widget = LOCAL_INPUT
        self.fields["effective_from"].help_text = _(
            "Empty: now. May be in the future; earlier prices and recorded costs never change. "
            "In your time zone (%(zone)s)."
        ) % {"zone": timezone.get_current_timezone_name()}


class ConsoleRoutePriceForm(RoutePriceForm):
    """A route's new upstream price from the console; an empty effective-from means now."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["effective_from"].required = False
        self.fields["effective_from"].initial = None
        self.fields["effective_from"].widget = LOCAL_INPUT
        self.fields["effective_from"].help_text = _(
            "Empty: now. May be in the future; upstream costs already recorded never change. "
            "In your time zone (%(zone)s)."
        ) % {"zone": timezone.get_current_timezone_name()}
