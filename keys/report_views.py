"""The finance report page (``/console/reports/``) and its exports.

The page and every export are built from one ``keys.reports.Report`` of the same
query string, so a downloaded file's totals equal the page's to the last digit.

Finance and admins read everyone's usage, upstream cost and margin.  A member reads
their own usage only: ``user`` is forced to themselves, asking for another user's
rows (``?user=``) or another user's key (``?key=``) is a 403, and the upstream cost
and margin (what the providers charge us) are left out.  Everything is read-only (GET).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_GET

from accounts.console import EVERYONE
from accounts.models import User
from accounts.roles import console_page
from keys import reports
from keys.models import ApiKey, UsageSource
from keys.usage_views import sees_all

MAX_DAYS = 400
DEFAULT_GROUP_BY = ("model",)
KIND_LABELS = [
    ("month", gettext_lazy("Calendar month")),
    ("quarter", gettext_lazy("Quarter")),
    ("custom", gettext_lazy("Custom dates")),
]
EXPORTS = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "json": "application/json",
}


@dataclass
class ReportQuery:
    """The report's query string, validated; a refused value is dropped and explained."""

    period: reports.ReportPeriod
    group_by: tuple[str, ...] = DEFAULT_GROUP_BY
    filters: reports.ReportFilters = field(default_factory=reports.ReportFilters)
    raw: dict[str, Any] = field(default_factory=dict)  # accepted values, for links and the form
    errors: list[str] = field(default_factory=list)

    def query_string(self, **changes: Any) -> str:
        values = {**self.raw, **changes}
        return urlencode(
            {name: value for name, value in values.items() if value not in (None, "", [])},
            doseq=True,
        )


def _positive_int(text: str) -> int | None:
    try:
        number = int(text)
    except ValueError:
        return None
    return number if number > 0 else None


def _period(params: Any, zone: ZoneInfo, now: datetime, errors: list[str]) -> reports.ReportPeriod:
    """The period the query asks for (the current month when it asks for nothing valid)."""
    kind = params.get("period", "").strip() or (
        "custom" if params.get("from") or params.get("to") else "month"
    )
    if kind not in reports.KINDS:
        errors.append(_("Unknown period “%(value)s”; showing this month.") % {"value": kind})
        kind = "month"
    try:
        if kind == "custom":
            period = reports.parse_dates(params.get("from", ""), params.get("to", ""), zone)
            if period.days > MAX_DAYS:
                raise reports.ReportError(
                    "to", _("A report may span at most %(days)d days.") % {"days": MAX_DAYS}
                )
            return reports.ReportPeriod("custom", period.first_day, period.end_day, zone)
        if kind == "quarter" and params.get("quarter", "").strip():
            return reports.parse_quarter(params["quarter"], zone)
        if kind == "month" and params.get("month", "").strip():
            return reports.parse_month(params["month"], zone)
    except reports.ReportError as error:
        errors.append(error.message)
        kind = "month"
    local = now.astimezone(zone)
    if kind == "quarter":
        return reports.quarter_period(local.year, (local.month - 1) // 3 + 1, zone)
    return reports.month_period(local.year, local.month, zone)


def parse_report_query(request: HttpRequest, *, now: datetime | None = None) -> ReportQuery:
    """The validated query; a member's is narrowed to themselves (403 on anyone else's)."""
    params = request.GET
    now = now or timezone.now()
    errors: list[str] = []
    raw: dict[str, Any] = {}

    zone = ZoneInfo(settings.TIME_ZONE)
    zone_name = params.get("tz", "").strip()
    if zone_name:
        try:
            zone = reports.parse_zone(zone_name)
            raw["tz"] = zone.key
        except reports.ReportError:
            errors.append(
                _("Unknown time zone “%(zone)s”; showing %(default)s.")
                % {"zone": zone_name, "default": settings.TIME_ZONE}
            )
    period = _period(params, zone, now, errors)
    raw["period"] = period.kind
    if period.kind == "month":
        raw["month"] = f"{period.first_day:%Y-%m}"
    elif period.kind == "quarter":
        raw["quarter"] = period.label
    else:
        raw["from"], raw["to"] = period.first_day.isoformat(), period.end_day.isoformat()
    query = ReportQuery(period=period, raw=raw, errors=errors)

    if "group_by" in params:
        try:
            query.group_by = reports.parse_group_by(params.getlist("group_by"), "group_by")
        except reports.ReportError as error:
            errors.append(error.message)
    raw["group_by"] = list(query.group_by)

    found: dict[str, Any] = {}
    for name in ("user", "key", "route"):
        text = params.get(name, "").strip()
        if not text:
            continue
        number = _positive_int(text)
        if number is None:
            errors.append(
                _("The %(name)s filter must be a number; it was ignored.") % {"name": name}
            )
            continue
        found[name] = number
    for name in ("model", "provider"):
        text = params.get(name, "").strip()[:200]
        if text:
            found[name] = text
    source = params.get("source", "").strip()
    if source:
        if source in UsageSource.values:
            found["source"] = source
        else:
            errors.append(
                _("Unknown %(name)s “%(value)s”; it was ignored.")
                % {"name": "source", "value": source}
            )

    if not sees_all(request.user):
        # A member's report is their own: naming anyone else's rows or keys is refused.
        if found.get("user", request.user.pk) != request.user.pk:
            raise PermissionDenied
        if (
            "key" in found
            and not ApiKey.objects.filter(pk=found["key"], user_id=request.user.pk or 0).exists()
        ):
            raise PermissionDenied
        found["user"] = request.user.pk
    query.filters = reports.ReportFilters(**found)
    raw.update({name: str(value) for name, value in found.items()})
    if not sees_all(request.user):
        raw.pop("user", None)  # implied
    return query


def build_report(request: HttpRequest, query: ReportQuery) -> reports.Report:
    return reports.build(
        query.period,
        group_by=query.group_by,
        filters=query.filters,
        show_margin=sees_all(request.user),
    )


# --- The page -----------------------------------------------------------------------------


def _change_text(value: Decimal | None, now_value: Decimal | int) -> tuple[str, str]:
    """The change as shown, and its trend (up | down | flat)."""
    if value is None:
        return ("", "flat") if not now_value else (_("new"), "up")
    if value > 0:
        return f"+{value}%", "up"
    if value < 0:
        return f"{value}%", "down"
    return "0.0%", "flat"


@dataclass
class Cell:
    text: str
    numeric: bool = True
    trend: str = ""


def _line(
    report: reports.Report,
    labels: list[str],
    totals: Any,
    previous: Any,
) -> list[Cell]:
    """A table line as shown: the same numbers as the files, change as ±x.x%."""
    values = report.cells({}, totals, previous)
    cells = [Cell(label, numeric=False) for label in labels]
    for column, value in zip(report.columns()[len(labels) :], values[len(labels) :], strict=True):
        if column.kind == "change":
            text, trend = _change_text(value, totals.cost)
            cells.append(Cell(text, trend=trend))
        else:
            cells.append(Cell(reports.cell_text(value)))
    return cells


@dataclass
class Comparison:
    label: str
    now: str
    before: str
    change: str
    trend: str
    worse_when_up: bool = False  # failures: a rise is bad news


def comparisons(report: reports.Report) -> list[Comparison]:
    """The totals beside the previous period's, with the change of each."""
    now, before = report.totals, report.previous_totals
    counts = [
        (_("Requests"), now.requests, before.requests, False),
        (_("Failed"), now.errors, before.errors, True),  # more failures is bad news
        (_("Input tokens"), now.input_tokens, before.input_tokens, False),
        (_("Cached input tokens"), now.cached_tokens, before.cached_tokens, False),
        (_("Output tokens"), now.output_tokens, before.output_tokens, False),
    ]
    amounts = [(_("Cost"), now.cost, before.cost)]
    if report.show_margin:
        amounts += [
            (_("Upstream cost"), now.upstream_cost, before.upstream_cost),
            (_("Margin"), now.margin, before.margin),
        ]
    found = []
    for label, count, count_before, worse in counts:
        text, trend = _change_text(reports.change(Decimal(count), Decimal(count_before)), count)
        found.append(Comparison(label, str(count), str(count_before), text, trend, worse))
    for label, amount, amount_before in amounts:
        text, trend = _change_text(reports.change(amount, amount_before), amount)
        found.append(
            Comparison(label, reports.money(amount), reports.money(amount_before), text, trend)
        )
    return found


def flag_links(query: ReportQuery, report: reports.Report) -> list[tuple[str, str, int, str]]:
    """Each data-quality flag: (name, label, count, the request log of those records)."""
    base: dict[str, str] = {
        "range": "custom",
        "from": query.period.first_day.isoformat(),
        "to": query.period.end_day.isoformat(),
        "tz": query.period.zone.key,
    }
    for name, value in query.filters.items():
        base[name] = str(value)
    log = reverse("console:usage_requests")
    return [
        (
            name,
            str(reports.FLAG_LABELS[name]),
            count,
            f"{log}?{urlencode({**base, 'flag': name})}",
        )
        for name, count in report.flags.items()
    ]


def _period_links(query: ReportQuery) -> tuple[str, str]:
    def link(period: reports.ReportPeriod) -> str:
        changes: dict[str, Any] = {"period": period.kind}
        if period.kind == "month":
            changes["month"] = f"{period.first_day:%Y-%m}"
        elif period.kind == "quarter":
            changes["quarter"] = period.label
        else:
            changes["from"] = period.first_day.isoformat()
            changes["to"] = period.end_day.isoformat()
        return f"?{query.query_string(**changes)}"

    return link(query.period.previous()), link(query.period.following())


def _choices(request: HttpRequest, viewer_sees_all: bool) -> dict[str, Any]:
    from chatapp.models import Route

    keys = ApiKey.objects.order_by("name", "pk").only("pk", "name", "prefix", "user")
    if not viewer_sees_all:
        keys = keys.filter(user_id=request.user.pk or 0)
    groups = [
        (name, label)
        for name, label in reports.GROUP_LABELS.items()
        if viewer_sees_all or name != "user"
    ]
    return {
        "kinds": KIND_LABELS,
        "groups": groups,
        "sources": UsageSource.choices,
        "key_choices": keys[:500],
        "user_choices": (
            User.objects.order_by("email").only("pk", "email")[:500] if viewer_sees_all else []
        ),
        "route_choices": (
            Route.objects.select_related("model", "provider")[:500] if viewer_sees_all else []
        ),
    }


@require_GET
@console_page(read=EVERYONE)
def report_page(request: HttpRequest) -> HttpResponse:
    query = parse_report_query(request)
    report = build_report(request, query)
    viewer_sees_all = sees_all(request.user)
    previous_url, next_url = _period_links(query)
    previous_period = query.period.previous()
    export = reverse("console:reports_export")
    return render(
        request,
        "keys/console/reports/report.html",
        {
            "query": query,
            "report": report,
            "sees_all": viewer_sees_all,
            "zone": query.period.zone.key,
            "grouping": " + ".join(str(reports.GROUP_LABELS[name]) for name in query.group_by),
            "generated_at": f"{report.generated_at:%Y-%m-%d %H:%M:%S}",
            "previous_period": previous_period,
            "columns": report.columns(),
            "lines": [_line(report, row.labels, row.totals, row.previous) for row in report.rows],
            "total_line": _line(
                report,
                [_("Total")] + [""] * (len(report.group_by) - 1) if report.group_by else [],
                report.totals,
                report.previous_totals,
            ),
            "comparisons": comparisons(report),
            "flags": flag_links(query, report),
            "previous_url": previous_url,
            "next_url": next_url,
            "group_first": query.group_by[0] if query.group_by else "",
            "group_second": query.group_by[1] if len(query.group_by) > 1 else "",
            "csv_url": f"{export}?{query.query_string(format='csv')}",
            "xlsx_url": f"{export}?{query.query_string(format='xlsx')}",
            "usage_url": f"{reverse('console:usage')}?"
            + urlencode(
                {
                    "range": "custom",
                    "from": query.period.first_day.isoformat(),
                    "to": query.period.end_day.isoformat(),
                    "tz": query.period.zone.key,
                }
            ),
            **_choices(request, viewer_sees_all),
        },
    )


@require_GET
@console_page(read=EVERYONE)
def report_export(request: HttpRequest) -> HttpResponse:
    """The report as ``?format=csv|xlsx|json``: the page's query string, the page's numbers."""
    output = request.GET.get("format", "csv")
    if output not in EXPORTS:
        return HttpResponseBadRequest(
            _("Unknown format “%(value)s”: expected csv, xlsx or json.") % {"value": output},
            content_type="text/plain; charset=utf-8",
        )
    query = parse_report_query(request)
    report = build_report(request, query)
    content: str | bytes
    if output == "xlsx":
        content = report.xlsx()
    elif output == "json":
        content = report.json()
    else:
        content = report.csv()
    response = HttpResponse(content, content_type=EXPORTS[output])
    grouping = "-".join(query.group_by) or "total"
    label = query.period.label.replace(" – ", "_")
    response["Content-Disposition"] = (
        f'attachment; filename="switchboard-report-{label}-{grouping}.{output}"'
    )
    return response
