"""The usage dashboard, its CSVs, the live strip and the request log (keys.usage_views)."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import User
from keys.models import ApiKey, UsageRecord


def record(user: User, key: ApiKey | None, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": f"req-{UsageRecord.objects.count() + 1}-{user.pk}",
        "user": user,
        "key": key,
        "endpoint": "chat.completions",
        "dialect": "openai",
        "model": "gpt-x",
        "provider": "openai",
        "status": "ok",
        "http_status": 200,
        "input_tokens": 100,
        "output_tokens": 10,
        "cost": Decimal("0.000123456789"),
        "latency_ms": 400,
        "created_at": timezone.now() - timedelta(minutes=5),
    }
    values.update(fields)
    return UsageRecord.objects.create(**values)


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


class Tables(HTMLParser):
    """Every <table data-table=...> of a page, as rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.current: str | None = None
        self.row: list[str] | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and dict(attrs).get("data-table"):
            self.current = dict(attrs)["data-table"]
            self.tables[self.current or ""] = []
        elif self.current and tag == "tr":
            self.row = []
        elif self.row is not None and tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.current = None
        elif tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None and self.current:
            self.tables[self.current].append(self.row)
            self.row = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def tables_of(html: str) -> dict[str, list[list[str]]]:
    parser = Tables()
    parser.feed(html)
    return parser.tables


@pytest.fixture
def usage(alice: User, bob: User) -> dict[str, Any]:
    alice_key = ApiKey.issue(user=alice, name="alice-laptop")[0]
    bob_key = ApiKey.issue(user=bob, name="bob-server")[0]
    record(alice, alice_key, model="gpt-x", cost=Decimal("0.000000000001"))
    record(alice, alice_key, model="claude-y", status="error", http_status=429)
    for _ in range(3):
        record(bob, bob_key, model="bob-only-model", cost=Decimal("1.5"), input_tokens=7000)
    return {"alice_key": alice_key, "bob_key": bob_key}


def test_a_members_dashboard_never_counts_another_users_usage(alice, usage) -> None:
    response = signed_in(alice).get(reverse("console:usage"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "bob-only-model" not in html
    assert "bob-server" not in html
    tables = tables_of(html)
    summary = {row[0]: row[1] for row in tables["tiles"][1:]}
    assert summary["Requests"] == "2"
    assert summary["Tokens"] == "220"
    assert summary["Cost"] == "0.00012345679"
    # The user filter is not offered and cannot be forced.
    response = signed_in(alice).get(reverse("console:usage"), {"user": usage["bob_key"].user_id})
    assert "bob-only-model" not in response.content.decode()
    assert 'name="user"' not in response.content.decode()


def test_a_members_csv_and_log_hold_only_their_own(alice, bob, usage) -> None:
    client = signed_in(alice)
    for figure in ("tiles", "requests", "cost", "top_keys", "error_rate"):
        body = client.get(reverse("console:usage_csv"), {"figure": figure, "user": bob.pk})
        assert body.status_code == 200
        assert "bob" not in body.content.decode()
    log = client.get(reverse("console:usage_requests"), {"user": bob.pk}).content.decode()
    assert "bob-only-model" not in log
    assert log.count("data-request=") == 2
    bobs = UsageRecord.objects.filter(user=bob).first()
    assert bobs is not None
    assert client.get(reverse("console:usage_request", args=[bobs.pk])).status_code == 404
    own = UsageRecord.objects.filter(user=alice).first()
    assert own is not None
    assert client.get(reverse("console:usage_request", args=[own.pk])).status_code == 200


def test_finance_sees_everyone_and_filters_narrow(frank, bob, usage) -> None:
    client = signed_in(frank)
    tables = tables_of(client.get(reverse("console:usage")).content.decode())
    assert {row[0]: row[1] for row in tables["tiles"][1:]}["Requests"] == "5"
    assert "bob@example.com" in [row[0] for row in tables["top_users"][1:]]
    narrowed = tables_of(client.get(reverse("console:usage"), {"user": bob.pk}).content.decode())
    assert {row[0]: row[1] for row in narrowed["tiles"][1:]}["Requests"] == "3"
    by_model = tables_of(
        client.get(reverse("console:usage"), {"model": "claude-y"}).content.decode()
    )
    assert {row[0]: row[1] for row in by_model["tiles"][1:]}["Requests"] == "1"
    errors = tables_of(
        client.get(reverse("console:usage"), {"status": "rate_limited"}).content.decode()
    )
    assert [row[0] for row in errors["error_rate"][1:]] == ["claude-y"]


@pytest.mark.parametrize(
    "figure",
    [
        "tiles",
        "cost",
        "requests",
        "tokens",
        "token_mix",
        "status",
        "error_rate",
        "latency",
        "top_keys",
        "top_users",
    ],
)
def test_a_charts_csv_equals_its_table(carol, usage, figure) -> None:
    client = signed_in(carol)
    query = {"range": "24h", "tz": "Asia/Shanghai", "stack": "key"}
    table = tables_of(client.get(reverse("console:usage"), query).content.decode())[figure]
    body = client.get(reverse("console:usage_csv"), {**query, "figure": figure})
    assert body["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(body.content.decode())))
    assert rows == table
    assert len(rows) > 1


def test_money_in_csv_is_exact(carol, usage) -> None:
    body = signed_in(carol).get(reverse("console:usage_csv"), {"figure": "top_keys"})
    rows = list(csv.reader(io.StringIO(body.content.decode())))
    costs = {row[0].split(" (")[0]: row[1] for row in rows[1:]}
    assert costs["bob-server"] == "4.5"
    assert costs["alice-laptop"] == "0.00012345679"


def test_presets_in_shanghai_follow_local_days_and_months(carol) -> None:
    from zoneinfo import ZoneInfo

    from keys.usage_views import granularity_for, preset_range

    zone = ZoneInfo("Asia/Shanghai")
    now = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)  # 10:30 on 1 March in Shanghai
    start, end = preset_range("month", now, zone)
    assert start == datetime(2026, 3, 1, tzinfo=zone)
    assert end == datetime(2026, 4, 1, tzinfo=zone)
    start, end = preset_range("last_month", now, zone)
    assert start == datetime(2026, 2, 1, tzinfo=zone)
    assert end == datetime(2026, 3, 1, tzinfo=zone)
    start, end = preset_range("7d", now, zone)
    assert start == datetime(2026, 2, 23, tzinfo=zone)
    assert end == datetime(2026, 3, 2, tzinfo=zone)
    assert granularity_for(start, end) == "day"
    start, end = preset_range("24h", now, zone)
    assert end == datetime(2026, 3, 1, 11, tzinfo=zone)
    assert end - start == timedelta(hours=24)
    assert granularity_for(start, end) == "hour"
    start, end = preset_range("1h", now, zone)
    assert end - start == timedelta(hours=1)
    assert start <= now < end
    assert granularity_for(start, end) == "15min"


def test_a_shanghai_day_counts_what_happened_on_that_local_day(carol, alice) -> None:
    key = ApiKey.issue(user=alice, name="k")[0]
    # 2026-03-01 23:30 in Shanghai is 15:30 UTC: it belongs to 1 March there, not 2 March.
    record(alice, key, created_at=datetime(2026, 3, 1, 15, 30, tzinfo=UTC))
    query = {"range": "custom", "from": "2026-03-01", "to": "2026-03-05", "tz": "Asia/Shanghai"}
    table = tables_of(signed_in(carol).get(reverse("console:usage"), query).content.decode())
    rows = {row[0]: row[1:] for row in table["requests"][1:]}
    assert rows["2026-03-01"] == ["1"]
    assert rows["2026-03-02"] == ["0"]
    assert "Asia/Shanghai" in table["requests"][0][0]


@pytest.mark.parametrize(
    "query",
    [
        {"tz": "Mars/Olympus"},
        {"range": "fortnight"},
        {"range": "custom", "from": "yesterday", "to": "today"},
        {"range": "custom", "from": "2026-03-02", "to": "2026-03-01"},
        {"range": "custom", "from": "2000-01-01", "to": "2026-03-01"},
        {"user": "bob"},
        {"key": "-3"},
        {"status": "teapot"},
        {"source": "carrier-pigeon"},
        {"stack": "colour"},
    ],
)
def test_invalid_inputs_give_a_message_not_a_500(carol, query) -> None:
    client = signed_in(carol)
    for name in ("console:usage", "console:usage_requests"):
        response = client.get(reverse(name), query)
        assert response.status_code == 200
        assert 'class="panel usage-errors"' in response.content.decode()
    assert client.get(reverse("console:usage_csv"), query).status_code == 200
    assert client.get(reverse("console:usage_live"), query).status_code == 200


def test_the_log_pages_by_keyset_newest_first_and_filters(carol, alice, monkeypatch) -> None:
    from accounts import console

    monkeypatch.setattr(console, "PER_PAGE", 3)
    key = ApiKey.issue(user=alice, name="k")[0]
    made = [record(alice, key, request_id=f"req-{i:02d}") for i in range(7)]
    record(alice, key, request_id="req-error", status="error", http_status=502)
    client = signed_in(carol)
    seen: list[str] = []
    url: str | None = reverse("console:usage_requests") + "?status=ok"
    while url:
        html = client.get(url).content.decode()
        seen += re.findall(r'data-request="([^"]+)"', html)
        found = re.search(r'href="([^"]+)" rel="next"', html)
        url = (
            reverse("console:usage_requests") + found.group(1).replace("&amp;", "&")
            if found
            else None
        )
    assert seen == [r.request_id for r in reversed(made)]
    html = client.get(reverse("console:usage_requests"), {"request_id": "req-03"}).content.decode()
    assert re.findall(r'data-request="([^"]+)"', html) == ["req-03"]
    html = client.get(
        reverse("console:usage_requests"), {"status": "upstream_error"}
    ).content.decode()
    assert re.findall(r'data-request="([^"]+)"', html) == ["req-error"]


def follow(client: Client, url: str, rel: str) -> tuple[list[str], str | None]:
    """The request ids a log page shows, and its ``rel`` link."""
    html = client.get(url).content.decode()
    found = re.search(rf'href="([^"]+)" rel="{rel}"', html)
    link = (
        reverse("console:usage_requests") + found.group(1).replace("&amp;", "&") if found else None
    )
    return re.findall(r'data-request="([^"]+)"', html), link


def test_a_ranged_log_pages_newest_first_by_time_both_ways(carol, alice, monkeypatch) -> None:
    # A link from a report or a dashboard names a range: its requests newest first by
    # time (read from the time index, however old the range), a late record (a journal
    # replay: a high id for an old time) in its place, records of one instant by id.
    from accounts import console

    monkeypatch.setattr(console, "PER_PAGE", 2)
    key = ApiKey.issue(user=alice, name="k")[0]
    day = datetime(2026, 10, 7, tzinfo=UTC)
    at = {
        "before-range": day - timedelta(microseconds=1),
        "in-0": day,
        "in-1": day + timedelta(hours=2, microseconds=123457),
        "in-2": day + timedelta(hours=3, microseconds=5),
        "in-3": day + timedelta(hours=3, microseconds=5),  # one instant, three records
        "in-4": day + timedelta(hours=3, microseconds=5),
        "in-5": day + timedelta(hours=5, microseconds=999999),
        "in-6": day + timedelta(hours=23, minutes=59, microseconds=1),
        "after-range": day + timedelta(days=1),
        "late": day + timedelta(hours=4),
    }
    for request_id, moment in at.items():
        record(alice, key, request_id=request_id, created_at=moment)
    client = signed_in(carol)
    url: str | None = (
        reverse("console:usage_requests") + "?range=custom&from=2026-10-07&to=2026-10-08&tz=UTC"
    )
    pages: list[list[str]] = []
    last = ""
    while url:
        last = url
        shown, url = follow(client, url, "next")
        pages.append(shown)
    assert pages == [["in-6", "in-5"], ["late", "in-4"], ["in-3", "in-2"], ["in-1", "in-0"]]
    back: list[list[str]] = []
    url = follow(client, last, "prev")[1]
    while url:
        shown, url = follow(client, url, "prev")
        back.insert(0, shown)
    assert back == pages[:-1]


def test_a_hand_edited_log_cursor_is_never_a_500(carol, alice) -> None:
    key = ApiKey.issue(user=alice, name="k")[0]
    record(alice, key, request_id="one")
    client = signed_in(carol)
    url = reverse("console:usage_requests")
    for cursor in (
        {"after": "1", "at": str(10**18)},  # past year 9999
        {"before": "1", "at": str(-(10**17))},
        {"after": "1", "at": str(10**20)},  # past what a timedelta holds
        {"after": "x", "at": "y"},
        {"before": str(10**30)},
    ):
        response = client.get(url, {"range": "24h", **cursor})
        assert response.status_code == 200, cursor


def test_times_show_in_the_pages_zone(carol, alice) -> None:
    # The range and the log's times in the zone the page names, not the server's.
    key = ApiKey.issue(user=alice, name="k")[0]
    made = record(
        alice, key, request_id="at-midnight-utc", created_at=datetime(2026, 10, 7, tzinfo=UTC)
    )
    client = signed_in(carol)
    ranged = {"range": "custom", "from": "2026-10-07", "to": "2026-10-08", "tz": "Asia/Kathmandu"}
    html = client.get(reverse("console:usage"), ranged).content.decode()
    assert "2026-10-07 00:00 to 2026-10-08 00:00 (Asia/Kathmandu)" in html
    html = client.get(reverse("console:usage_requests"), ranged).content.decode()
    assert "Requests from 2026-10-07 00:00 to 2026-10-08 00:00 (Asia/Kathmandu)" in html
    assert "2026-10-07 05:45:00" in html  # 00:00 UTC
    page = reverse("console:usage_request", args=[made.pk])
    html = client.get(page, {"tz": "Asia/Kathmandu"}).content.decode()
    assert "2026-10-07 05:45:00</time> (Asia/Kathmandu)" in html


def test_a_ranged_log_says_so_and_keeps_its_range_when_filtered(carol, alice) -> None:
    key = ApiKey.issue(user=alice, name="k")[0]
    record(alice, key, request_id="in-range", created_at=datetime(2026, 10, 7, 12, tzinfo=UTC))
    record(alice, key, request_id="today")
    client = signed_in(carol)
    url = reverse("console:usage_requests")
    ranged = {"range": "custom", "from": "2026-10-07", "to": "2026-10-08", "tz": "UTC"}
    html = client.get(url, {**ranged, "model": "gpt-x"}).content.decode()
    assert re.findall(r'data-request="([^"]+)"', html) == ["in-range"]
    start = html.index('<form class="filters')
    form = html[start : html.index("</form>", start)]
    hidden = dict(re.findall(r'type="hidden" name="(\w+)" value="([^"]*)"', form))
    assert hidden == {"range": "custom", "from": "2026-10-07", "to": "2026-10-08"}
    everything = re.search(r'href="([^"]*)">All requests<', html)
    assert everything is not None
    link = everything.group(1).replace("&amp;", "&")
    assert "range" not in link
    assert "model=gpt-x" in link
    html = client.get(url + link).content.decode()
    assert re.findall(r'data-request="([^"]+)"', html) == ["today", "in-range"]
    assert "All requests" not in html


def test_a_request_page_shows_what_was_recorded(carol, alice) -> None:
    key = ApiKey.issue(user=alice, name="k")[0]
    made = record(
        alice,
        key,
        status="error",
        http_status=429,
        error_type="rate_limit",
        error_message="slow down",
        input_price=Decimal("2.5"),
        upstream_model="gpt-x-2026",
    )
    html = signed_in(carol).get(reverse("console:usage_request", args=[made.pk])).content.decode()
    for expected in (
        "rate_limit",
        "slow down",
        "2.5",
        "gpt-x-2026",
        key.prefix,
        "0.000123456789",
        "alice@example.com",
    ):
        assert expected in html


def test_the_live_strip_counts_the_last_60_seconds(carol, alice) -> None:
    key = ApiKey.issue(user=alice, name="k")[0]
    now = timezone.now()
    record(alice, key, created_at=now - timedelta(seconds=10), cost=Decimal("0.25"))
    record(alice, key, created_at=now - timedelta(seconds=30), status="error", http_status=500)
    record(alice, key, created_at=now - timedelta(seconds=90), cost=Decimal("7"))
    for page in ("console:usage_live", "console:usage"):  # polled, and in the dashboard
        html = signed_in(carol).get(reverse(page)).content.decode()
        values = dict(re.findall(r'data-live="(\w+)">([^<]*)<', html))
        assert values == {
            "requests": "2",
            "tokens": "220",
            "errors": "1",
            "cost": "0.250123456789",
        }
        assert 'hx-trigger="every' in html


def test_the_dashboard_reads_in_chinese(carol, usage) -> None:
    client = signed_in(carol)
    client.cookies["django_language"] = "zh-hans"
    page = client.get(reverse("console:usage")).content.decode()
    for chinese in ("费用趋势", "查看数据", "下载 CSV", "最近 24 小时", "按模型", "被限流", "毫秒"):
        assert chinese in page
    for english in ("Cost over time", "Show the numbers", "Last 24 hours", "rate limited"):
        assert english not in page


def test_tiles_show_grouped_digits_and_money_to_the_cent(carol, alice) -> None:
    key = ApiKey.objects.filter(user=alice).first()
    for _ in range(3):
        record(alice, key, input_tokens=600_000, output_tokens=1, cost=Decimal("1.234567"))
    page = signed_in(carol).get(reverse("console:usage")).content.decode()
    assert "1,800,003" in page  # tokens, grouped
    assert "3.70 USD" in page  # money rounded to the cent for the glance...
    assert 'title="3.703701"' in page  # ...and exact a hover away


@pytest.mark.django_db(transaction=True)
def test_the_four_reads_made_at_once_show_what_one_after_another_show(
    carol, usage, monkeypatch
) -> None:
    """On PostgreSQL the dashboard's reads run side by side, each on its own connection."""
    import threading

    from django.db import connection, transaction

    from keys import rollups

    if connection.vendor != "postgresql":
        pytest.skip("the reads run side by side on PostgreSQL only")
    threads: list[int] = []
    summarize = rollups.summarize

    def watched(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return summarize(*args, **kwargs)

    monkeypatch.setattr(rollups, "summarize", watched)
    client = signed_in(carol)
    for params in ({"range": "24h"}, {"range": "30d", "tz": "Asia/Kathmandu", "stack": "key"}):
        threads.clear()
        at_once = tables_of(client.get(reverse("console:usage"), params).content.decode())
        assert len(threads) == 4
        assert len(set(threads)) > 1
        threads.clear()
        with transaction.atomic():  # inside a transaction: one after another, here
            in_turn = tables_of(client.get(reverse("console:usage"), params).content.decode())
        assert len(set(threads)) == 1
        assert at_once == in_turn
        summary = {row[0]: row[1] for row in at_once["tiles"][1:]}
        assert summary["Requests"] == "5"
