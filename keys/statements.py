"""Monthly statements: last month's report per user and a summary, produced once, closable.

On the first day of a month (in the reporting time zone, ``TIME_ZONE``) last month's
statements are produced from the usage roll-ups (``keys.reports``): one per user who
used the gateway that month (their usage by model and key: what they were charged) and
one summary (everyone, by user, with upstream cost and margin), each with its CSV and
XLSX files kept in the database.

- **Once**: ``StatementMonth.month`` is unique and is locked while statements are
  written, so a task that runs twice (two beats, a redelivery) finds the month produced
  and does nothing.  With Redis a beat task checks every hour (``CELERY_BEAT_SCHEDULE``);
  without a beat (the embedded default) ``StatementsMiddleware`` produces it on the first
  request after the month turns.
- **Closing**: finance (or an admin) closes a month: its statements are final, producing
  it again is refused, and a correction is an ``Adjustment`` — a dated line with an
  amount and a reason, added and never edited.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponseBase
from django.utils import timezone
from django.utils.translation import gettext as _

from accounts import audit
from accounts.models import Role, User
from keys import reports, rollups
from keys.models import Adjustment, Statement, StatementMonth

logger = logging.getLogger(__name__)

MAX_REASON = 500
# Largest adjustment in either direction: far above any real correction, well inside the column.
MAX_ADJUSTMENT = Decimal("1000000000")


class StatementError(Exception):
    """A refused statement action, with the message to show."""


def reporting_zone() -> ZoneInfo:
    return ZoneInfo(settings.TIME_ZONE)


def month_start(day: date) -> date:
    return day.replace(day=1)


def previous_month(now: datetime | None = None, zone: ZoneInfo | None = None) -> date:
    """The first day of the month before the one ``now`` falls in, in the reporting zone."""
    local = timezone.localtime(now or timezone.now(), zone or reporting_zone()).date()
    return (local.replace(day=1) - timedelta(days=1)).replace(day=1)


def _period(month: date, zone: ZoneInfo) -> reports.ReportPeriod:
    return reports.month_period(month.year, month.month, zone)


def has_usage(period: reports.ReportPeriod) -> bool:
    """Any usage in the period (roll-ups or raw ledger), without summing it."""
    from keys.models import UsageRecord, UsageRollup

    return (
        UsageRollup.objects.filter(
            bucket_start__gte=period.start, bucket_start__lt=period.end
        ).exists()
        or UsageRecord.objects.filter(
            created_at__gte=period.start, created_at__lt=period.end
        ).exists()
    )


def _statement(
    month: StatementMonth, user: User | None, report: reports.Report, now: datetime
) -> Statement:
    totals: rollups.Totals = report.totals
    return Statement.objects.create(
        month=month,
        user=user,
        requests=totals.requests,
        failed=totals.errors,
        input_tokens=totals.input_tokens,
        cached_tokens=totals.cached_tokens,
        output_tokens=totals.output_tokens,
        cost=totals.cost,
        upstream_cost=totals.upstream_cost if user is None else Decimal(0),
        csv_file=report.csv().encode("utf-8"),
        xlsx_file=report.xlsx(),
        produced_at=now,
    )


def produce(
    month: date | None = None, *, now: datetime | None = None, again: bool = False
) -> StatementMonth | None:
    """Produce ``month``'s statements (default: last month) unless they exist.

    Returns the month, or None when that month had no usage (nothing to state).
    ``again`` replaces an open month's statements (late records); a closed month is
    refused.  Two callers at once: the second waits on the month's row lock and then
    finds it produced.
    """
    now = now or timezone.now()
    zone = reporting_zone()
    month = month_start(month) if month else previous_month(now, zone)
    period = _period(month, zone)
    if now < period.end:
        raise StatementError(
            _("%(month)s has not ended yet: its statement comes on the first of next month.")
            % {"month": f"{month:%Y-%m}"}
        )
    with transaction.atomic():
        # The row lock orders concurrent producers (SQLite: its write lock does).
        existing = StatementMonth.objects.select_for_update().filter(month=month).first()
        if existing is not None and existing.produced_at is not None and not again:
            return existing
        if existing is not None and existing.is_closed:
            raise StatementError(
                _("%(month)s is closed: its statements are final. Add an adjustment instead.")
                % {"month": f"{month:%Y-%m}"}
            )
        if existing is None and not has_usage(period):
            return None
        if existing is None:
            existing, _created = StatementMonth.objects.get_or_create(
                month=month,
                defaults={"zone": zone.key, "currency": settings.SWITCHBOARD_CURRENCY},
            )
            existing = StatementMonth.objects.select_for_update().get(pk=existing.pk)
            if existing.produced_at is not None and not again:
                return existing  # another producer won the insert and finished first
        existing.statements.all().delete()
        summary = reports.build(period, group_by=("user",), now=now)
        _statement(existing, None, summary, now)
        user_ids = sorted(
            {row.group[0] for row in summary.rows if row.group and row.group[0] is not None}
        )
        for user in User.objects.filter(pk__in=user_ids).order_by("email"):
            mine = reports.build(
                period,
                group_by=("model", "key"),
                filters=reports.ReportFilters(user=user.pk),
                show_margin=False,
                now=now,
            )
            _statement(existing, user, mine, now)
        existing.zone, existing.currency = zone.key, settings.SWITCHBOARD_CURRENCY
        existing.produced_at = now
        existing.save(update_fields=["zone", "currency", "produced_at"])
        if again:
            audit.record("produce", existing, changes={"produced_at": [None, now.isoformat()]})
    logger.info("statements of %s produced: %d", f"{month:%Y-%m}", existing.statements.count())
    return existing


def do_close_month(*, month: StatementMonth, by: User) -> StatementMonth:
    """Make a produced month final; its statements can no longer be produced again."""
    with transaction.atomic():
        locked = StatementMonth.objects.select_for_update().get(pk=month.pk)
        if locked.is_closed:
            raise StatementError(_("%(month)s is already closed.") % {"month": str(locked)})
        if locked.produced_at is None:
            raise StatementError(
                _("%(month)s has no statements yet: produce them first.") % {"month": str(locked)}
            )
        locked.closed_at, locked.closed_by = timezone.now(), by
        locked.save(update_fields=["closed_at", "closed_by"])
        audit.record("close", locked, changes={"closed": [False, True]})
    return locked


def check_adjustment(*, amount: Any, reason: str) -> tuple[Decimal, str]:
    """The amount (a non-zero decimal, at most 12 places) and the reason, or a StatementError."""
    try:
        value = Decimal(str(amount).strip())
    except ArithmeticError:
        raise StatementError(
            _("Amount: “%(value)s” is not a number (e.g. -12.50).") % {"value": amount}
        ) from None
    if not value.is_finite() or value == 0:
        raise StatementError(_("Amount: give a positive or negative amount, not zero."))
    if abs(value) >= MAX_ADJUSTMENT:
        raise StatementError(
            _("Amount: at most %(limit)s either way.") % {"limit": f"{MAX_ADJUSTMENT:,}"}
        )
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -12:
        raise StatementError(_("Amount: at most 12 decimal places."))
    reason = (reason or "").strip()
    if not reason:
        raise StatementError(_("Reason: say why the statement is corrected."))
    if len(reason) > MAX_REASON:
        raise StatementError(
            _("Reason: at most %(limit)d characters (this one has %(count)d).")
            % {"limit": MAX_REASON, "count": len(reason)}
        )
    return value, reason


def do_add_adjustment(
    *, month: StatementMonth, user: User | None, amount: Any, reason: str, by: User
) -> Adjustment:
    """Add a dated correction line; statements themselves never change after closing."""
    value, reason = check_adjustment(amount=amount, reason=reason)
    if month.produced_at is None:
        raise StatementError(
            _("%(month)s has no statements yet: produce them first.") % {"month": str(month)}
        )
    if user is not None and not month.statements.filter(user=user).exists():
        raise StatementError(
            _("%(email)s has no statement in %(month)s.") % {"email": user.email, "month": month}
        )
    with transaction.atomic():
        adjustment = Adjustment.objects.create(
            month=month, user=user, amount=value, reason=reason, created_by=by
        )
        audit.record(
            "create",
            adjustment,
            changes={
                "amount": [None, f"{value:f}"],
                "reason": [None, reason],
                "user": [None, user.email if user else None],
            },
        )
    return adjustment


# --- Who sees what ----------------------------------------------------------------------


def sees_all(user: Any) -> bool:
    return isinstance(user, User) and user.has_role(Role.ADMIN, Role.FINANCE)


def visible_statements(user: User) -> QuerySet[Statement]:
    """Finance and admins: every statement; a member: their own (never the summary)."""
    statements = Statement.objects.select_related("month", "user").defer("csv_file", "xlsx_file")
    return statements if sees_all(user) else statements.filter(user=user)


def adjusted_total(statement: Statement) -> Decimal:
    """The statement's cost plus its adjustments (the summary: every adjustment of the month)."""
    adjustments = statement.month.adjustments.all()
    if statement.user_id is not None:
        adjustments = adjustments.filter(user_id=statement.user_id)
    return statement.cost + sum((a.amount for a in adjustments), Decimal(0))


# --- Producing without a beat (the embedded default) ------------------------------------

_checked: dict[str, date] = {}


def produce_if_due(now: datetime | None = None) -> StatementMonth | None:
    """Last month's statements if not produced yet; checked once per month per process."""
    now = now or timezone.now()
    due = previous_month(now)
    if _checked.get("month") == due:
        return None
    _checked["month"] = due
    if StatementMonth.objects.filter(month=due, produced_at__isnull=False).exists():
        return None
    try:
        return produce(due, now=now)
    except Exception:
        # Never fail the request that happened to come first; the next process retries.
        logger.exception("producing the statements of %s failed", f"{due:%Y-%m}")
        _checked.pop("month", None)
        return None


def StatementsMiddleware(  # noqa: N802 - Django's middleware factory convention
    get_response: Callable[[HttpRequest], Any],
) -> Callable[[HttpRequest], Any]:
    """Without a Celery beat, the first request after the month turns produces its statements.

    Per request it costs one comparison of dates in memory; the database is asked once
    per month per process.  With a beat (``CELERY_TASK_ALWAYS_EAGER`` off) it does nothing
    (``SWITCHBOARD_STATEMENTS_ON_REQUEST``).
    """

    def due() -> bool:
        return (
            settings.SWITCHBOARD_STATEMENTS_ON_REQUEST and _checked.get("month") != previous_month()
        )

    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            if due():
                await sync_to_async(produce_if_due, thread_sensitive=True)()
            return await get_response(request)

        markcoroutinefunction(async_middleware)
        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        if due():
            produce_if_due()
        return get_response(request)

    return middleware
