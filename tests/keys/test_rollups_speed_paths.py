"""The fast read paths equal the raw ledger exactly: per-period SQL sums, day windows, one read
split into several figures.  Zones UTC, Shanghai, Kolkata (+05:30), Kathmandu (+05:45) and New
York across its DST change (a 25-hour day, never a day window).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from accounts.models import User
from keys import rollups
from keys.models import ApiKey, UsageRecord
from keys.rollups import UsageRollupDay
from tests.conftest import make_user
from tests.keys.test_rollups import (
    NOW,
    ORIGIN,
    SPAN,
    ZONES,
    actual,
    expected,
    make_records,
    random_window,
    settle,
)


@pytest.fixture
def cast(db) -> tuple[list[User], list[ApiKey]]:
    users = [make_user("alice@example.com"), make_user("bob@example.com")]
    keys = [ApiKey.issue(user=user, name=f"k{i}")[0] for user in users for i in range(2)]
    return users, keys


def read(start: datetime, end: datetime, zone: ZoneInfo, granularity: str, **extra):
    return rollups.summarize(
        start, end, zone=zone, granularity=granularity, now=NOW, catch_up_first=False, **extra
    )


def quarter_hours_only(monkeypatch: pytest.MonkeyPatch):
    """Reads that never use day windows: the reference the windows must equal."""
    monkeypatch.setattr(rollups, "fill_days", lambda days, **kw: [])


def local_days(zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The whole local days of the records' span in ``zone`` (the NY DST day among them)."""
    first = (ORIGIN + timedelta(days=1)).astimezone(zone).date()
    start = datetime(first.year, first.month, first.day, tzinfo=zone)
    last = first + timedelta(days=3)
    end = datetime(last.year, last.month, last.day, tzinfo=zone)
    return start, end


def test_day_windows_equal_the_ledger_in_every_zone(cast, monkeypatch) -> None:
    users, keys = cast
    rng = random.Random(21)
    records = make_records(rng, users, keys, 1500)
    settle()
    for zone_name in ZONES:
        zone = ZoneInfo(zone_name)
        windows = [local_days(zone)] + [random_window(rng, zone) for _ in range(5)]
        for start, end in windows:
            for granularity in ("day", "total", "week", "month"):
                by_day = granularity == "day"
                first = read(start, end, zone, granularity)  # writes the windows
                again = read(start, end, zone, granularity)  # reads them
                if granularity in ("day", "total"):
                    want = expected(records, start, end, zone, by_day)
                    assert actual(first, by_day) == want, (zone_name, start, end, granularity)
                for period in first:
                    low, high = max(period.start, start), min(period.end, end)
                    inside = [r for r in records if low <= r.created_at < high]
                    assert period.totals.requests == len(inside)
                    assert period.totals.cost == sum((r.cost for r in inside), Decimal(0))
                assert again == first
                with monkeypatch.context() as patch:
                    quarter_hours_only(patch)
                    # Histograms, status classes, data-quality counts: all equal too.
                    assert read(start, end, zone, granularity) == first
        start, end = local_days(zone)
        # The path under test was taken: windows starting at this zone's local midnights.
        assert any(
            (day.astimezone(zone).hour, day.astimezone(zone).minute) == (0, 0)
            for day in UsageRollupDay.objects.filter(
                day_start__gte=start, day_start__lt=end, requests__gt=0
            ).values_list("day_start", flat=True)
        ), zone_name
    # New York's 1 November 2026 has 25 hours: never a window, read from the quarters.
    dst_day = datetime(2026, 11, 1, tzinfo=ZoneInfo("America/New_York")).astimezone(UTC)
    assert not UsageRollupDay.objects.filter(day_start=dst_day).exists()


def test_filters_and_groups_on_day_windows(cast, monkeypatch) -> None:
    users, keys = cast
    records = make_records(random.Random(4), users, keys, 800)
    settle()
    zone = ZoneInfo("Asia/Kathmandu")
    start, end = local_days(zone)
    for extra in (
        {"by": "model"},
        {"by": ("model", "key_id", "user_id")},
        {"user": users[0].pk, "by": "key_id"},
        {"model": "gpt-x", "status_class": "ok"},
        {"source": "browser", "by": "status_class"},
    ):
        fast = read(start, end, zone, "day", **extra)
        with monkeypatch.context() as patch:
            quarter_hours_only(patch)
            assert read(start, end, zone, "day", **extra) == fast, extra
    mine = read(start, end, zone, "total", user=users[0].pk)
    assert mine[0].totals.requests == sum(
        1 for r in records if r.user_id == users[0].pk and start <= r.created_at < end
    )


def test_a_recompute_drops_the_windows_it_touches(cast) -> None:
    users, keys = cast
    make_records(random.Random(8), users, keys, 400)
    settle()
    zone = ZoneInfo("Asia/Shanghai")
    start, end = local_days(zone)
    (before,) = read(start, end, zone, "total")
    assert UsageRollupDay.objects.exists()
    # A late row (a journal replayed) in the middle of a day already written.
    late = UsageRecord.objects.create(
        created_at=start + timedelta(hours=30),
        request_id="late-1",
        user=users[0],
        key=keys[0],
        model="gpt-x",
        status="ok",
        input_tokens=7,
        cost=Decimal("0.000000000013"),
    )
    (dirty,) = read(start, end, zone, "total")  # read raw until rolled up
    assert dirty.totals.requests == before.totals.requests + 1
    settle()
    (clean,) = read(start, end, zone, "total")
    assert clean.totals.requests == before.totals.requests + 1
    assert clean.totals.cost == before.totals.cost + late.cost
    assert clean.totals.input_tokens == before.totals.input_tokens + 7


def test_a_day_without_usage_reads_empty_then_counts_later_rows(cast) -> None:
    users, keys = cast
    zone = ZoneInfo("UTC")
    start, end = local_days(zone)
    assert read(start, end, zone, "day") == []
    assert read(start, end, zone, "total") == []  # the empty days' markers are skipped
    make_records(random.Random(2), users, keys, 200)
    settle()
    records = list(UsageRecord.objects.all())
    assert actual(read(start, end, zone, "day"), True) == expected(records, start, end, zone, True)


@pytest.mark.parametrize("zone_name", ["Asia/Kolkata", "Asia/Kathmandu", "America/New_York"])
@pytest.mark.parametrize("granularity", ["15min", "hour"])
def test_hours_and_quarters_are_summed_per_local_period(cast, zone_name, granularity) -> None:
    users, keys = cast
    records = make_records(random.Random(6), users, keys, 600)
    settle()
    zone = ZoneInfo(zone_name)
    start = ORIGIN + timedelta(days=1, hours=22, minutes=45)
    end = start + timedelta(hours=10)  # through New York's repeated hour
    periods = read(start, end, zone, granularity)
    assert sum(p.totals.requests for p in periods) == sum(
        1 for r in records if start <= r.created_at < end
    )
    for period in periods:
        low, high = max(period.start, start), min(period.end, end)
        want = [r for r in records if low <= r.created_at < high]
        assert period.totals.requests == len(want)
        assert period.totals.output_tokens == sum(r.output_tokens for r in want)
        assert period.totals.cost == sum((r.cost for r in want), Decimal(0))
        if granularity == "hour":
            assert period.start.minute == 0
            assert period.end.astimezone(UTC) - period.start.astimezone(UTC) == timedelta(hours=1)


def test_one_read_split_by_dimension_equals_a_read_per_dimension(cast) -> None:
    users, keys = cast
    make_records(random.Random(9), users, keys, 700)
    settle()
    zone = ZoneInfo("Asia/Kathmandu")
    start, end = ORIGIN + timedelta(hours=3), ORIGIN + SPAN - timedelta(hours=2)
    both = read(start, end, zone, "total", by=("model", "key_id", "user_id"))
    for index, name in enumerate(("model", "key_id", "user_id")):
        assert rollups.regroup(both, index) == read(start, end, zone, "total", by=name)
    # The stacked read's groups merged per period equal the read by status class.
    stacked = read(start, end, zone, "day", by="model")
    statuses = read(start, end, zone, "day", by="status_class")

    def per_start(periods: list[rollups.Period]) -> dict[datetime, rollups.Totals]:
        merged: dict[datetime, rollups.Totals] = {}
        for period in periods:
            merged.setdefault(period.start, rollups.Totals()).add_totals(period.totals)
        return merged

    assert per_start(stacked) == per_start(statuses)


def test_retention_keeps_the_day_windows_exact(cast, settings) -> None:
    users, keys = cast
    records = make_records(random.Random(11), users, keys, 500)
    settle()
    zone = ZoneInfo("Asia/Kolkata")
    start, end = local_days(zone)
    before = read(start, end, zone, "day")
    deleted = rollups.apply_retention(1, now=NOW + timedelta(days=3))
    assert deleted
    assert read(start, end, zone, "day") == before
    assert actual(before, True) == expected(records, start, end, zone, True)


def test_a_roll_up_writes_the_default_zones_day_windows(cast, settings) -> None:
    settings.TIME_ZONE = "Asia/Shanghai"
    users, keys = cast
    make_records(random.Random(13), users, keys, 300)
    settle()  # no read yet
    written = set(UsageRollupDay.objects.filter(requests=0).values_list("day_start", flat=True))
    utc_days = {datetime(2026, 10, 30 + n, tzinfo=UTC) for n in range(2)}
    shanghai_days = {datetime(2026, 10, 30 + n, 16, tzinfo=UTC) for n in range(2)}
    assert utc_days | shanghai_days <= written
    assert all(d.astimezone(UTC).hour in (0, 16) for d in written)  # no other zone's days


def test_a_read_without_status_classes_has_the_same_sums(cast) -> None:
    users, keys = cast
    make_records(random.Random(17), users, keys, 500)
    settle()
    zone = ZoneInfo("America/New_York")
    start, end = ORIGIN + timedelta(hours=1), ORIGIN + SPAN
    for granularity in ("hour", "day", "total"):
        full = read(start, end, zone, granularity, by="key_id")
        for period in full:
            period.totals.by_status = {}
        assert read(start, end, zone, granularity, by="key_id", by_status=False) == full
