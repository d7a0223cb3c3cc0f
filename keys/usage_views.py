"""The usage dashboard, its CSV downloads, the live strip and the request log.

Every figure is read from ``keys.rollups.summarize`` (roll-ups plus the raw ledger of
the open and dirty buckets), so a page costs a handful of grouped reads whatever the
ledger's size.  A figure is built once as a ``Figure`` (columns and rows of exact
strings): the page's table, its CSV and the chart's data all come from that one
object, so the CSV always equals the table.

Members see only their own usage: ``user=request.user.pk`` is forced into every
read and the user filter is not offered; another user's request page is a 404.
Finance and admins see everyone's.  Everything here is read-only (GET).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from django.conf import settings
from django.db.models import Q, QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_GET

from accounts.console import EVERYONE, keyset_page
from accounts.models import Role, User
from accounts.roles import console_page
from keys import limiter, rollups
from keys.models import (
    LATENCY_COLUMNS,
    TTFT_COLUMNS,
    ApiKey,
    BudgetPeriod,
    StatusClass,
    UsageRecord,
    UsageSource,
    UsageStatus,
)

TOP_SERIES = 6  # stacked series shown by name; the rest are summed as "other"
TOP_ROWS = 10  # rows of the top keys / users tables
LIVE_SECONDS = 60
LIVE_POLL_SECONDS = 5
MAX_CUSTOM_DAYS = 400
# The time zone field's suggestions (the IANA names, without the legacy aliases).
ZONES = sorted(
    zone
    for zone in available_timezones()
    if "/" in zone and not zone.startswith(("Etc/", "SystemV/"))
) + ["UTC"]

PRESETS: list[tuple[str, Promise]] = [
    ("1h", gettext_lazy("Last hour")),
    ("24h", gettext_lazy("Last 24 hours")),
    ("7d", gettext_lazy("Last 7 days")),
    ("30d", gettext_lazy("Last 30 days")),
    ("month", gettext_lazy("This month")),
    ("last_month", gettext_lazy("Last month")),
    ("custom", gettext_lazy("Custom")),
]
DEFAULT_PRESET = "24h"

# The stacking switch: query value → summarize dimension.
STACKINGS: list[tuple[str, str, Promise]] = [
    ("model", "model", gettext_lazy("by model")),
    ("key", "key_id", gettext_lazy("by key")),
    ("user", "user_id", gettext_lazy("by user")),
    ("provider", "provider", gettext_lazy("by provider")),
]

# Status classes in the order the status chart stacks them.
STATUS_ORDER = [
    StatusClass.OK,
    StatusClass.RATE_LIMITED,
    StatusClass.CLIENT_ERROR,
    StatusClass.UPSTREAM_ERROR,
    StatusClass.CANCELLED,
    StatusClass.INTERRUPTED,
]
ERROR_CLASSES = (StatusClass.RATE_LIMITED, StatusClass.CLIENT_ERROR, StatusClass.UPSTREAM_ERROR)
_NOT_ERRORS = [
    UsageStatus.OK,
    UsageStatus.CLIENT_DISCONNECTED,
    UsageStatus.STOPPED,
    UsageStatus.INTERRUPTED,
]


# The finance report's data-quality flags (keys.reports.FLAGS), as ledger rows; the
# same tests as the roll-ups' counts (keys.rollups._ledger_measures).
_USED_TOKENS = Q(input_tokens__gt=0) | Q(output_tokens__gt=0)
FLAGS: dict[str, Q] = {
    "unpriced": Q(priced=False) & _USED_TOKENS,
    "estimated": Q(estimated=True),
    "zero_cost": Q(cost=0) & _USED_TOKENS,
}


def sees_all(user: Any) -> bool:
    """Finance and admins read everyone's usage; members only their own."""
    return isinstance(user, User) and user.has_role(Role.FINANCE, Role.ADMIN)


# --- The query string -------------------------------------------------------------------


@dataclass
class UsageQuery:
    """The dashboard's and the log's query string, validated; ``errors`` say what was refused.

    A refused value is dropped (the default is used) and explained on the page, so a
    hand-edited URL never gives a 500.
    """

    zone: ZoneInfo
    preset: str = DEFAULT_PRESET
    start: datetime = field(default_factory=timezone.now)
    end: datetime = field(default_factory=timezone.now)
    granularity: str = "hour"
    user: int | None = None
    key: int | None = None
    model: str = ""
    provider: str = ""
    source: str = ""
    status: str = ""
    stack: str = "model"
    request_id: str = ""
    route: int | None = None
    flag: str = ""  # unpriced | estimated | zero_cost: the report's data-quality flags
    ranged: bool = False  # the query named a range: the request log keeps to it
    raw: dict[str, str] = field(default_factory=dict)  # the accepted values, for the form
    errors: list[str] = field(default_factory=list)

    def filters(self) -> dict[str, Any]:
        """The summarize() keyword filters."""
        return {
            "user": self.user,
            "key": self.key,
            "model": self.model or None,
            "provider": self.provider or None,
            "source": self.source or None,
            "route": self.route,
            "status_class": self.status or None,
        }

    @property
    def previous(self) -> tuple[datetime, datetime]:
        """The period before, of the same length (the previous month for month presets)."""
        if self.preset in ("month", "last_month"):
            return _month_start(self.start - timedelta(days=1), self.zone), self.start
        return self.start - (self.end - self.start), self.start


def _month_start(moment: datetime, zone: ZoneInfo) -> datetime:
    local = moment.astimezone(zone)
    return datetime(local.year, local.month, 1, tzinfo=zone)


def _local_midnight(moment: datetime, zone: ZoneInfo) -> datetime:
    local = moment.astimezone(zone)
    return datetime(local.year, local.month, local.day, tzinfo=zone)


def _ceil_bucket(moment: datetime) -> datetime:
    """The first 15-minute boundary at or after ``moment``."""
    floor = rollups.bucket_of(moment)
    return floor if floor == moment else floor + rollups.BUCKET


def granularity_for(start: datetime, end: datetime) -> str:
    """15 minutes up to 6 hours, hours up to 3 days, days beyond."""
    span = end - start
    if span <= timedelta(hours=6):
        return "15min"
    if span <= timedelta(days=3):
        return "hour"
    return "day"


def preset_range(preset: str, now: datetime, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """[start, end) of a preset in ``zone``, on 15-minute boundaries, ``now`` inside it."""
    if preset == "1h":
        end = _ceil_bucket(now + timedelta(microseconds=1))
        return end - timedelta(hours=1), end
    if preset == "24h":
        local = now.astimezone(zone)
        hour_start = (now - timedelta(minutes=local.minute, seconds=local.second)).replace(
            microsecond=0
        )
        end = hour_start + timedelta(hours=1)
        return end - timedelta(hours=24), end
    if preset in ("7d", "30d"):
        days = 7 if preset == "7d" else 30
        today = _local_midnight(now, zone)
        end = _next_day(today, zone)
        return _add_days(today, -(days - 1), zone), end
    this_month = _month_start(now, zone)
    if preset == "month":
        return this_month, _month_start(this_month + timedelta(days=32), zone)
    if preset == "last_month":
        return _month_start(this_month - timedelta(days=1), zone), this_month
    raise ValueError(preset)


def _add_days(day: datetime, days: int, zone: ZoneInfo) -> datetime:
    """A local midnight ``days`` away (wall-clock arithmetic: DST days are 23 or 25 hours)."""
    naive = day.astimezone(zone).replace(tzinfo=None) + timedelta(days=days)
    return naive.replace(tzinfo=zone)


def _next_day(day: datetime, zone: ZoneInfo) -> datetime:
    return _add_days(day, 1, zone)


def _parse_local(text: str, zone: ZoneInfo) -> datetime | None:
    """``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM`` as wall time in ``zone``, floored to 15 minutes."""
    try:
        naive = datetime.fromisoformat(text)
    except ValueError:
        return None
    if naive.tzinfo is not None:
        return None
    naive = naive.replace(minute=naive.minute - naive.minute % 15, second=0, microsecond=0)
    return rollups.bucket_of(naive.replace(tzinfo=zone))


def _positive_int(text: str) -> int | None:
    try:
        number = int(text)
    except ValueError:
        return None
    return number if number > 0 else None


def parse_query(request: HttpRequest, *, now: datetime | None = None) -> UsageQuery:
    """The validated query of a usage page; a member's ``user`` is always themselves."""
    params = request.GET
    now = now or timezone.now()
    errors: list[str] = []
    raw: dict[str, str] = {}

    zone_name = params.get("tz", "").strip()
    zone = ZoneInfo(settings.TIME_ZONE)
    if zone_name:
        try:
            zone = ZoneInfo(zone_name)
            raw["tz"] = zone_name
        except (ZoneInfoNotFoundError, ValueError):
            errors.append(
                _("Unknown time zone “%(zone)s”; showing %(default)s.")
                % {"zone": zone_name, "default": settings.TIME_ZONE}
            )
    query = UsageQuery(zone=zone, raw=raw, errors=errors)

    preset = params.get("range", "").strip() or DEFAULT_PRESET
    if preset not in dict(PRESETS):
        errors.append(
            _("Unknown range “%(range)s”; showing the last 24 hours.") % {"range": preset}
        )
        preset = DEFAULT_PRESET
    if preset == "custom":
        start = _parse_local(params.get("from", "").strip(), zone)
        end = _parse_local(params.get("to", "").strip(), zone)
        if start is None or end is None:
            errors.append(
                _("A custom range needs a valid “from” and “to” (YYYY-MM-DD or YYYY-MM-DDTHH:MM).")
            )
        elif end <= start:
            errors.append(_("The range’s end must come after its start."))
        elif end - start > timedelta(days=MAX_CUSTOM_DAYS):
            errors.append(
                _("A custom range may span at most %(days)d days.") % {"days": MAX_CUSTOM_DAYS}
            )
        else:
            query.start, query.end = start, end
            raw["from"], raw["to"] = params["from"].strip(), params["to"].strip()
        if errors and "from" not in raw:
            preset = DEFAULT_PRESET
    if preset != "custom":
        query.start, query.end = preset_range(preset, now, zone)
    query.preset = preset
    raw["range"] = preset
    query.granularity = granularity_for(query.start, query.end)
    query.ranged = bool(params.get("range", "").strip()) and not (errors and "from" not in raw)
    flag = params.get("flag", "").strip()
    if flag in FLAGS:
        query.flag = flag
        raw["flag"] = flag
    elif flag:
        errors.append(
            _("Unknown %(name)s “%(value)s”; it was ignored.") % {"name": "flag", "value": flag}
        )

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
        setattr(query, name, number)
        raw[name] = text
    for name in ("model", "provider", "request_id"):
        text = params.get(name, "").strip()[:200]
        if text:
            setattr(query, name, text)
            raw[name] = text
    for name, choices in (
        ("source", UsageSource.values),
        ("status", StatusClass.values),
        ("stack", [value for value, _dim, _label in STACKINGS]),
    ):
        text = params.get(name, "").strip()
        if not text:
            continue
        if text not in choices:
            errors.append(
                _("Unknown %(name)s “%(value)s”; it was ignored.") % {"name": name, "value": text}
            )
            continue
        setattr(query, name, text)
        raw[name] = text

    if not sees_all(request.user):
        query.user = request.user.pk  # members read only their own usage
        raw.pop("user", None)
    return query


# --- Figures ----------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    values: list[str]


@dataclass
class Figure:
    """One chart: its table (``columns`` × ``rows`` of exact strings) and how to draw it.

    ``kind`` is ``bar`` (stacked when ``stacked``) or ``line``; the first column holds
    the x-axis labels, the others one series each (``chart_columns`` says which to draw).
    """

    name: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    kind: str = "bar"
    stacked: bool = True
    unit: str = ""
    chart_columns: list[int] | None = None
    horizontal: bool = False

    def chart(self) -> dict[str, Any]:
        """The data the chart script draws (json_script)."""
        wanted = self.chart_columns or list(range(1, len(self.columns)))
        return {
            "kind": self.kind,
            "stacked": self.stacked,
            "horizontal": self.horizontal,
            "unit": self.unit,
            "labels": [row[0] for row in self.rows],
            "series": [
                {"label": self.columns[index], "data": [row[index] for row in self.rows]}
                for index in wanted
            ],
        }

    def csv(self) -> str:
        buffer = _Buffer()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(self.rows)
        return buffer.text


class _Buffer:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def money(value: Decimal) -> str:
    """An exact decimal, without exponent or trailing zeros (0 → ``0``)."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0E-12") else text


def tile_value(value: Decimal, *, is_money: bool) -> str:
    """A headline number as read at a glance: grouped digits; money to the cent (four
    places under 1) with the currency.  The tile's title and table keep the exact value."""
    if is_money:
        places = Decimal("0.01") if abs(value) >= 1 else Decimal("0.0001")
        return f"{value.quantize(places):,f} {settings.SWITCHBOARD_CURRENCY}"
    if value == value.to_integral_value():
        return f"{int(value):,}"
    return f"{value:,f}"


def percent(part: int, whole: int) -> str:
    """A share as a percentage with two decimals (exact decimal arithmetic)."""
    if not whole:
        return "0.00"
    return str((Decimal(part) * 100 / Decimal(whole)).quantize(Decimal("0.01")))


def tokens(totals: rollups.Totals) -> int:
    """Tokens counted against budgets: input (cached included) plus output."""
    return totals.input_tokens + totals.output_tokens


def merged(periods: Iterable[rollups.Period]) -> rollups.Totals:
    """The sum of several periods' totals (histograms and status counts included)."""
    total = rollups.Totals()
    for period in periods:
        t = period.totals
        for name in (
            "requests",
            "streamed",
            "input_tokens",
            "cached_tokens",
            "output_tokens",
            "cost_units",
            "upstream_cost_units",
            "estimated",
            "unpriced",
            "zero_cost",
            "latency_sum_ms",
            "ttft_count",
            "ttft_sum_ms",
        ):
            setattr(total, name, getattr(total, name) + getattr(t, name))
        for index in range(len(LATENCY_COLUMNS)):
            total.latency_histogram[index] += t.latency_histogram[index]
        for index in range(len(TTFT_COLUMNS)):
            total.ttft_histogram[index] += t.ttft_histogram[index]
        for status, count in t.by_status.items():
            total.by_status[status] = total.by_status.get(status, 0) + count
    return total


def period_starts(query: UsageQuery) -> list[datetime]:
    """Every period of the range (empty ones too), as summarize() starts them."""
    starts = []
    moment = query.start.astimezone(query.zone)
    while moment < query.end:
        starts.append(moment)
        if query.granularity == "15min":
            moment = (moment.astimezone(UTC) + rollups.BUCKET).astimezone(query.zone)
        elif query.granularity == "hour":
            moment = (moment.astimezone(UTC) + timedelta(hours=1)).astimezone(query.zone)
        else:
            moment = _add_days(moment, 1, query.zone)
    return starts


def period_label(moment: datetime, granularity: str) -> str:
    local_format = "%Y-%m-%d" if granularity == "day" else "%Y-%m-%d %H:%M"
    return moment.strftime(local_format)


@dataclass
class Names:
    """Readable names of keys and users (only those a figure shows are looked up)."""

    keys: dict[int, str] = field(default_factory=dict)
    users: dict[int, str] = field(default_factory=dict)

    def load(self, key_ids: Iterable[Any], user_ids: Iterable[Any]) -> None:
        wanted_keys = {k for k in key_ids if k is not None} - set(self.keys)
        wanted_users = {u for u in user_ids if u is not None} - set(self.users)
        for key in ApiKey.objects.filter(pk__in=wanted_keys).only("pk", "name", "prefix"):
            self.keys[key.pk] = f"{key.name or _('(unnamed)')} ({key.prefix}…)"
        for user in User.objects.filter(pk__in=wanted_users).only("pk", "email"):
            self.users[user.pk] = user.email

    def of(self, dimension: str, value: Any) -> str:
        if value is None or value == "":
            return _("(none)")
        if dimension == "key_id":
            return self.keys.get(value, f"#{value}")
        if dimension == "user_id":
            return self.users.get(value, f"#{value}")
        if dimension == "status_class":
            return str(StatusClass(value).label) if value in StatusClass.values else str(value)
        return str(value)


MEASURES: dict[str, Callable[[rollups.Totals], Any]] = {
    "cost": lambda t: t.cost,
    "requests": lambda t: t.requests,
    "tokens": tokens,
}


def stacked_figure(
    name: str,
    title: str,
    unit: str,
    periods: list[rollups.Period],
    query: UsageQuery,
    dimension: str,
    names: Names,
) -> Figure:
    """A measure over time, one series per top value of ``dimension`` and one "other"."""
    measure = MEASURES[name]
    zero: Any = Decimal(0) if name == "cost" else 0
    overall: dict[Any, Any] = defaultdict(lambda: zero)
    for period in periods:
        overall[period.group] += measure(period.totals)
    ranked = sorted(overall, key=lambda group: (-overall[group], str(group)))
    top = ranked[:TOP_SERIES]
    has_other = len(ranked) > TOP_SERIES
    cells: dict[tuple[datetime, Any], Any] = defaultdict(lambda: zero)
    for period in periods:
        group = period.group if period.group in top else "__other__"
        cells[(period.start.astimezone(UTC), group)] += measure(period.totals)
    columns_groups: list[Any] = [*top, *(["__other__"] if has_other else [])]
    render_value = money if name == "cost" else str
    rows = [
        [period_label(start, query.granularity)]
        + [render_value(cells[(start.astimezone(UTC), group)]) for group in columns_groups]
        for start in period_starts(query)
    ]
    columns = [_("Time (%(zone)s)") % {"zone": query.zone.key}] + [
        _("other") if group == "__other__" else names.of(dimension, group)
        for group in columns_groups
    ]
    return Figure(name, title, columns, rows, unit=unit)


def over_time(
    periods: list[rollups.Period], query: UsageQuery
) -> list[tuple[datetime, rollups.Totals]]:
    """Each period of the range with its totals (all groups merged; empty periods zero)."""
    by_start: dict[datetime, list[rollups.Period]] = defaultdict(list)
    for period in periods:
        by_start[period.start.astimezone(UTC)].append(period)
    return [
        (start, merged(by_start.get(start.astimezone(UTC), []))) for start in period_starts(query)
    ]


def token_mix_figure(timeline: list[tuple[datetime, rollups.Totals]], query: UsageQuery) -> Figure:
    columns = [
        _("Time (%(zone)s)") % {"zone": query.zone.key},
        _("Input (not cached)"),
        _("Cached input"),
        _("Output"),
    ]
    rows = [
        [
            period_label(start, query.granularity),
            str(t.input_tokens - min(t.cached_tokens, t.input_tokens)),
            str(min(t.cached_tokens, t.input_tokens)),
            str(t.output_tokens),
        ]
        for start, t in timeline
    ]
    return Figure("token_mix", _("Token mix"), columns, rows, unit=_("tokens"))


def status_figure(timeline: list[tuple[datetime, rollups.Totals]], query: UsageQuery) -> Figure:
    columns = [_("Time (%(zone)s)") % {"zone": query.zone.key}] + [
        str(status.label) for status in STATUS_ORDER
    ]
    rows = [
        [period_label(start, query.granularity)]
        + [str(t.by_status.get(status.value, 0)) for status in STATUS_ORDER]
        for start, t in timeline
    ]
    return Figure("status", _("Requests by status"), columns, rows, unit=_("requests"))


def by_model_figures(periods: list[rollups.Period]) -> tuple[Figure, Figure]:
    """Error rate by model, and latency / time to first token by model."""
    ranked = sorted(periods, key=lambda p: (-p.totals.requests, str(p.group)))
    error_rows = [
        [
            str(p.group),
            str(p.totals.requests),
            str(p.totals.errors),
            percent(p.totals.errors, p.totals.requests),
        ]
        for p in ranked
    ]
    errors = Figure(
        "error_rate",
        _("Error rate by model"),
        [_("Model"), _("Requests"), _("Errors"), _("Error rate (%)")],
        error_rows,
        stacked=False,
        unit="%",
        chart_columns=[3],
        horizontal=True,
    )

    def ms(value: int | None) -> str:
        return "" if value is None else str(value)

    latency_rows = [
        [
            str(p.group),
            ms(p.totals.latency_percentile(0.5)),
            ms(p.totals.latency_percentile(0.95)),
            ms(p.totals.ttft_percentile(0.5)),
            ms(p.totals.ttft_percentile(0.95)),
        ]
        for p in ranked
    ]
    latency = Figure(
        "latency",
        _("Latency and time to first token by model"),
        [
            _("Model"),
            _("Latency p50 (ms)"),
            _("Latency p95 (ms)"),
            _("TTFT p50 (ms)"),
            _("TTFT p95 (ms)"),
        ],
        latency_rows,
        stacked=False,
        unit=_("ms"),
        horizontal=True,
    )
    return errors, latency


def budget_spend(keys: Sequence[ApiKey], now: datetime) -> dict[int, Decimal]:
    """Each key's spend in its current budget period (one grouped read per period kind)."""
    spent: dict[int, Decimal] = {}
    by_period: dict[str, list[int]] = defaultdict(list)
    for key in keys:
        if key.money_budget is not None:
            by_period[key.budget_period].append(key.pk)
    for period, key_ids in by_period.items():
        win = limiter.windows(now, period)
        start = rollups.bucket_of(win.period_start)
        end = _ceil_bucket(win.period_reset or now + timedelta(microseconds=1))
        for found in rollups.summarize(start, end, granularity="total", by="key_id", now=now):
            if found.group in key_ids:
                spent[found.group] = spent.get(found.group, Decimal(0)) + found.totals.cost
    return spent


def top_keys_figure(periods: list[rollups.Period], names: Names, now: datetime) -> Figure:
    ranked = sorted(periods, key=lambda p: (-p.totals.cost, str(p.group)))[:TOP_ROWS]
    keys = list(ApiKey.objects.filter(pk__in=[p.group for p in ranked if p.group is not None]))
    by_id = {key.pk: key for key in keys}
    spent = budget_spend(keys, now)
    periods_label = dict(BudgetPeriod.choices)
    rows = []
    for p in ranked:
        key = by_id.get(p.group)
        budget = key.money_budget if key is not None else None
        rows.append(
            [
                names.of("key_id", p.group),
                money(p.totals.cost),
                str(p.totals.requests),
                ""
                if budget is None or key is None
                else f"{money(budget)} ({periods_label.get(key.budget_period, key.budget_period)})",
                "" if budget is None or key is None else money(spent.get(key.pk, Decimal(0))),
                ""
                if not budget or key is None
                else percent_decimal(spent.get(key.pk, Decimal(0)), budget),
            ]
        )
    return Figure(
        "top_keys",
        _("Top keys by spend"),
        [
            _("Key"),
            _("Cost"),
            _("Requests"),
            _("Money budget"),
            _("Spent this budget period"),
            _("Budget used (%)"),
        ],
        rows,
        stacked=False,
        chart_columns=[1],
        horizontal=True,
    )


def percent_decimal(part: Decimal, whole: Decimal) -> str:
    return str((part * 100 / whole).quantize(Decimal("0.01")))


def top_users_figure(periods: list[rollups.Period], names: Names) -> Figure:
    ranked = sorted(periods, key=lambda p: (-p.totals.cost, str(p.group)))[:TOP_ROWS]
    rows = [
        [
            names.of("user_id", p.group),
            money(p.totals.cost),
            str(p.totals.requests),
            str(tokens(p.totals)),
        ]
        for p in ranked
    ]
    return Figure(
        "top_users",
        _("Top users by spend"),
        [_("User"), _("Cost"), _("Requests"), _("Tokens")],
        rows,
        stacked=False,
        chart_columns=[1],
        horizontal=True,
    )


@dataclass
class Tile:
    label: str
    value: str  # as shown: grouped digits, money rounded (the exact value is ``exact``)
    exact: str
    change: str  # "+12.5%", "−3.0%", "" when there is nothing to compare with
    trend: str  # up | down | flat


def _change(now_value: Decimal, before: Decimal) -> tuple[str, str]:
    if not before:
        return ("", "flat") if not now_value else (_("new"), "up")
    ratio = ((now_value - before) * 100 / before).quantize(Decimal("0.1"))
    trend = "up" if ratio > 0 else "down" if ratio < 0 else "flat"
    return (f"+{ratio}%" if ratio > 0 else f"{ratio}%"), trend


def tiles_figure(
    current: list[rollups.Period], previous: list[rollups.Period]
) -> tuple[list[Tile], Figure]:
    """The headline numbers (from the by-key totals of both periods) and their table."""

    def numbers(periods: list[rollups.Period]) -> list[tuple[str, Decimal]]:
        t = merged(periods)
        p95 = t.latency_percentile(0.95)
        active = sum(1 for p in periods if p.group is not None and p.totals.requests)
        return [
            (_("Requests"), Decimal(t.requests)),
            (_("Tokens"), Decimal(tokens(t))),
            (_("Cost"), t.cost),
            (_("Error rate (%)"), Decimal(percent(t.errors, t.requests))),
            (_("p95 latency (ms)"), Decimal(p95 or 0)),
            (_("Active keys"), Decimal(active)),
        ]

    now_values, before_values = numbers(current), numbers(previous)
    tiles, rows = [], []
    for index, ((label, value), (_label, before)) in enumerate(
        zip(now_values, before_values, strict=True)
    ):
        change, trend = _change(value, before)
        shown = money(value)
        tiles.append(Tile(label, tile_value(value, is_money=index == 2), shown, change, trend))
        rows.append([label, shown, money(before), change])
    figure = Figure(
        "tiles",
        _("Summary"),
        [_("Figure"), _("This period"), _("Previous period"), _("Change")],
        rows,
    )
    return tiles, figure


# The sums each dashboard read needs: the figures over time show requests (by status),
# cost and tokens; the tiles add the latency histogram (p95); the by-model figures add
# time to first token.
STACK_MEASURES = ("requests", "cost_units", "input_tokens", "output_tokens")
TIMELINE_MEASURES = ("requests", "cost_units", "input_tokens", "cached_tokens", "output_tokens")
PREVIOUS_MEASURES = (*TIMELINE_MEASURES, *LATENCY_COLUMNS)
TOTAL_MEASURES = (*PREVIOUS_MEASURES, *TTFT_COLUMNS)


@dataclass
class Dashboard:
    tiles: list[Tile]
    figures: dict[str, Figure]
    live: Live | None = None  # the live strip's numbers, when asked for


def build_dashboard(
    query: UsageQuery, *, viewer_sees_all: bool, now: datetime | None = None, live: bool = False
) -> Dashboard:
    """Every figure of the dashboard, from four summarize() reads made at once.

    ``live``: the live strip's numbers too, read beside them.
    """
    now = now or timezone.now()
    filters = query.filters()
    rollups.catch_up_for_reading()  # once, before the reads (they then skip it)
    read = dict(zone=query.zone, now=now, catch_up_first=False, **filters)
    dimension = {value: dim for value, dim, _label in STACKINGS}[query.stack]
    before_start, before_end = query.previous
    # Four reads at once (on PostgreSQL, side by side); each sums only what its
    # figures show (narrower reads are faster).
    stacked, statuses, totals, before_by_key, *live_read = rollups.read_together(
        partial(
            rollups.summarize,
            query.start,
            query.end,
            granularity=query.granularity,
            by=dimension,
            measures=STACK_MEASURES,
            by_status=False,  # (the statuses read has them: far fewer rows by key or user)
            **read,
        ),
        partial(
            rollups.summarize,
            query.start,
            query.end,
            granularity=query.granularity,
            by="status_class",
            measures=TIMELINE_MEASURES,
            **read,
        ),
        # One total read serves three figures: by model, by key and by user.
        partial(
            rollups.summarize,
            query.start,
            query.end,
            granularity="total",
            by=("model", "key_id", "user_id"),
            measures=TOTAL_MEASURES,
            **read,
        ),
        partial(
            rollups.summarize,
            before_start,
            before_end,
            granularity="total",
            by="key_id",
            measures=PREVIOUS_MEASURES,
            **read,
        ),
        *([partial(live_numbers, query, now)] if live else []),
    )
    by_model = rollups.regroup(totals, 0)
    by_key = rollups.regroup(totals, 1)
    by_user = rollups.regroup(totals, 2) if viewer_sees_all else []
    names = Names()
    names.load(
        [p.group for p in by_key] + ([p.group for p in stacked] if dimension == "key_id" else []),
        [p.group for p in by_user] + ([p.group for p in stacked] if dimension == "user_id" else []),
    )
    tiles, summary = tiles_figure(by_key, before_by_key)
    timeline = over_time(statuses, query)
    errors, latency = by_model_figures(by_model)
    figures = [
        summary,
        stacked_figure("cost", _("Cost over time"), _("cost"), stacked, query, dimension, names),
        stacked_figure(
            "requests", _("Requests over time"), _("requests"), stacked, query, dimension, names
        ),
        stacked_figure(
            "tokens", _("Tokens over time"), _("tokens"), stacked, query, dimension, names
        ),
        token_mix_figure(timeline, query),
        status_figure(timeline, query),
        errors,
        latency,
        top_keys_figure(by_key, names, now),
    ]
    if viewer_sees_all:
        figures.append(top_users_figure(by_user, names))
    return Dashboard(
        tiles, {figure.name: figure for figure in figures}, live_read[0] if live_read else None
    )


# --- Views ------------------------------------------------------------------------------


def _choices(query: UsageQuery, viewer_sees_all: bool) -> dict[str, Any]:
    """The filter form's options (keys: the viewer's own for members)."""
    keys = ApiKey.objects.order_by("name", "pk").only("pk", "name", "prefix", "user")
    if not viewer_sees_all:
        keys = keys.filter(user_id=query.user or 0)
    users = (
        User.objects.order_by("email").only("pk", "email")
        if viewer_sees_all
        else User.objects.none()
    )
    return {
        "presets": PRESETS,
        "stackings": [
            (value, label) for value, _dim, label in STACKINGS if viewer_sees_all or value != "user"
        ],
        "sources": UsageSource.choices,
        "statuses": [(status.value, status.label) for status in STATUS_ORDER],
        "key_choices": keys[:500],
        "user_choices": users[:500],
        "zones": ZONES,
    }


def _render(
    request: HttpRequest, query: UsageQuery, template: str, context: dict[str, Any]
) -> HttpResponse:
    """A usage page, its times shown in the page's reporting zone (which it names)."""
    with timezone.override(query.zone):
        return render(request, template, context)


def _query_string(query: UsageQuery, **changes: str) -> str:
    from urllib.parse import urlencode

    values = {**query.raw, **changes}
    return urlencode({name: value for name, value in values.items() if value})


@require_GET
@console_page(read=EVERYONE)
def usage_dashboard(request: HttpRequest) -> HttpResponse:
    query = parse_query(request)
    viewer_sees_all = sees_all(request.user)
    if not viewer_sees_all and query.stack == "user":
        query.stack = "model"
    dashboard = build_dashboard(query, viewer_sees_all=viewer_sees_all, live=True)
    figures = [
        (figure, f"{reverse('console:usage_csv')}?{_query_string(query, figure=figure.name)}")
        for figure in dashboard.figures.values()
    ]
    return _render(
        request,
        query,
        "keys/console/usage/dashboard.html",
        {
            "query": query,
            "sees_all": viewer_sees_all,
            "tiles": dashboard.tiles,
            "figures": figures,
            "charts": {figure.name: figure.chart() for figure in dashboard.figures.values()},
            "stack_links": [
                (value, label, f"?{_query_string(query, stack=value)}", value == query.stack)
                for value, label in _choices(query, viewer_sees_all)["stackings"]
            ],
            "live_url": f"{reverse('console:usage_live')}?{_query_string(query)}",
            "live": dashboard.live,
            "live_poll": LIVE_POLL_SECONDS,
            "log_url": f"{reverse('console:usage_requests')}?{_query_string(query)}",
            **_choices(query, viewer_sees_all),
        },
    )


@require_GET
@console_page(read=EVERYONE)
def usage_csv(request: HttpRequest) -> HttpResponse:
    """A figure's table as CSV (``?figure=``): the same query string, the same numbers."""
    figure = request.GET.get("figure", "tiles")
    query = parse_query(request)
    viewer_sees_all = sees_all(request.user)
    if not viewer_sees_all and query.stack == "user":
        query.stack = "model"
    found = build_dashboard(query, viewer_sees_all=viewer_sees_all).figures.get(figure)
    if found is None:
        raise Http404
    response = HttpResponse(found.csv(), content_type="text/csv; charset=utf-8")
    stamp = f"{query.start.astimezone(query.zone):%Y%m%d-%H%M}"
    response["Content-Disposition"] = f'attachment; filename="usage-{figure}-{stamp}.csv"'
    return response


@dataclass
class Live:
    requests: int
    tokens: int
    errors: int
    cost: str


def live_numbers(query: UsageQuery, now: datetime | None = None) -> Live:
    """The ledger's last 60 s (every worker writes it), with the page's filters."""
    now = now or timezone.now()
    records = filtered_records(query).filter(
        created_at__gt=now - timedelta(seconds=LIVE_SECONDS), created_at__lte=now
    )
    total = rollups.Totals()
    for group in rollups.ledger_groups(records, ("status_class",)):
        total.add(group)
    return Live(total.requests, tokens(total), total.errors, money(total.cost))


@require_GET
@console_page(read=EVERYONE)
def usage_live(request: HttpRequest) -> HttpResponse:
    """The live strip (polled by htmx while the dashboard is open)."""
    query = parse_query(request)
    return render(
        request,
        "keys/console/usage/live.html",
        {
            "live": live_numbers(query),
            "live_url": request.get_full_path(),
            "live_poll": LIVE_POLL_SECONDS,
        },
    )


def status_q(status: str) -> Q:
    """The ledger rows of one status class (as ``keys.rollups`` classes them)."""
    failed = ~Q(status__in=_NOT_ERRORS)
    client = Q(http_status__gte=400, http_status__lt=500)
    return {
        StatusClass.OK: Q(status=UsageStatus.OK),
        StatusClass.CANCELLED: Q(status__in=[UsageStatus.CLIENT_DISCONNECTED, UsageStatus.STOPPED]),
        StatusClass.INTERRUPTED: Q(status=UsageStatus.INTERRUPTED),
        StatusClass.RATE_LIMITED: failed & Q(http_status=429),
        StatusClass.CLIENT_ERROR: failed & client & ~Q(http_status=429),
        StatusClass.UPSTREAM_ERROR: failed & ~client,
    }[StatusClass(status)]


def filtered_records(query: UsageQuery) -> QuerySet[UsageRecord]:
    """Ledger rows matching the filters (each an indexed column or a cheap row test)."""
    records = UsageRecord.objects.all()
    if query.user is not None:
        records = records.filter(user_id=query.user)
    if query.key is not None:
        records = records.filter(key_id=query.key)
    if query.model:
        records = records.filter(model=query.model)
    if query.provider:
        records = records.filter(provider=query.provider)
    if query.source == UsageSource.BROWSER:
        records = records.filter(dialect="browser")
    elif query.source == UsageSource.API:
        records = records.exclude(dialect="browser")
    if query.status:
        records = records.filter(status_q(query.status))
    if query.route is not None:
        records = records.filter(route_id=query.route)
    if query.flag:
        records = records.filter(FLAGS[query.flag])
    if query.request_id:
        records = records.filter(request_id=query.request_id)
    return records


@require_GET
@console_page(read=EVERYONE)
def usage_requests(request: HttpRequest) -> HttpResponse:
    """The request log: newest first, keyset-paged, the dashboard's filters plus request id."""
    query = parse_query(request)
    viewer_sees_all = sees_all(request.user)
    records = filtered_records(query).select_related("user", "key")
    if query.ranged:  # a link from a report or a dashboard: that range's requests only
        records = records.filter(created_at__gte=query.start, created_at__lt=query.end)
    page = keyset_page(request, records, by_time="created_at" if query.ranged else None)
    for record in page.rows:
        record.cost_text = money(record.cost)  # type: ignore[attr-defined]
    return _render(
        request,
        query,
        "keys/console/usage/requests.html",
        {
            "query": query,
            "sees_all": viewer_sees_all,
            "page": page,
            "dashboard_url": f"{reverse('console:usage')}?{_query_string(query)}",
            "unranged_url": "?" + _query_string(query, range="", **{"from": "", "to": ""}),
            **_choices(query, viewer_sees_all),
        },
    )


@require_GET
@console_page(read=EVERYONE)
def usage_request(request: HttpRequest, pk: int) -> HttpResponse:
    """Everything recorded about one request (no message bodies: they are never stored)."""
    records = UsageRecord.objects.select_related("user", "key")
    if not sees_all(request.user):
        records = records.filter(user_id=request.user.pk or 0)
    record = get_object_or_404(records, pk=pk)
    query = parse_query(request)
    return _render(
        request,
        query,
        "keys/console/usage/request.html",
        {
            "record": record,
            "zone": query.zone.key,
            "status_class": _status_class_of(record).label,
            "amounts": {
                name: money(getattr(record, name))
                for name in (
                    "input_price",
                    "cached_input_price",
                    "cache_write_price",
                    "output_price",
                    "cost",
                    "upstream_cost",
                )
            },
            "sees_all": sees_all(request.user),
        },
    )


def _status_class_of(record: UsageRecord) -> StatusClass:
    """The record's status class, as ``status_q`` (and the roll-ups) class it."""
    if record.status == UsageStatus.OK:
        return StatusClass.OK
    if record.status in (UsageStatus.CLIENT_DISCONNECTED, UsageStatus.STOPPED):
        return StatusClass.CANCELLED
    if record.status == UsageStatus.INTERRUPTED:
        return StatusClass.INTERRUPTED
    if record.http_status == 429:
        return StatusClass.RATE_LIMITED
    if 400 <= record.http_status < 500:
        return StatusClass.CLIENT_ERROR
    return StatusClass.UPSTREAM_ERROR
