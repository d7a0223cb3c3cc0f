"""Monthly statements: produced once, equal to the ledger, closable, adjusted, private."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from openpyxl import load_workbook

from accounts.models import AuditEvent, User
from keys import statements
from keys.models import Adjustment, ApiKey, Statement, StatementMonth, UsageRecord
from keys.tasks import produce_monthly_statements

SHANGHAI = ZoneInfo("Asia/Shanghai")
OCTOBER = date(2026, 10, 1)
# 2026-11-01 08:00 in Shanghai: October (Shanghai) has ended.
AFTER_OCTOBER = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _shanghai(settings: Any) -> None:
    settings.TIME_ZONE = "Asia/Shanghai"
    statements._checked.clear()


def record(user: User, when: datetime, cost: str, **fields: Any) -> UsageRecord:
    key = ApiKey.objects.filter(user=user).first() or ApiKey.issue(user=user, name="k")[0]
    values: dict[str, Any] = {
        "request_id": f"req-{UsageRecord.objects.count() + 1}",
        "user": user,
        "key": key,
        "endpoint": "chat.completions",
        "dialect": "openai",
        "model": "gpt-x",
        "provider": "openai",
        "status": "ok",
        "http_status": 200,
        "input_tokens": 1000,
        "output_tokens": 100,
        "cost": Decimal(cost),
        "upstream_cost": Decimal(cost) * Decimal("0.6"),
        "latency_ms": 300,
        "created_at": when,
    }
    values.update(fields)
    return UsageRecord.objects.create(**values)


@pytest.fixture
def october(alice: User, bob: User) -> dict[str, Any]:
    """Usage at October's edges in Shanghai time, and just outside them."""
    start = datetime(2026, 10, 1, tzinfo=SHANGHAI)
    end = datetime(2026, 11, 1, tzinfo=SHANGHAI)
    inside = [
        record(alice, start, "0.100000000001"),  # the first instant of October (Shanghai)
        record(alice, end - timedelta(microseconds=1), "0.000000000009", model="gpt-y"),
        record(bob, start + timedelta(days=15), "2.5"),
        record(bob, start + timedelta(days=16), "0", status="upstream_error", http_status=502),
    ]
    record(alice, start - timedelta(microseconds=1), "7")  # September in Shanghai
    record(bob, end, "9")  # November in Shanghai (still October 31 in UTC)
    return {"inside": inside}


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def totals_row(content: bytes, kind: str) -> dict[str, str]:
    """The totals line of a statement file, by column title (CSV or XLSX read back)."""
    if kind == "csv":
        lines = list(csv.reader(io.StringIO(content.decode())))
    else:
        sheet = load_workbook(io.BytesIO(content)).active
        assert sheet is not None
        lines = [
            ["" if c is None else str(c) for c in row] for row in sheet.iter_rows(values_only=True)
        ]
    blank = next(i for i, line in enumerate(lines) if not any(line))
    header, last = lines[blank + 1], lines[-1]
    return dict(zip(header, last, strict=False))


def test_statements_equal_the_ledger_for_each_user_and_in_sum(
    alice: User, bob: User, october: dict[str, Any]
) -> None:
    month = statements.produce(OCTOBER, now=AFTER_OCTOBER)
    assert month is not None
    assert month.zone == "Asia/Shanghai"
    by_user = {s.user.email if s.user else None: s for s in month.statements.all()}
    assert set(by_user) == {None, "alice@example.com", "bob@example.com"}
    assert by_user["alice@example.com"].cost == Decimal("0.100000000010")
    assert by_user["alice@example.com"].requests == 2
    assert by_user["bob@example.com"].cost == Decimal("2.5")
    assert by_user["bob@example.com"].failed == 1
    summary = by_user[None]
    assert summary.cost == sum((r.cost for r in october["inside"]), Decimal(0))
    assert summary.upstream_cost == sum((r.upstream_cost for r in october["inside"]), Decimal(0))
    assert summary.requests == 4
    assert summary.input_tokens == 4000


@pytest.mark.parametrize("kind", ["csv", "xlsx"])
def test_the_files_totals_equal_the_statement(
    alice: User, october: dict[str, Any], kind: str
) -> None:
    month = statements.produce(OCTOBER, now=AFTER_OCTOBER)
    assert month is not None
    mine = month.statements.get(user=alice)
    content = bytes(mine.csv_file if kind == "csv" else mine.xlsx_file)
    totals = totals_row(content, kind)
    assert Decimal(totals["Cost"]) == mine.cost == Decimal("0.100000000010")
    assert "Upstream cost" not in totals  # a member's statement shows what they were charged
    summary = month.statements.get(user__isnull=True)
    content = bytes(summary.csv_file if kind == "csv" else summary.xlsx_file)
    assert Decimal(totals_row(content, kind)["Cost"]) == summary.cost


def test_the_monthly_task_run_twice_makes_one_set_of_statements(
    october: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(timezone, "now", lambda: AFTER_OCTOBER)
    assert produce_monthly_statements.apply().get() == "2026-10"
    first = sorted(Statement.objects.values_list("pk", flat=True))
    assert produce_monthly_statements.apply().get() == "2026-10"
    assert sorted(Statement.objects.values_list("pk", flat=True)) == first
    assert StatementMonth.objects.count() == 1
    assert len(first) == 3


def test_a_month_without_usage_states_nothing(db: None) -> None:
    assert statements.produce(OCTOBER, now=AFTER_OCTOBER) is None
    assert not StatementMonth.objects.exists()


def test_a_month_that_has_not_ended_is_refused(october: dict[str, Any]) -> None:
    with pytest.raises(statements.StatementError, match="has not ended"):
        statements.produce(OCTOBER, now=datetime(2026, 10, 31, 15, tzinfo=UTC))


def test_a_closed_month_refuses_to_be_produced_again_and_takes_adjustments(
    alice: User, frank: User, october: dict[str, Any]
) -> None:
    month = statements.produce(OCTOBER, now=AFTER_OCTOBER)
    assert month is not None
    # Given late records, an open month may be produced again...
    record(alice, datetime(2026, 10, 20, tzinfo=SHANGHAI), "1")
    month = statements.produce(OCTOBER, now=AFTER_OCTOBER, again=True)
    assert month is not None
    assert month.statements.get(user=alice).cost == Decimal("1.100000000010")
    # ...but once closed, never: a correction is an adjustment.
    statements.do_close_month(month=month, by=frank)
    before = list(Statement.objects.values_list("pk", "cost"))
    with pytest.raises(statements.StatementError, match="closed"):
        statements.produce(OCTOBER, now=AFTER_OCTOBER, again=True)
    assert list(Statement.objects.values_list("pk", "cost")) == before
    statements.do_add_adjustment(
        month=month, user=alice, amount="-0.1", reason="refund: outage on the 20th", by=frank
    )
    mine = month.statements.get(user=alice)
    assert statements.adjusted_total(mine) == Decimal("1.000000000010")
    summary = month.statements.get(user__isnull=True)
    assert statements.adjusted_total(summary) == summary.cost - Decimal("0.1")
    assert AuditEvent.objects.filter(action="close").count() == 1
    with pytest.raises(statements.StatementError, match="already closed"):
        statements.do_close_month(month=month, by=frank)


@pytest.mark.parametrize(
    ("amount", "reason", "message"),
    [
        ("abc", "x", "not a number"),
        ("0", "x", "not zero"),
        ("1e12", "x", "at most"),
        ("0.0000000000001", "x", "12 decimal places"),
        ("5", "  ", "say why"),
        ("5", "x" * 501, "at most 500 characters"),
    ],
)
def test_a_bad_adjustment_says_which_field_and_why(
    frank: User, october: dict[str, Any], amount: str, reason: str, message: str
) -> None:
    month = statements.produce(OCTOBER, now=AFTER_OCTOBER)
    assert month is not None
    with pytest.raises(statements.StatementError, match=message):
        statements.do_add_adjustment(month=month, user=None, amount=amount, reason=reason, by=frank)
    assert not Adjustment.objects.exists()


def test_finance_closes_and_adjusts_in_the_console(
    alice: User, frank: User, october: dict[str, Any]
) -> None:
    statements.produce(OCTOBER, now=AFTER_OCTOBER)
    client = signed_in(frank)
    url = reverse("console:statement_month", kwargs={"month": "2026-10"})
    page = client.get(url)
    assert page.status_code == 200
    assert "alice@example.com" in page.content.decode()
    refused = client.post(url, {"action": "adjust", "user": "", "amount": "zero", "reason": "r"})
    assert refused.status_code == 400
    assert "is not a number" in refused.content.decode()
    added = client.post(
        url, {"action": "adjust", "user": alice.email, "amount": "-0.05", "reason": "goodwill"}
    )
    assert added.status_code == 302
    assert client.post(url, {"action": "close"}).status_code == 302
    assert StatementMonth.objects.get(month=OCTOBER).closed_by == frank
    page = client.get(url).content.decode()
    assert "goodwill" in page
    assert "0.05000000001" in page  # alice's total after the adjustment


def test_a_member_sees_and_downloads_only_their_own_statements(
    alice: User, bob: User, october: dict[str, Any]
) -> None:
    month = statements.produce(OCTOBER, now=AFTER_OCTOBER)
    assert month is not None
    client = signed_in(alice)
    listing = client.get(reverse("console:statements")).content.decode()
    assert "0.10000000001" in listing
    assert "2.5" not in listing  # bob's cost, and the summary's, are not shown
    mine = month.statements.get(user=alice)
    bobs = month.statements.get(user=bob)
    summary = month.statements.get(user__isnull=True)
    assert client.get(reverse("console:statement_file", args=[mine.pk, "csv"])).status_code == 200
    for other in (bobs, summary):
        assert (
            client.get(reverse("console:statement_file", args=[other.pk, "csv"])).status_code == 404
        )
    month_url = reverse("console:statement_month", kwargs={"month": "2026-10"})
    assert client.get(month_url).status_code == 403
    assert client.post(month_url, {"action": "close"}).status_code == 403
    assert (
        client.post(reverse("console:statement_produce"), {"month": "2026-10"}).status_code == 403
    )
    assert not StatementMonth.objects.get(month=OCTOBER).is_closed


def test_without_a_beat_the_first_request_after_the_month_turns_produces_it(
    alice: User, settings: Any
) -> None:
    settings.SWITCHBOARD_STATEMENTS_ON_REQUEST = True
    due = statements.previous_month()
    record(alice, datetime(due.year, due.month, 2, tzinfo=SHANGHAI), "0.25")
    signed_in(alice).get(reverse("console:statements"))
    month = StatementMonth.objects.get(month=due)
    assert month.statements.get(user=alice).cost == Decimal("0.25")
    # Later requests do not ask again (checked once per month per process).
    Statement.objects.all().delete()
    signed_in(alice).get(reverse("console:statements"))
    assert not Statement.objects.exists()


def test_with_a_beat_requests_never_produce_statements(alice: User, settings: Any) -> None:
    settings.SWITCHBOARD_STATEMENTS_ON_REQUEST = False
    due = statements.previous_month()
    record(alice, datetime(due.year, due.month, 2, tzinfo=SHANGHAI), "0.25")
    signed_in(alice).get(reverse("console:statements"))
    assert not StatementMonth.objects.exists()


def test_the_statements_pages_read_in_chinese(frank: User, october: dict[str, Any]) -> None:
    statements.produce(OCTOBER, now=AFTER_OCTOBER)
    client = signed_in(frank)
    client.cookies["django_language"] = "zh-hans"
    page = client.get(reverse("console:statements")).content.decode()
    assert "月度账单" in page
    page = client.get(
        reverse("console:statement_month", kwargs={"month": "2026-10"})
    ).content.decode()
    assert "关闭本月" in page


def test_two_producers_at_once_make_one_set_of_statements(
    transactional_db: None, alice: User, bob: User, october: dict[str, Any]
) -> None:
    # Two beats (or a redelivery) at the same moment: the month's row lock orders them.
    import threading

    from django.db import connection, connections

    if connection.vendor != "postgresql":
        pytest.skip("SQLite serialises writers itself; the row lock is PostgreSQL's")
    barrier = threading.Barrier(2)
    results: list[Any] = []

    def produce() -> None:
        try:
            barrier.wait()
            results.append(statements.produce(OCTOBER, now=AFTER_OCTOBER))
        except Exception as exc:  # pragma: no cover - shown by the assertion below
            results.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=produce) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(result, StatementMonth) for result in results), results
    assert StatementMonth.objects.count() == 1
    assert Statement.objects.count() == 3


def test_the_list_sums_each_months_adjustments_once(
    alice: User, bob: User, frank: User, october: dict[str, Any]
) -> None:
    month = statements.produce(OCTOBER, now=AFTER_OCTOBER)
    assert month is not None
    for amount in ("-0.25", "0.05"):
        statements.do_add_adjustment(month=month, user=alice, amount=amount, reason="r", by=frank)
    page = signed_in(frank).get(reverse("console:statements")).content.decode()
    assert "-0.2<" in page  # the month's adjustments, once (three statements share them)
    assert "-0.6" not in page
