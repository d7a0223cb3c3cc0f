"""Finance reports: the usage and cost of a period, grouped, beside the period before.

A report covers whole local days of a reporting time zone: a calendar month, a
quarter, or custom dates (``[from, to)``, ``to`` excluded, as ``manage.py report``
takes them).  It is grouped by one or two of user, key, model, provider, route,
source and day, and read from ``keys.rollups.summarize``: roll-ups plus the raw
ledger of the open and dirty buckets, exact in any zone (every local midnight is a
15-minute boundary) and exact in money (integer 10⁻¹² units, ``Decimal`` out).

One ``Report`` object feeds the console page, the command and every export (JSON,
CSV, XLSX, a text table), so a file's totals always equal the page's.  Money leaves
as decimal strings (JSON, CSV) or numeric XLSX cells holding the exact decimal
text with a currency number format; never a binary float.

Who sees what is the caller's business: a member's report is built with
``filters.user`` forced to themselves and ``show_margin=False`` (what the providers
charge us is not theirs to read).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.utils import timezone
from django.utils.functional import Promise
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy

from accounts.models import User
from keys import rollups
from keys.models import ApiKey, UsageSource

# Grouping name (query string, command, JSON field) → summarize dimension ("day" is a period).
GROUPS: dict[str, str] = {
    "user": "user_id",
    "key": "key_id",
    "model": "model",
    "provider": "provider",
    "route": "route_id",
    "source": "source",
    "day": "day",
}
GROUP_LABELS: dict[str, Promise] = {
    "user": gettext_lazy("User"),
    "key": gettext_lazy("Key"),
    "model": gettext_lazy("Model"),
    "provider": gettext_lazy("Provider"),
    "route": gettext_lazy("Route"),
    "source": gettext_lazy("Source"),
    "day": gettext_lazy("Day"),
}
MAX_GROUPS = 2
KINDS = ("month", "quarter", "custom")
FLAGS = ("unpriced", "estimated", "zero_cost")
FLAG_LABELS: dict[str, Promise] = {
    "unpriced": gettext_lazy("Requests of models without a price"),
    "estimated": gettext_lazy("Requests with estimated token counts"),
    "zero_cost": gettext_lazy("Requests with tokens and zero cost"),
}
# XLSX number formats: money shows 2 to 12 decimals (the ledger's scale), exact.
TOKENS_FORMAT = "#,##0"
CHANGE_FORMAT = "+0.0;-0.0;0.0"


class ReportError(ValueError):
    """A refused report argument; ``option`` names it (``from``, ``group-by``...)."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
        self.message = message


# --- Periods ----------------------------------------------------------------------------


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    """The start of ``day`` in ``zone`` (an aware datetime, on a 15-minute boundary)."""
    return datetime(day.year, day.month, day.day, tzinfo=zone)


def _add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


@dataclass(frozen=True)
class ReportPeriod:
    """Whole local days ``[first_day, end_day)`` in ``zone``; ``kind`` says how they were chosen."""

    kind: str  # month | quarter | custom
    first_day: date
    end_day: date  # excluded
    zone: ZoneInfo

    @property
    def start(self) -> datetime:
        return local_midnight(self.first_day, self.zone)

    @property
    def end(self) -> datetime:
        return local_midnight(self.end_day, self.zone)

    @property
    def last_day(self) -> date:
        return self.end_day - timedelta(days=1)

    @property
    def days(self) -> int:
        return (self.end_day - self.first_day).days

    @property
    def label(self) -> str:
        if self.kind == "month":
            return f"{self.first_day:%Y-%m}"
        if self.kind == "quarter":
            return f"{self.first_day.year}-Q{(self.first_day.month - 1) // 3 + 1}"
        return f"{self.first_day.isoformat()} – {self.last_day.isoformat()}"

    def previous(self) -> ReportPeriod:
        """The period before: the month or quarter before, or as many days just before."""
        if self.kind in ("month", "quarter"):
            months = 1 if self.kind == "month" else 3
            return replace(
                self, first_day=_add_months(self.first_day, -months), end_day=self.first_day
            )
        return replace(
            self, first_day=self.first_day - timedelta(days=self.days), end_day=self.first_day
        )

    def following(self) -> ReportPeriod:
        if self.kind in ("month", "quarter"):
            months = 1 if self.kind == "month" else 3
            return replace(self, first_day=self.end_day, end_day=_add_months(self.end_day, months))
        return replace(self, first_day=self.end_day, end_day=self.end_day + timedelta(self.days))


def month_period(year: int, month: int, zone: ZoneInfo) -> ReportPeriod:
    first = date(year, month, 1)
    return ReportPeriod("month", first, _add_months(first, 1), zone)


def quarter_period(year: int, quarter: int, zone: ZoneInfo) -> ReportPeriod:
    first = date(year, 3 * (quarter - 1) + 1, 1)
    return ReportPeriod("quarter", first, _add_months(first, 3), zone)


def dates_period(first_day: date, end_day: date, zone: ZoneInfo) -> ReportPeriod:
    """Custom dates (``end_day`` excluded); a whole calendar month or quarter is named so."""
    if first_day.day == 1 and end_day == _add_months(first_day, 1):
        return ReportPeriod("month", first_day, end_day, zone)
    if first_day.day == 1 and first_day.month % 3 == 1 and end_day == _add_months(first_day, 3):
        return ReportPeriod("quarter", first_day, end_day, zone)
    return ReportPeriod("custom", first_day, end_day, zone)


def current_month(zone: ZoneInfo, now: datetime | None = None) -> ReportPeriod:
    local = (now or timezone.now()).astimezone(zone)
    return month_period(local.year, local.month, zone)


def parse_zone(text: str, option: str = "tz") -> ZoneInfo:
    try:
        return ZoneInfo(text.strip())
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ReportError(
            option, _("Unknown time zone “%(zone)s”.") % {"zone": text.strip()}
        ) from error


def parse_day(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text.strip())
    except ValueError as error:
        raise ReportError(
            option,
            _("“%(value)s” is not a date (YYYY-MM-DD).") % {"value": text.strip()},
        ) from error


def parse_month(text: str, zone: ZoneInfo, option: str = "month") -> ReportPeriod:
    try:
        first = datetime.strptime(text.strip(), "%Y-%m").date()  # noqa: DTZ007 - a calendar month
    except ValueError as error:
        raise ReportError(
            option, _("“%(value)s” is not a month (YYYY-MM).") % {"value": text.strip()}
        ) from error
    return month_period(first.year, first.month, zone)


def parse_quarter(text: str, zone: ZoneInfo, option: str = "quarter") -> ReportPeriod:
    """``2026-Q4`` (or ``2026Q4``, ``2026-q4``)."""
    cleaned = text.strip().upper().replace("-", "")
    year, _sep, quarter = cleaned.partition("Q")
    if not (len(year) == 4 and year.isdigit() and quarter in ("1", "2", "3", "4")):
        raise ReportError(
            option, _("“%(value)s” is not a quarter (YYYY-Q1 to YYYY-Q4).") % {"value": text}
        )
    return quarter_period(int(year), int(quarter), zone)


def parse_dates(
    first: str, end: str, zone: ZoneInfo, *, options: tuple[str, str] = ("from", "to")
) -> ReportPeriod:
    first_day, end_day = parse_day(first, options[0]), parse_day(end, options[1])
    if end_day <= first_day:
        raise ReportError(
            options[1],
            _("“%(end)s” must come after “%(start)s” (the end date is excluded).")
            % {"start": first_day.isoformat(), "end": end_day.isoformat()},
        )
    return dates_period(first_day, end_day, zone)


def parse_group_by(values: Iterable[str], option: str = "group-by") -> tuple[str, ...]:
    """``model``, ``model,key`` or several values: at most two distinct groupings, in order."""
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in GROUPS:
                raise ReportError(
                    option,
                    _("Unknown grouping “%(value)s”: expected %(choices)s.")
                    % {"value": name, "choices": ", ".join(GROUPS)},
                )
            if name in names:
                raise ReportError(option, _("“%(value)s” is named twice.") % {"value": name})
            names.append(name)
    if len(names) > MAX_GROUPS:
        raise ReportError(option, _("Group by at most %(count)d of them.") % {"count": MAX_GROUPS})
    return tuple(names)


# --- Filters and names ------------------------------------------------------------------


@dataclass(frozen=True)
class ReportFilters:
    user: int | None = None
    key: int | None = None
    model: str = ""
    provider: str = ""
    route: int | None = None
    source: str = ""

    def summarize_kwargs(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "key": self.key,
            "model": self.model or None,
            "provider": self.provider or None,
            "route": self.route,
            "source": self.source or None,
        }

    def items(self) -> list[tuple[str, Any]]:
        """The filters set, by grouping name."""
        return [(name, value) for name, value in vars(self).items() if value not in (None, "")]


@dataclass
class Labels:
    """Readable names of the users, keys and routes a report shows (looked up once)."""

    users: dict[int, str] = field(default_factory=dict)
    keys: dict[int, tuple[str, str]] = field(default_factory=dict)  # id → (name, prefix)
    routes: dict[int, str] = field(default_factory=dict)

    def load(
        self, user_ids: Iterable[Any], key_ids: Iterable[Any], route_ids: Iterable[Any]
    ) -> Labels:
        from chatapp.models import Route

        wanted_users = {u for u in user_ids if u is not None} - set(self.users)
        wanted_keys = {k for k in key_ids if k is not None} - set(self.keys)
        wanted_routes = {r for r in route_ids if r is not None} - set(self.routes)
        for user in User.objects.filter(pk__in=wanted_users).only("pk", "email"):
            self.users[user.pk] = user.email
        for key in ApiKey.objects.filter(pk__in=wanted_keys).only("pk", "name", "prefix"):
            self.keys[key.pk] = (key.name, key.prefix)
        for route in Route.objects.filter(pk__in=wanted_routes).select_related("model", "provider"):
            self.routes[route.pk] = str(route)
        return self

    def value(self, name: str, raw: Any) -> Any:
        """The exported value: an email, a key prefix, a route's name, an ISO date..."""
        if raw is None or raw == "":
            return None
        if name == "user":
            return self.users.get(raw, f"#{raw}")
        if name == "key":
            return self.keys[raw][1] if raw in self.keys else f"#{raw}"
        if name == "route":
            return self.routes.get(raw, f"#{raw}")
        if name == "day":
            return raw.isoformat()
        return raw

    def display(self, name: str, raw: Any) -> str:
        """The page's label: a key's name beside its prefix, a source's translated name."""
        if raw is None or raw == "":
            return _("(none)")
        if name == "key" and raw in self.keys:
            key_name, prefix = self.keys[raw]
            return f"{key_name or _('(unnamed)')} ({prefix}…)"
        if name == "source" and raw in UsageSource.values:
            return str(UsageSource(raw).label)
        return str(self.value(name, raw))


# --- The report ---------------------------------------------------------------------------


def money(value: Decimal) -> str:
    """An exact decimal string, without exponent or trailing zeros (0 → ``0``)."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0E-12") else text


def change(now_value: Decimal, before: Decimal) -> Decimal | None:
    """The change in percent, to one decimal; None when there is nothing to compare with."""
    if not before:
        return None
    return ((now_value - before) * 100 / before).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def counters(totals: rollups.Totals, *, show_margin: bool = True) -> dict[str, Any]:
    """A row's or the totals' numbers, as the JSON holds them (money as decimal strings)."""
    found: dict[str, Any] = {
        "requests": totals.requests,
        "failed": totals.errors,
        "input_tokens": totals.input_tokens,
        "cached_tokens": totals.cached_tokens,
        "output_tokens": totals.output_tokens,
        "cost": money(totals.cost),
    }
    if show_margin:
        found["upstream_cost"] = money(totals.upstream_cost)
        found["margin"] = money(totals.margin)
    return found


def flag_counts(totals: rollups.Totals) -> dict[str, int]:
    return {name: getattr(totals, name) for name in FLAGS}


def _merge(into: rollups.Totals, other: rollups.Totals) -> None:
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
        setattr(into, name, getattr(into, name) + getattr(other, name))
    for status, count in other.by_status.items():
        into.by_status[status] = into.by_status.get(status, 0) + count


def total_of(many: Iterable[rollups.Totals]) -> rollups.Totals:
    total = rollups.Totals()
    for totals in many:
        _merge(total, totals)
    return total


@dataclass
class Row:
    group: tuple[Any, ...]  # raw values in ``group_by`` order (ids, names, dates)
    values: dict[str, Any]  # exported group values by grouping name
    labels: list[str]  # the page's labels
    totals: rollups.Totals
    previous: rollups.Totals | None  # None when rows are days (nothing to line up with)

    @property
    def change(self) -> Decimal | None:
        return None if self.previous is None else change(self.totals.cost, self.previous.cost)


@dataclass
class Column:
    """One column of the files: its title, how a row fills it, and how XLSX shows it."""

    name: str
    title: str
    kind: str  # text | count | money | change


@dataclass
class Report:
    period: ReportPeriod
    group_by: tuple[str, ...]
    filters: ReportFilters
    filter_values: list[tuple[str, Any]]  # (grouping name, exported value) of the filters set
    currency: str
    generated_at: datetime
    rows: list[Row]
    totals: rollups.Totals
    previous_totals: rollups.Totals
    show_margin: bool = True

    @property
    def compares_rows(self) -> bool:
        return "day" not in self.group_by

    @property
    def flags(self) -> dict[str, int]:
        return flag_counts(self.totals)

    @property
    def total_change(self) -> Decimal | None:
        return change(self.totals.cost, self.previous_totals.cost)

    # --- JSON -----------------------------------------------------------------------

    def as_json(self) -> dict[str, Any]:
        """The command's ``--format json`` object (extra keys: previous, generated_at)."""
        previous = self.period.previous()
        found: dict[str, Any] = {
            "from": self.period.first_day.isoformat(),
            "to": self.period.end_day.isoformat(),
            "tz": self.period.zone.key,
            "currency": self.currency,
            "group_by": list(self.group_by),
            "rows": [
                {**row.values, **counters(row.totals, show_margin=self.show_margin)}
                for row in self.rows
            ],
            "totals": counters(self.totals, show_margin=self.show_margin),
            "flags": self.flags,
            "previous": {
                "from": previous.first_day.isoformat(),
                "to": previous.end_day.isoformat(),
                "totals": counters(self.previous_totals, show_margin=self.show_margin),
            },
            "generated_at": self.generated_at.isoformat(timespec="seconds"),
        }
        if self.filter_values:
            found["filters"] = dict(self.filter_values)
        return found

    def json(self) -> str:
        return json.dumps(self.as_json(), ensure_ascii=False, indent=2) + "\n"

    # --- Tables (CSV, XLSX, text) -----------------------------------------------------

    def columns(self) -> list[Column]:
        found = [Column(name, str(GROUP_LABELS[name]), "text") for name in self.group_by]
        found += [
            Column("requests", _("Requests"), "count"),
            Column("failed", _("Failed"), "count"),
            Column("input_tokens", _("Input tokens"), "count"),
            Column("cached_tokens", _("Cached input tokens"), "count"),
            Column("output_tokens", _("Output tokens"), "count"),
            Column("cost", _("Cost"), "money"),
        ]
        if self.show_margin:
            found += [
                Column("upstream_cost", _("Upstream cost"), "money"),
                Column("margin", _("Margin"), "money"),
            ]
        if self.compares_rows:
            found += [
                Column("previous_cost", _("Previous period cost"), "money"),
                Column("change", _("Change (%)"), "change"),
            ]
        return found

    def cells(
        self, values: dict[str, Any], totals: rollups.Totals, previous: rollups.Totals | None
    ) -> list[Any]:
        """One line of the table as exact values: str, int, Decimal or None."""
        numbers: dict[str, Any] = {
            "requests": totals.requests,
            "failed": totals.errors,
            "input_tokens": totals.input_tokens,
            "cached_tokens": totals.cached_tokens,
            "output_tokens": totals.output_tokens,
            "cost": Decimal(money(totals.cost)),
            "upstream_cost": Decimal(money(totals.upstream_cost)),
            "margin": Decimal(money(totals.margin)),
            "previous_cost": None if previous is None else Decimal(money(previous.cost)),
            "change": None if previous is None else change(totals.cost, previous.cost),
        }
        return [
            values.get(column.name) if column.kind == "text" else numbers[column.name]
            for column in self.columns()
        ]

    def table_rows(self) -> list[list[Any]]:
        """The header line, a line per row, and the total line."""
        lines: list[list[Any]] = [[column.title for column in self.columns()]]
        if not self.group_by:  # one row, the same as the total: the total line alone
            lines.append(self.cells({}, self.totals, self.previous_totals))
            return lines
        for row in self.rows:
            lines.append(self.cells(row.values, row.totals, row.previous))
        lines.append(self.cells({self.group_by[0]: _("Total")}, self.totals, self.previous_totals))
        return lines

    def header(self) -> list[tuple[str, str]]:
        """The block every file starts with: period, zone, currency, grouping, filters..."""
        previous = self.period.previous()
        zone = self.period.zone.key
        lines = [
            (_("Report"), _("Switchboard usage and cost")),
            (_("Period"), self.period.label),
            (_("From"), f"{self.period.first_day.isoformat()} 00:00 {zone}"),
            (_("To (excluded)"), f"{self.period.end_day.isoformat()} 00:00 {zone}"),
            (_("Time zone"), zone),
            (_("Currency"), self.currency),
            (
                _("Grouping"),
                " + ".join(str(GROUP_LABELS[name]) for name in self.group_by) or _("none"),
            ),
            (
                _("Filters"),
                "; ".join(f"{GROUP_LABELS[name]}: {value}" for name, value in self.filter_values)
                or _("none"),
            ),
            (
                _("Generated at"),
                self.generated_at.astimezone(self.period.zone).isoformat(timespec="seconds"),
            ),
            (
                _("Previous period"),
                f"{previous.first_day.isoformat()} – {previous.last_day.isoformat()}",
            ),
        ]
        lines += [(str(FLAG_LABELS[name]), str(count)) for name, count in self.flags.items()]
        return lines

    def csv(self) -> str:
        """The header block, a blank line, then the table; money as plain decimal strings."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows(self.header())
        writer.writerow([])
        for line in self.table_rows():
            writer.writerow([cell_text(cell) for cell in line])
        return buffer.getvalue()

    def xlsx(self) -> bytes:
        """One sheet: the header block, then the table with numeric, formatted cells."""
        from openpyxl import Workbook
        from openpyxl.styles import Font
        from openpyxl.utils import get_column_letter

        money_format = f"[${self.currency}] #,##0.00##########"
        formats = {"count": TOKENS_FORMAT, "money": money_format, "change": CHANGE_FORMAT}
        book = Workbook()
        sheet = book.active
        assert sheet is not None
        sheet.title = _("Report")[:31]
        bold = Font(bold=True)
        for label, value in self.header():
            sheet.append([label, value])
            sheet.cell(row=sheet.max_row, column=1).font = bold
        sheet.append([])
        columns = self.columns()
        lines = self.table_rows()
        first_line = sheet.max_row + 1
        for index, line in enumerate(lines):
            sheet.append(line)
            number = sheet.max_row
            if index == 0 or index == len(lines) - 1:
                for cell in sheet[number]:
                    cell.font = bold
            if index == 0:
                continue
            for position, column in enumerate(columns, start=1):
                cell = sheet.cell(row=number, column=position)
                if column.kind in formats:
                    cell.number_format = formats[column.kind]
                if isinstance(cell.value, Decimal):
                    exact_number(cell, cell.value)
        sheet.freeze_panes = sheet.cell(row=first_line + 1, column=1)
        for position, column in enumerate(columns, start=1):
            width = 16 if column.kind != "text" else 24
            sheet.column_dimensions[get_column_letter(position)].width = width
        sheet.column_dimensions["A"].width = 36
        buffer = io.BytesIO()
        book.save(buffer)
        return buffer.getvalue()

    def text(self) -> str:
        """A plain table for a terminal (``--format table``)."""
        lines = [[cell_text(cell) for cell in line] for line in self.table_rows()]
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        kinds = [column.kind for column in self.columns()]

        def render(line: Sequence[str]) -> str:
            return "  ".join(
                cell.ljust(width) if kind == "text" else cell.rjust(width)
                for cell, width, kind in zip(line, widths, kinds, strict=True)
            ).rstrip()

        out = [f"{label}: {value}" for label, value in self.header()]
        out.append("")
        out.append(render(lines[0]))
        out.append("  ".join("-" * width for width in widths))
        out += [render(line) for line in lines[1:-1]]
        out.append("  ".join("-" * width for width in widths))
        out.append(render(lines[-1]))
        return "\n".join(out) + "\n"


def exact_number(cell: Any, value: Decimal) -> None:
    """Store ``value`` in a numeric XLSX cell as its exact decimal text.

    openpyxl writes numbers with ``%.16g`` (a binary float's 16 digits): 123456.789012345678
    would become 123456.7890123457 in the file.  A numeric cell's XML text may hold any
    decimal, so the exact one is written instead (the cell stays numeric: Excel reads the
    nearest double and shows its 15 digits; a reader of the file's text gets every digit).
    """
    cell.value = value  # numeric type ("n") and the cell's bookkeeping
    cell._value = money(value)  # what the writer puts in <v>, unchanged (it is a str)


def cell_text(cell: Any) -> str:
    if cell is None:
        return ""
    if isinstance(cell, Decimal):
        return money(cell)
    return str(cell)


# --- Building -----------------------------------------------------------------------------


def _sort_key(group_by: tuple[str, ...], rows: list[Row]) -> Callable[[Row], tuple[Any, ...]]:
    """Days in order; other groups by cost, highest first (the first level by its subtotal)."""
    first_costs: dict[Any, int] = {}
    for row in rows:
        first = row.group[0] if row.group else None
        first_costs[first] = first_costs.get(first, 0) + row.totals.cost_units

    def key(row: Row) -> tuple[Any, ...]:
        parts: list[Any] = []
        for level, name in enumerate(group_by):
            raw = row.group[level]
            if name == "day":
                parts += [raw.toordinal(), ""]
            else:
                cost = first_costs[raw] if level == 0 else row.totals.cost_units
                parts += [-cost, row.labels[level]]
        return tuple(parts)

    return key


def build(
    period: ReportPeriod,
    *,
    group_by: Sequence[str] = (),
    filters: ReportFilters | None = None,
    show_margin: bool = True,
    now: datetime | None = None,
) -> Report:
    """The report of ``period``: three grouped reads (the labels, this period, the one before)."""
    group_by = tuple(group_by)
    filters = filters or ReportFilters()
    now = now or timezone.now()
    dimensions = tuple(GROUPS[name] for name in group_by if name != "day")
    by_day = "day" in group_by
    read = {"zone": period.zone, "now": now, **filters.summarize_kwargs()}
    found = rollups.summarize(
        period.start,
        period.end,
        granularity="day" if by_day else "total",
        by=dimensions,
        **read,
    )
    previous_period = period.previous()
    before = rollups.summarize(
        previous_period.start,
        previous_period.end,
        granularity="total",
        by=() if by_day else dimensions,
        **read,
    )

    def raw_group(found_period: rollups.Period) -> tuple[Any, ...]:
        values = dict(zip(dimensions, found_period.group or (), strict=True))
        values["day"] = found_period.start.date()  # the local day (period.start is local)
        return tuple(values[GROUPS[name]] for name in group_by)

    ids: dict[str, set[Any]] = {"user": set(), "key": set(), "route": set()}
    for found_period in found:
        for name, raw in zip(group_by, raw_group(found_period), strict=True):
            if name in ids:
                ids[name].add(raw)
    labels = Labels().load(
        ids["user"] | {filters.user}, ids["key"] | {filters.key}, ids["route"] | {filters.route}
    )
    previous_by_group = {
        tuple(found_period.group or ()): found_period.totals for found_period in before
    }
    rows = []
    for found_period in found:
        group = raw_group(found_period)
        rows.append(
            Row(
                group=group,
                values={
                    name: labels.value(name, raw) for name, raw in zip(group_by, group, strict=True)
                },
                labels=[
                    labels.display(name, raw) for name, raw in zip(group_by, group, strict=True)
                ],
                totals=found_period.totals,
                previous=(
                    None
                    if by_day
                    else previous_by_group.get(tuple(found_period.group or ()), rollups.Totals())
                ),
            )
        )
    rows.sort(key=_sort_key(group_by, rows))
    return Report(
        period=period,
        group_by=group_by,
        filters=filters,
        filter_values=[(name, labels.value(name, value)) for name, value in filters.items()],
        currency=settings.SWITCHBOARD_CURRENCY,
        generated_at=now.astimezone(period.zone),
        rows=rows,
        totals=total_of(row.totals for row in rows),
        previous_totals=total_of(p.totals for p in before),
        show_margin=show_margin,
    )
