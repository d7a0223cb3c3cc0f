"""Budget alerts: a key's spending crossed a soft threshold of one of its budgets.

Detection runs in the usage ledger's writer thread (``keys.ledger``), right after a
batch of records commits: off every request's path, the same in the embedded mode
and with Redis, and it reads the ledger itself (the record of truth, on every
backend) rather than any process's counters.  Per batch it costs one query (the
batch's keys that have a budget and thresholds: usually none); a key with thresholds
costs one more, and one with a threshold not yet reached this period one more again
(its period's sums).

Each crossing is a ``BudgetAlert`` row, unique per (key, budget kind, period start,
threshold): a second crossing in the same period, or two workers seeing the same
crossing, cannot add a second row, and only the insert that won sends email.  A new
period has a new start, so it fires again.  A check that failed (database down) is
caught up by the key's next batch: it compares what is spent with every threshold,
not only the last request.

Email goes out only when ``EMAIL_URL`` is set (``SWITCHBOARD_EMAIL``), through a
Celery task: a worker with Redis, inline in the writer thread in the embedded mode
(still off the response path), one message per recipient: active admins and finance
and the key's owner.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

from celery import shared_task
from django.conf import settings
from django.core import mail
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone, translation
from django.utils.translation import gettext as _

from accounts.models import Role, User
from keys import limiter
from keys.models import AlertThresholds, ApiKey, BudgetAlert, BudgetKind

logger = logging.getLogger(__name__)


def visible_alerts(user: User) -> QuerySet[BudgetAlert]:
    """Admins and finance see every alert; a member only those of their own keys."""
    alerts = BudgetAlert.objects.select_related("key", "user")
    return alerts if user.has_role(Role.ADMIN, Role.FINANCE) else alerts.filter(user=user)


def effective_thresholds(keys: Iterable[ApiKey]) -> dict[int, list[int]]:
    """Each key's thresholds: its own non-empty list, else its owner's (one query)."""
    keys = list(keys)
    found: dict[int, list[int]] = {}
    rows = AlertThresholds.objects.filter(
        Q(key__in=[key.pk for key in keys]) | Q(user__in={key.user_id for key in keys})
    ).values_list("key_id", "user_id", "percents")
    own = {key_id: percents for key_id, _user, percents in rows if key_id and percents}
    users = {user_id: percents for _key, user_id, percents in rows if user_id and percents}
    for key in keys:
        percents = own.get(key.pk) or users.get(key.user_id)
        if percents:
            found[key.pk] = sorted(int(percent) for percent in percents)
    return found


def check(records: Iterable[dict[str, Any]]) -> list[BudgetAlert]:
    """Record the thresholds that the keys of these committed records have now crossed.

    Called by the ledger writer after each batch; returns the alerts it created.
    """
    latest: dict[int, datetime] = {}
    for record in records:
        key_id = record.get("key_id")
        used = record.get("input_tokens") or record.get("output_tokens") or record.get("cost")
        if key_id and used:
            when = record.get("created_at") or timezone.now()
            latest[key_id] = max(latest.get(key_id, when), when)
    if not latest:
        return []
    # One query: the batch's keys with a budget and thresholds of their own or their owner's.
    keys = list(
        ApiKey.objects.filter(pk__in=latest)
        .filter(Q(token_budget__isnull=False) | Q(money_budget__isnull=False))
        .filter(Q(alert_thresholds__isnull=False) | Q(user__alert_thresholds__isnull=False))
    )
    if not keys:
        return []
    thresholds = effective_thresholds(keys)
    created: list[BudgetAlert] = []
    for key in keys:
        if key.pk in thresholds:
            created += _check_key(key, thresholds[key.pk], latest[key.pk])
    return created


def _budgets(key: ApiKey) -> list[tuple[str, Decimal]]:
    budgets = []
    if key.token_budget:
        budgets.append((BudgetKind.TOKENS.value, Decimal(key.token_budget)))
    if key.money_budget:
        budgets.append((BudgetKind.MONEY.value, key.money_budget))
    return budgets


def _check_key(key: ApiKey, percents: list[int], when: datetime) -> list[BudgetAlert]:
    budgets = _budgets(key)
    period_start = limiter.windows(when, key.budget_period).period_start
    done = set(
        BudgetAlert.objects.filter(key=key, period_start=period_start).values_list(
            "kind", "threshold"
        )
    )
    if all((kind, percent) in done for kind, _budget in budgets for percent in percents):
        return []  # every threshold already fired this period: no sums needed
    spent_tokens, spent_money, _win = limiter.spent_in_period(key.pk, key.budget_period, when)
    spent = {BudgetKind.TOKENS.value: Decimal(spent_tokens), BudgetKind.MONEY.value: spent_money}
    created = []
    for kind, budget in budgets:
        for percent in percents:
            if (kind, percent) in done or spent[kind] * 100 < budget * percent:
                continue
            alert = _record(
                key=key,
                kind=kind,
                period_start=period_start,
                threshold=percent,
                budget=budget,
                spent=spent[kind],
            )
            if alert is not None:
                created.append(alert)
    return created


def _record(**fields: Any) -> BudgetAlert | None:
    """Insert one alert; None when another worker recorded it first (the unique constraint)."""
    key: ApiKey = fields.pop("key")
    try:
        # A savepoint of its own: a lost race must not abort anything around it.
        with transaction.atomic():
            alert = BudgetAlert.objects.create(
                key=key, user_id=key.user_id, period=key.budget_period, **fields
            )
    except IntegrityError:
        return None
    logger.info(
        "budget alert: key %s passed %s%% of its %s budget (%s of %s)",
        key.prefix,
        alert.threshold,
        alert.kind,
        alert.spent.normalize(),
        alert.budget.normalize(),
    )
    if settings.SWITCHBOARD_EMAIL:
        alert_id = alert.pk
        transaction.on_commit(lambda: send_alert_emails.delay(alert_id))
    return alert


def recipients(alert: BudgetAlert) -> list[str]:
    """Active admins and finance, and the key's owner if active: each address once."""
    staff = User.objects.filter(is_active=True, role__in=[Role.ADMIN, Role.FINANCE])
    addresses = [*staff.order_by("email").values_list("email", flat=True)]
    owner = alert.user
    if owner.is_active and owner.email not in addresses:
        addresses.append(owner.email)
    return [address for address in addresses if address]


def _message(alert: BudgetAlert) -> tuple[str, str]:
    """Subject and body, in the site's language."""
    key = alert.key
    if alert.kind == BudgetKind.MONEY:
        spent = f"{alert.spent.normalize():f} {settings.SWITCHBOARD_CURRENCY}"
        budget = f"{alert.budget.normalize():f} {settings.SWITCHBOARD_CURRENCY}"
    else:
        spent, budget = f"{alert.spent.normalize():f}", f"{alert.budget.normalize():f}"
    values = {
        "prefix": key.prefix,
        "name": key.name or "—",
        "owner": alert.user.email,
        "threshold": alert.threshold,
        "kind": alert.get_kind_display(),
        "spent": spent,
        "budget": budget,
        "period": alert.get_period_display(),
        "start": timezone.localtime(alert.period_start).strftime("%Y-%m-%d %H:%M %Z"),
    }
    subject = _("[Switchboard] Key %(prefix)s… passed %(threshold)s%% of its %(kind)s") % values
    body = (
        _(
            "API key %(prefix)s… (%(name)s) of %(owner)s has used %(spent)s of its "
            "%(kind)s of %(budget)s (%(period)s, since %(start)s): past the %(threshold)s%% "
            "alert threshold.\n\nThe budget refuses requests only when it is spent in full."
        )
        % values
    )
    public_url = getattr(settings, "SWITCHBOARD_PUBLIC_URL", None)
    if public_url:
        body += "\n\n" + f"{public_url}/console/alerts/"
    return subject, body


@shared_task(ignore_result=True)
def send_alert_emails(alert_id: int) -> int:
    """Email one alert to its recipients, once: the row is claimed before sending.

    Idempotent: a task run twice (a redelivery) finds the alert claimed and sends
    nothing.  When sending fails the claim is released so that a retry can send.
    """
    claimed = BudgetAlert.objects.filter(pk=alert_id, emailed_at__isnull=True).update(
        emailed_at=timezone.now()
    )
    if not claimed:
        return 0
    alert = BudgetAlert.objects.select_related("key", "user").get(pk=alert_id)
    with translation.override(settings.LANGUAGE_CODE):
        subject, body = _message(alert)
    messages = [
        mail.EmailMessage(subject, body, settings.SWITCHBOARD_EMAIL_FROM, [address])
        for address in recipients(alert)
    ]
    try:
        with mail.get_connection() as connection:
            sent = connection.send_messages(messages) or 0
    except Exception:
        BudgetAlert.objects.filter(pk=alert_id).update(emailed_at=None)
        raise
    return sent
