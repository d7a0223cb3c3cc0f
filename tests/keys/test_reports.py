"""Finance reports (keys.reports, keys.report_views, ``manage.py report``).

Every figure is checked against the raw ledger summed by hand: per grouping, per
period (month, quarter, custom dates), in UTC, Asia/Shanghai, Asia/Kolkata (+05:30)
and America/New_York across the end of DST, with records on and just before local
midnights.  The CSV and XLSX files read back equal the JSON; a member never sees
another user's rows.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.utils import translation
from openpyxl import load_workbook

from accounts.models import User
from chatapp.models import CatalogModel, Provider, Route
from chatapp.relay import pipeline
from keys import limiter, reports, rollups
from keys.actions import do_set_price
from keys.models import ApiKey, UsageRecord
from tests.conftest import make_user
from tests.fake_upstream import Reply
from tests.gateway import Gateway

pytestmark = pytest.mark.django_db

NOW = datetime(2027, 1, 10, tzinfo=UTC)  # after every record: nothing is in the open bucket
NEW_YORK = ZoneInfo("America/New_York")  # DST ends 2026-11-01 02:00 EDT → 01:00 EST
ZONES = ["UTC", "Asia/Shanghai", "Asia/Kolkata", "America/New_York"]
OUTCOMES = [
    ("ok", 200),
    ("ok", 200),
    ("ok", 200),
    ("error", 429),
    ("error", 400),
    ("error", 502),
    ("client_disconnected", 200),
    ("stopped", 200),
    ("interrupted", 200),
]
NOT_FAILED = ("ok", "client_disconnected", "stopped", "interrupted")
COUNTERS = ("requests", "failed", "input_tokens", "cached_tokens", "output_tokens")
MONEY = ("cost", "upstream_cost", "margin")


@pytest.fixture(autouse=True)
def _english_afterwards() -> Iterator[None]:
    yield
    translation.deactivate()


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- A ledger with awkward times ---------------------------------------------------------


def boundary_times() -> list[datetime]:
    """Local midnights of every zone around the month ends (and 1 µs before), the doubled hour."""
    moments = []
    for name in ZONES:
        zone = ZoneInfo(name)
        for day in (date(2026, 10, 1), date(2026, 11, 1), date(2026, 11, 2), date(2026, 12, 1)):
            midnight = datetime(day.year, day.month, day.day, tzinfo=zone)
            moments += [midnight, midnight - timedelta(microseconds=1)]
    # New York's 01:30 happens twice on 2026-11-01: both belong to that local day.
    moments += [
        datetime(2026, 11, 1, 1, 30, tzinfo=NEW_YORK, fold=0),
        datetime(2026, 11, 1, 1, 30, tzinfo=NEW_YORK, fold=1),
    ]
    return moments


@pytest.fixture
def ledger(alice: User, bob: User) -> dict[str, Any]:
    """Three users' usage over Q3-Q4 2026: part rolled up, part only in the raw ledger."""
    rng = random.Random(2026)
    users = [alice, bob, make_user("dan@x.org")]
    keys = [
        ApiKey.issue(user=user, name=f"{user.email[:3]}-{n}")[0] for user in users for n in (1, 2)
    ]
    provider = Provider.objects.create(name="acme", type="openai", base_url="http://x/v1")
    model = CatalogModel.objects.create(name="acme-large")
    route = Route.objects.create(model=model, provider=provider, upstream_model="large-v2")

    def make(when: datetime) -> UsageRecord:
        key = rng.choice([*keys, None])
        status, http = rng.choice(OUTCOMES)
        tokens = rng.random() < 0.9
        cost = Decimal(rng.randrange(0, 10**11)).scaleb(-12) if rng.random() < 0.85 else Decimal(0)
        return UsageRecord(
            created_at=when,
            request_id=f"r{rng.getrandbits(64):x}",
            user_id=key.user_id if key else rng.choice(users).pk,
            key=key,
            endpoint="chat.completions",
            dialect=rng.choice(["openai", "anthropic", "browser"]),
            model=rng.choice(["gpt-x", "claude-y", "acme-large"]),
            provider=rng.choice(["openai", "anthropic", ""]),
            route_id=rng.choice([route.pk, 99_999, None]),
            input_tokens=rng.randrange(1, 5000) if tokens else 0,
            output_tokens=rng.randrange(0, 2000) if tokens else 0,
            cached_tokens=rng.randrange(0, 500) if tokens else 0,
            estimated=rng.random() < 0.1,
            priced=cost > 0 or rng.random() < 0.5,
            status=status,
            http_status=http,
            cost=cost,
            upstream_cost=(cost * Decimal("0.7")).quantize(Decimal("1E-12")),
            latency_ms=100,
        )

    start = datetime(2026, 9, 25, tzinfo=UTC)
    span = (datetime(2027, 1, 3, tzinfo=UTC) - start).total_seconds()
    first = [make(start + timedelta(seconds=rng.uniform(0, span))) for _ in range(400)]
    first += [make(moment) for moment in boundary_times()]
    # The smallest charge, alone in its model: a float would print it as 1e-12.
    tiny = make(datetime(2026, 11, 20, 12, tzinfo=UTC))
    tiny.model, tiny.cost, tiny.upstream_cost = "tiny", Decimal("1E-12"), Decimal(0)
    first.append(tiny)
    if connection.vendor == "postgresql":
        # A charge too precise for a binary float (18 significant digits).  Not on
        # SQLite: it keeps decimals as doubles, so it holds 15 significant digits only.
        big = make(datetime(2026, 11, 20, 12, tzinfo=UTC))
        big.cost, big.upstream_cost = Decimal("123456.789012345678"), Decimal("98765.4321098765")
        first.append(big)
    UsageRecord.objects.bulk_create(first)
    while not rollups.roll_up(now=NOW, max_buckets=10_000).done:
        pass
    # Late rows after the roll-up: their buckets are dirty and read from the raw ledger.
    late = [make(start + timedelta(seconds=rng.uniform(0, span))) for _ in range(60)]
    late += [make(moment + timedelta(seconds=1)) for moment in boundary_times()]
    UsageRecord.objects.bulk_create(late)
    return {"users": users, "keys": keys, "route": route}


def by_hand(
    period: reports.ReportPeriod, group_by: tuple[str, ...], user: int | None = None
) -> tuple[dict[tuple[Any, ...], dict[str, Any]], dict[str, Any]]:
    """The report's rows and totals summed from the raw ledger, one record at a time."""
    routes = {route.pk: str(route) for route in Route.objects.all()}
    rows: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(
        lambda: {**dict.fromkeys(COUNTERS, 0), **dict.fromkeys(MONEY, Decimal(0))}
    )
    total: dict[str, Any] = {**dict.fromkeys(COUNTERS, 0), **dict.fromkeys(MONEY, Decimal(0))}
    for record in UsageRecord.objects.select_related("user", "key"):
        local = record.created_at.astimezone(period.zone)
        if not period.first_day <= local.date() < period.end_day:
            continue
        if user is not None and record.user_id != user:
            continue
        values = {
            "user": record.user.email if record.user else None,
            "key": record.key.prefix if record.key else None,
            "model": record.model or None,
            "provider": record.provider or None,
            "route": None
            if record.route_id is None
            else routes.get(record.route_id, f"#{record.route_id}"),
            "source": "browser" if record.dialect == "browser" else "api",
            "day": local.date().isoformat(),
        }
        for found in (rows[tuple(values[name] for name in group_by)], total):
            found["requests"] += 1
            found["failed"] += record.status not in NOT_FAILED
            found["input_tokens"] += record.input_tokens
            found["cached_tokens"] += record.cached_tokens
            found["output_tokens"] += record.output_tokens
            found["cost"] += record.cost
            found["upstream_cost"] += record.upstream_cost
            found["margin"] += record.cost - record.upstream_cost
    return dict(rows), total


def exact(counters: dict[str, Any]) -> dict[str, Any]:
    """A JSON row's counters with money back to Decimal (and the group fields dropped)."""
    return {
        **{name: counters[name] for name in COUNTERS},
        **{name: Decimal(counters[name]) for name in MONEY if name in counters},
    }


PERIODS = [
    ("month", lambda zone: reports.month_period(2026, 11, zone)),
    ("quarter", lambda zone: reports.quarter_period(2026, 4, zone)),
    ("custom", lambda zone: reports.dates_period(date(2026, 10, 30), date(2026, 11, 3), zone)),
]
GROUPINGS = [
    (),
    ("model",),
    ("user", "key"),
    ("day",),
    ("day", "model"),
    ("route", "source"),
    ("provider", "day"),
]


@pytest.mark.parametrize("zone_name", ZONES)
def test_report_totals_equal_the_raw_ledger_in_every_zone_grouping_and_period(
    ledger: dict[str, Any], zone_name: str
) -> None:
    zone = ZoneInfo(zone_name)
    for kind, make_period in PERIODS:
        period = make_period(zone)
        assert period.kind == kind
        for group_by in GROUPINGS:
            report = reports.build(period, group_by=group_by, now=NOW).as_json()
            want_rows, want_total = by_hand(period, group_by)
            got_rows = {tuple(row[name] for name in group_by): exact(row) for row in report["rows"]}
            assert got_rows == want_rows, (zone_name, kind, group_by)
            assert exact(report["totals"]) == want_total, (zone_name, kind, group_by)
            assert want_total["requests"] > 0
        # The period before, the same way.
        previous = period.previous()
        _rows, want_previous = by_hand(previous, ())
        assert (
            exact(reports.build(period, now=NOW).as_json()["previous"]["totals"]) == want_previous
        )


def test_a_new_york_day_across_the_end_of_dst_holds_its_25_hours(ledger: dict[str, Any]) -> None:
    period = reports.dates_period(date(2026, 11, 1), date(2026, 11, 2), NEW_YORK)
    assert period.end.astimezone(UTC) - period.start.astimezone(UTC) == timedelta(hours=25)
    report = reports.build(period, group_by=("day",), now=NOW).as_json()
    [row] = report["rows"]
    assert row["day"] == "2026-11-01"
    want_rows, _total = by_hand(period, ("day",))
    assert exact(row) == want_rows[("2026-11-01",)]
    # Both 01:30s are in it, twice each (the second batch is a second later).
    doubled = [datetime(2026, 11, 1, 1, 30, tzinfo=NEW_YORK, fold=fold) for fold in (0, 1)]
    assert doubled[1].astimezone(UTC) - doubled[0].astimezone(UTC) == timedelta(hours=1)
    assert all(period.start <= moment < period.end for moment in doubled)


def test_kolkata_days_start_at_half_past_six_pm_utc(ledger: dict[str, Any]) -> None:
    zone = ZoneInfo("Asia/Kolkata")
    period = reports.month_period(2026, 11, zone)
    assert period.start == datetime(2026, 10, 31, 18, 30, tzinfo=UTC)
    assert period.end == datetime(2026, 11, 30, 18, 30, tzinfo=UTC)
    rows = reports.build(period, group_by=("day",), now=NOW).as_json()["rows"]
    assert [row["day"] for row in rows][:2] == ["2026-11-01", "2026-11-02"]
    assert rows[-1]["day"] == "2026-11-30"


def test_margins_are_charged_minus_upstream_cost_to_the_last_digit(ledger: dict[str, Any]) -> None:
    report = reports.build(
        reports.quarter_period(2026, 4, ZoneInfo("Asia/Shanghai")),
        group_by=("model", "route"),
        now=NOW,
    ).as_json()
    for counters in [*report["rows"], report["totals"]]:
        cost, upstream, margin = (Decimal(counters[name]) for name in MONEY)
        assert margin == cost - upstream
        assert margin > 0
    # The records' upstream cost is 70% of the charge rounded to 12 places: no rounding
    # anywhere else, so the margin has all 12 decimals of the ledger.
    total = Decimal(report["totals"]["margin"])
    assert total == sum(
        (
            r.cost - r.upstream_cost
            for r in UsageRecord.objects.all()
            if reports.quarter_period(2026, 4, ZoneInfo("Asia/Shanghai")).start
            <= r.created_at
            < reports.quarter_period(2026, 4, ZoneInfo("Asia/Shanghai")).end
        ),
        Decimal(0),
    )


# --- Periods and arguments -------------------------------------------------------------------


def test_periods_and_the_period_before() -> None:
    shanghai = ZoneInfo("Asia/Shanghai")
    january = reports.month_period(2027, 1, shanghai)
    assert (january.previous().first_day, january.previous().end_day) == (
        date(2026, 12, 1),
        date(2027, 1, 1),
    )
    assert january.start == datetime(2026, 12, 31, 16, 0, tzinfo=UTC)
    q1 = reports.parse_quarter("2027-q1", shanghai)
    assert (q1.label, q1.previous().label, q1.following().label) == (
        "2027-Q1",
        "2026-Q4",
        "2027-Q2",
    )
    # Custom dates: the same number of days just before.
    custom = reports.parse_dates("2026-11-10", "2026-11-20", shanghai)
    assert custom.kind == "custom"
    assert (custom.previous().first_day, custom.previous().end_day) == (
        date(2026, 10, 31),
        date(2026, 11, 10),
    )
    # A whole month or quarter given as dates is that month or quarter.
    assert reports.parse_dates("2026-11-01", "2026-12-01", shanghai).kind == "month"
    assert reports.parse_dates("2026-10-01", "2027-01-01", shanghai).kind == "quarter"
    assert reports.parse_dates("2026-11-01", "2027-02-01", shanghai).kind == "custom"


@pytest.mark.parametrize(
    ("values", "option"),
    [
        (["model,nope"], "group-by"),
        (["model,key,day"], "group-by"),
        (["model,model"], "group-by"),
    ],
)
def test_groupings_are_checked(values: list[str], option: str) -> None:
    with pytest.raises(reports.ReportError) as error:
        reports.parse_group_by(values)
    assert error.value.option == option
    assert reports.parse_group_by(["model", "", "key"]) == ("model", "key")


# --- The command --------------------------------------------------------------------------


def run_report(*args: str) -> str:
    out = io.StringIO()
    call_command("report", *args, stdout=out)
    return out.getvalue()


def test_the_command_prints_the_json_of_the_issue(ledger: dict[str, Any]) -> None:
    found = json.loads(
        run_report(
            "--from",
            "2026-11-01",
            "--to",
            "2026-12-01",
            "--tz",
            "Asia/Shanghai",
            "--group-by",
            "model,key",
            "--format",
            "json",
        )  # fmt: skip
    )
    assert list(found)[:8] == [
        "from",
        "to",
        "tz",
        "currency",
        "group_by",
        "rows",
        "totals",
        "flags",
    ]
    assert (found["from"], found["to"], found["tz"], found["currency"], found["group_by"]) == (
        "2026-11-01",
        "2026-12-01",
        "Asia/Shanghai",
        "USD",
        ["model", "key"],
    )
    row_fields = {"model", "key", *COUNTERS, *MONEY}
    assert all(set(row) == row_fields for row in found["rows"])
    assert set(found["totals"]) == {*COUNTERS, *MONEY}
    assert set(found["flags"]) == {"unpriced", "estimated", "zero_cost"}
    for counters in [*found["rows"], found["totals"]]:
        assert all(isinstance(counters[name], str) for name in MONEY)  # decimal strings
        assert all(isinstance(counters[name], int) for name in COUNTERS)
    period = reports.month_period(2026, 11, ZoneInfo("Asia/Shanghai"))
    want_rows, want_total = by_hand(period, ("model", "key"))
    assert {(row["model"], row["key"]): exact(row) for row in found["rows"]} == want_rows
    assert exact(found["totals"]) == want_total


def test_the_commands_flags_count_the_ledgers_doubtful_records(ledger: dict[str, Any]) -> None:
    found = json.loads(run_report("--from", "2026-10-01", "--to", "2027-01-01", "--format", "json"))
    period = reports.quarter_period(2026, 4, ZoneInfo("UTC"))
    inside = [r for r in UsageRecord.objects.all() if period.start <= r.created_at < period.end]
    used = [r for r in inside if r.input_tokens or r.output_tokens]
    assert found["flags"] == {
        "unpriced": sum(1 for r in used if not r.priced),
        "estimated": sum(1 for r in inside if r.estimated),
        "zero_cost": sum(1 for r in used if r.cost == 0),
    }
    assert all(found["flags"].values())


def test_the_commands_csv_and_xlsx_equal_its_json(ledger: dict[str, Any], tmp_path) -> None:
    args = ["--from", "2026-10-30", "--to", "2026-11-03", "--tz", "America/New_York"]
    args += ["--group-by", "day,source"]
    found = json.loads(run_report(*args, "--format", "json"))
    run_report(*args, "--format", "csv", "--output", str(tmp_path / "r.csv"))
    run_report(*args, "--format", "xlsx", "--output", str(tmp_path / "r.xlsx"))
    check_files_equal_json(
        found,
        (tmp_path / "r.csv").read_text(encoding="utf-8"),
        (tmp_path / "r.xlsx").read_bytes(),
    )
    table = run_report(*args)
    assert "Time zone: America/New_York" in table
    assert found["totals"]["cost"] in table.splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--from", "2026-13-01", "--to", "2026-12-01"], "--from"),
        (["--from", "2026-11-01", "--to", "soon"], "--to"),
        (["--from", "2026-11-01", "--to", "2026-11-01"], "--to"),
        (["--from", "2026-11-01", "--to", "2026-12-01", "--tz", "Mars/Olympus"], "--tz"),
        (["--from", "2026-11-01", "--to", "2026-12-01", "--group-by", "colour"], "--group-by"),
        (["--from", "2026-11-01", "--to", "2026-12-01", "--group-by", "a,b,c"], "--group-by"),
        (["--from", "2026-11-01", "--to", "2026-12-01", "--format", "pdf"], "--format"),
        (["--from", "2026-11-01", "--to", "2026-12-01", "--format", "xlsx"], "--output"),
        (
            ["--from", "2026-11-01", "--to", "2026-12-01", "--output", "/nonexistent/dir/r.csv"],
            "--output",
        ),
    ],
)
def test_the_command_refuses_bad_arguments_naming_the_option(
    db: None, args: list[str], option: str
) -> None:
    with pytest.raises(CommandError, match=f"^{option}: "):
        run_report(*args)


# --- Files read back ----------------------------------------------------------------------


def csv_table(text: str) -> tuple[dict[str, str], list[list[str]]]:
    """The header block (label → value) and the table (title line first) of a CSV export."""
    lines = list(csv.reader(io.StringIO(text)))
    blank = lines.index([])
    return dict(lines[:blank]), lines[blank + 1 :]  # type: ignore[arg-type]


def xlsx_table(content: bytes) -> tuple[dict[str, Any], list[list[Any]], Any]:
    sheet = load_workbook(io.BytesIO(content)).active
    lines = [list(line) for line in sheet.iter_rows(values_only=True)]
    blank = next(i for i, line in enumerate(lines) if all(cell is None for cell in line))
    header = {line[0]: line[1] for line in lines[:blank]}
    return header, lines[blank + 1 :], sheet


def _titles(found: dict[str, Any]) -> list[str]:
    titles = {
        "requests": "Requests",
        "failed": "Failed",
        "input_tokens": "Input tokens",
        "cached_tokens": "Cached input tokens",
        "output_tokens": "Output tokens",
        "cost": "Cost",
        "upstream_cost": "Upstream cost",
        "margin": "Margin",
    }
    return [titles[name] for name in (*COUNTERS, *MONEY) if name in found["totals"]]


def check_files_equal_json(found: dict[str, Any], csv_text: str, xlsx: bytes) -> None:
    """Every row and the total line of both files equal the JSON (money to the last digit)."""
    group_titles = {name: str(reports.GROUP_LABELS[name]) for name in found["group_by"]}
    fields = [*COUNTERS, *(name for name in MONEY if name in found["totals"])]
    want = [
        [row[name] for name in found["group_by"]] + [row[name] for name in fields]
        for row in found["rows"]
    ]
    total = [found["totals"][name] for name in fields]

    header, table = csv_table(csv_text)
    assert header["Time zone"] == found["tz"]
    assert header["Currency"] == found["currency"]
    assert header["From"].startswith(found["from"])
    assert header["To (excluded)"].startswith(found["to"])
    assert "Generated at" in header
    titles = table[0]
    assert titles[: len(group_titles) + len(fields)] == [*group_titles.values(), *_titles(found)]
    positions = [titles.index(title) for title in [*group_titles.values(), *_titles(found)]]
    numbers = len(group_titles)
    as_csv = [
        [line[i] or None for i in positions[:numbers]]
        + [
            int(line[i]) if name in COUNTERS else line[i]
            for i, name in zip(positions[numbers:], fields, strict=True)
        ]
        for line in table[1:]
    ]
    if found["group_by"]:
        assert as_csv[:-1] == want
    assert as_csv[-1][numbers:] == total

    header_x, table_x, sheet = xlsx_table(xlsx)
    assert header_x["Time zone"] == found["tz"]
    assert header_x["Currency"] == found["currency"]
    assert list(table_x[0][: len(positions)]) == [*group_titles.values(), *_titles(found)]
    # openpyxl reads numbers back as floats: each cell is numeric and equals the JSON's
    # decimal as a double...
    as_xlsx = [list(line[: len(positions)]) for line in table_x[1:]]
    want_doubles = [
        line[:numbers]
        + [
            value if name in COUNTERS else float(Decimal(value))
            for value, name in zip(line[numbers:], fields, strict=True)
        ]
        for line in [*want, [None] * numbers + total]
    ]
    if found["group_by"]:
        assert as_xlsx[:-1] == want_doubles[:-1]
    assert as_xlsx[-1][numbers:] == want_doubles[-1][numbers:]
    # ...and the file itself holds every amount's exact decimal (Excel shows 15 digits;
    # the XML keeps them all), with a currency number format.
    xml = zipfile.ZipFile(io.BytesIO(xlsx)).read("xl/worksheets/sheet1.xml").decode()
    stored = {Decimal(value) for value in re.findall(r"<v>([-0-9.eE+]+)</v>", xml)}
    for counters in [*found["rows"], found["totals"]]:
        for name in MONEY:
            if name in counters:
                assert Decimal(counters[name]) in stored, (name, counters[name])
    cost_column = numbers + fields.index("cost") + 1
    total_cell = sheet.cell(row=sheet.max_row, column=cost_column)
    assert total_cell.data_type == "n"
    assert f"[${found['currency']}]" in total_cell.number_format


# --- The page and its exports ---------------------------------------------------------------


def test_the_pages_exports_equal_its_json_and_its_totals(
    ledger: dict[str, Any], frank: User
) -> None:
    client = signed_in(frank)
    query = "month=2026-11&tz=Asia/Kolkata&group_by=user&group_by=model"
    page = client.get(f"/console/reports/?{query}")
    assert page.status_code == 200
    found = json.loads(client.get(f"/console/reports/export/?{query}&format=json").content)
    csv_response = client.get(f"/console/reports/export/?{query}&format=csv")
    xlsx_response = client.get(f"/console/reports/export/?{query}&format=xlsx")
    assert csv_response["Content-Type"].startswith("text/csv")
    assert (
        'filename="switchboard-report-2026-11-user-model.csv"'
        in csv_response["Content-Disposition"]
    )
    assert xlsx_response["Content-Type"].startswith("application/vnd.openxmlformats")
    check_files_equal_json(found, csv_response.content.decode(), xlsx_response.content)
    # The page's total line shows the same numbers.
    foot = re.search(r"<tfoot>(.*?)</tfoot>", page.content.decode(), re.S)
    assert foot is not None
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", foot.group(1))
    totals = found["totals"]
    assert cells[:8] == [str(totals[name]) for name in (*COUNTERS, *MONEY)]
    want_rows, want_total = by_hand(
        reports.month_period(2026, 11, ZoneInfo("Asia/Kolkata")), ("user", "model")
    )
    assert exact(totals) == want_total


def test_a_page_with_junk_in_its_query_explains_instead_of_failing(
    ledger: dict[str, Any], carol: User
) -> None:
    client = signed_in(carol)
    for query in (
        "period=decade",
        "period=custom&from=2026-11-05&to=2026-11-01",
        "period=custom&from=2020-01-01&to=2026-01-01",
        "month=2026-13",
        "period=quarter&quarter=2026-Q5",
        "tz=Mars/Olympus",
        "group_by=colour",
        "group_by=model&group_by=key&group_by=day",
        "user=me&key=-1&route=x",
        "source=fax",
    ):
        response = client.get(f"/console/reports/?{query}")
        assert response.status_code == 200, query
        assert b'class="panel report-errors"' in response.content, query
    assert client.get("/console/reports/export/?format=pdf").status_code == 400


def test_flags_link_to_the_request_log_with_the_reports_filters(
    ledger: dict[str, Any], frank: User
) -> None:
    page = signed_in(frank).get("/console/reports/?month=2026-11&tz=Asia/Shanghai&model=gpt-x")
    html = page.content.decode()
    for flag in ("unpriced", "estimated", "zero_cost"):
        match = re.search(rf'data-flag="{flag}".*?href="([^"]+)"', html, re.S)
        assert match is not None, flag
        link = match.group(1).replace("&amp;", "&")
        assert link.startswith("/console/usage/requests/?")
        for part in (
            "range=custom",
            "from=2026-11-01",
            "to=2026-12-01",
            "tz=Asia%2FShanghai",
            "model=gpt-x",
            f"flag={flag}",
        ):
            assert part in link, (flag, part)


# --- Who sees what ----------------------------------------------------------------------------


def test_a_member_sees_only_their_own_rows_and_no_margin(
    ledger: dict[str, Any], alice: User
) -> None:
    client = signed_in(alice)
    page = client.get("/console/reports/?month=2026-11&group_by=user&group_by=key")
    assert page.status_code == 200
    html = page.content.decode()
    assert "bob@example.com" not in html
    assert "dan@x.org" not in html
    assert "Upstream cost" not in html
    assert "Margin" not in html
    bobs_keys = ApiKey.objects.filter(user__email="bob@example.com")
    assert all(key.prefix not in html for key in bobs_keys)

    found = json.loads(client.get("/console/reports/export/?month=2026-11&format=json").content)
    want_rows, want_total = by_hand(
        reports.month_period(2026, 11, ZoneInfo("UTC")), (), user=alice.pk
    )
    assert "upstream_cost" not in found["totals"]
    assert "margin" not in found["totals"]
    assert exact(found["totals"]) == {
        name: value for name, value in want_total.items() if name not in ("upstream_cost", "margin")
    }
    for output in ("csv", "xlsx"):
        content = client.get(
            f"/console/reports/export/?month=2026-11&group_by=user&format={output}"
        ).content
        assert b"bob@example.com" not in content
        if output == "csv":
            assert "Margin" not in content.decode()


def test_a_member_asking_for_someone_elses_rows_is_refused(
    ledger: dict[str, Any], alice: User
) -> None:
    bob = User.objects.get(email="bob@example.com")
    bobs_key = ApiKey.objects.filter(user=bob).first()
    assert bobs_key is not None
    alices_key = ApiKey.objects.filter(user=alice).first()
    assert alices_key is not None
    client = signed_in(alice)
    for path in ("/console/reports/", "/console/reports/export/"):
        assert client.get(f"{path}?user={bob.pk}").status_code == 403
        assert client.get(f"{path}?key={bobs_key.pk}").status_code == 403
        assert client.get(f"{path}?user={alice.pk}&key={alices_key.pk}").status_code == 200


@pytest.mark.parametrize("who", ["frank", "carol"])
def test_finance_and_admins_see_everyones_rows(
    ledger: dict[str, Any], who: str, request: pytest.FixtureRequest
) -> None:
    viewer = request.getfixturevalue(who)
    client = signed_in(viewer)
    found = json.loads(
        client.get("/console/reports/export/?month=2026-11&group_by=user&format=json").content
    )
    emails = {row["user"] for row in found["rows"]}
    assert {"alice@example.com", "bob@example.com", "dan@x.org"} <= emails
    bob = User.objects.get(email="bob@example.com")
    only_bob = json.loads(
        client.get(f"/console/reports/export/?month=2026-11&user={bob.pk}&format=json").content
    )
    assert only_bob["filters"] == {"user": "bob@example.com"}
    _rows, want_total = by_hand(reports.month_period(2026, 11, ZoneInfo("UTC")), (), user=bob.pk)
    assert exact(only_bob["totals"]) == want_total


def test_reports_are_read_only_and_need_a_sign_in(db: None, frank: User) -> None:
    assert Client().get("/console/reports/").status_code == 302
    assert signed_in(frank).post("/console/reports/").status_code in (403, 405)


def test_the_page_speaks_chinese(ledger: dict[str, Any], frank: User) -> None:
    client = signed_in(frank)
    page = client.get("/console/reports/?month=2026-11", HTTP_ACCEPT_LANGUAGE="zh-hans")
    html = page.content.decode()
    for text in ("报表", "数据质量", "自然月", "上期费用", "毛利", "上一期"):
        assert text in html, text
    content = client.get(
        "/console/reports/export/?month=2026-11&format=csv", HTTP_ACCEPT_LANGUAGE="zh-hans"
    ).content.decode()
    assert "时区" in content


# --- A price change mid-month, through the real relay ----------------------------------------


USER = [{"role": "user", "content": "hi"}]


def test_a_price_change_mid_month_splits_the_cost_and_never_rewrites_earlier_records(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = CatalogModel.objects.get(name="gpt-fake")
    do_set_price(
        model=model,
        input_price=Decimal(2),
        output_price=Decimal(4),
        effective_from=datetime(2026, 11, 1, tzinfo=UTC),
    )
    do_set_price(
        model=model,
        input_price=Decimal("1.5"),
        output_price=Decimal(3),
        effective_from=datetime(2026, 11, 15, 12, 0, tzinfo=UTC),
    )

    def ask_at(when: datetime) -> None:
        # The request happens at ``when``: priced by the limiter's clock, recorded then.
        monkeypatch.setattr(limiter, "clock", lambda: when)
        monkeypatch.setattr(pipeline, "timezone", SimpleNamespace(now=lambda: when))
        count = UsageRecord.objects.count()
        gateway.fake.script(Reply(text="ok", input_tokens=1_000_000, output_tokens=1_000_000))
        gateway.openai().chat.completions.create(model="gpt-fake", messages=USER)
        gateway.wait_records(count + 1)

    for moment in (
        datetime(2026, 11, 10, tzinfo=UTC),
        datetime(2026, 11, 15, 11, 59, 59, tzinfo=UTC),
        datetime(2026, 11, 15, 12, 0, tzinfo=UTC),
        datetime(2026, 11, 20, tzinfo=UTC),
    ):
        ask_at(moment)
    period = reports.month_period(2026, 11, ZoneInfo("UTC"))

    def days() -> dict[str, str]:
        report = reports.build(period, group_by=("day",), now=NOW).as_json()
        return {row["day"]: row["cost"] for row in report["rows"]}

    # 1M input + 1M output: 6 before 15 Nov 12:00 UTC, 4.5 from then on.
    assert days() == {"2026-11-10": "6", "2026-11-15": "10.5", "2026-11-20": "4.5"}
    assert reports.build(period, now=NOW).as_json()["totals"]["cost"] == "21"

    # A later price, back-dated to the start of the month, rewrites nothing already recorded.
    do_set_price(
        model=model,
        input_price=Decimal(9),
        output_price=Decimal(9),
        effective_from=datetime(2026, 11, 1, tzinfo=UTC),
    )
    assert days() == {"2026-11-10": "6", "2026-11-15": "10.5", "2026-11-20": "4.5"}


@pytest.mark.parametrize("flag", ["unpriced", "estimated", "zero_cost"])
def test_a_flags_link_lists_exactly_the_flagged_records(
    ledger: dict[str, Any], frank: User, flag: str
) -> None:
    client = signed_in(frank)
    page = client.get("/console/reports/?month=2026-11&tz=Asia/Kolkata&model=claude-y")
    match = re.search(rf'data-flag="{flag}".*?href="([^"]+)"', page.content.decode(), re.S)
    assert match is not None
    log = client.get(match.group(1).replace("&amp;", "&")).content.decode()
    shown = set(re.findall(r'data-request="([^"]+)"', log))
    period = reports.month_period(2026, 11, ZoneInfo("Asia/Kolkata"))
    tests = {
        "unpriced": lambda r: not r.priced and (r.input_tokens or r.output_tokens),
        "estimated": lambda r: r.estimated,
        "zero_cost": lambda r: r.cost == 0 and (r.input_tokens or r.output_tokens),
    }
    want = {
        r.request_id
        for r in UsageRecord.objects.filter(model="claude-y")
        if period.start <= r.created_at < period.end and tests[flag](r)
    }
    assert 0 < len(want) < 50  # one page of the log
    assert shown == want
