"""Usage roll-ups equal the raw ledger exactly, in any zone, and stay so incrementally."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from accounts.models import User
from keys import rollups
from keys.models import ApiKey, UsageRecord, UsageRollup, UsageRollupState
from tests.conftest import make_user

# Around New York's DST change (2026-11-01 02:00 EDT → 01:00 EST): a 25-hour local day.
ORIGIN = datetime(2026, 10, 30, 0, 0, tzinfo=UTC)
SPAN = timedelta(days=4)
NOW = ORIGIN + SPAN + timedelta(hours=1)
ZONES = ["UTC", "Asia/Shanghai", "Asia/Kolkata", "Asia/Kathmandu", "America/New_York"]
STATUSES = [
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


def settle(now: datetime = NOW, max_buckets: int = 10_000) -> None:
    """Roll up everything closed (in runs of ``max_buckets``)."""
    while not rollups.roll_up(now=now, max_buckets=max_buckets).done:
        pass


def make_records(
    rng: random.Random,
    users: list[User],
    keys: list[ApiKey],
    count: int,
    *,
    start=ORIGIN,
    span=SPAN,
) -> list[UsageRecord]:
    rows = []
    for _ in range(count):
        key = rng.choice(keys)
        status, http = rng.choice(STATUSES)
        rows.append(
            UsageRecord(
                created_at=start + timedelta(seconds=rng.uniform(0, span.total_seconds())),
                request_id=f"r{rng.getrandbits(64):x}",
                user_id=key.user_id,
                key=key,
                endpoint=rng.choice(["chat.completions", "messages", "browser"]),
                dialect=rng.choice(["openai", "anthropic", "browser"]),
                model=rng.choice(["gpt-x", "claude-y", "local"]),
                provider=rng.choice(["openai", "anthropic", ""]),
                route_id=rng.choice([1, 2, None]),
                stream=rng.random() < 0.5,
                input_tokens=rng.randrange(0, 5000),
                output_tokens=rng.randrange(0, 2000),
                cached_tokens=rng.randrange(0, 500),
                status=status,
                http_status=http,
                cost=Decimal(rng.randrange(0, 10**11)).scaleb(-12),
                latency_ms=int(rng.lognormvariate(7, 1)),
                ttft_ms=rng.choice([None, rng.randrange(10, 40000)]),
            )
        )
    UsageRecord.objects.bulk_create(rows)
    return list(UsageRecord.objects.all())


@pytest.fixture
def cast(db) -> tuple[list[User], list[ApiKey]]:
    users = [make_user("alice@example.com"), make_user("bob@example.com")]
    keys = [ApiKey.issue(user=user, name=f"k{i}")[0] for user in users for i in range(2)]
    return users, keys


def expected(
    records: list[UsageRecord], start: datetime, end: datetime, zone: ZoneInfo, by_day: bool
) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = defaultdict(
        lambda: {"requests": 0, "input": 0, "cached": 0, "output": 0, "cost": Decimal(0)}
    )
    for record in records:
        if not start <= record.created_at < end:
            continue
        slot = record.created_at.astimezone(zone).date() if by_day else None
        totals = out[slot]
        totals["requests"] += 1
        totals["input"] += record.input_tokens
        totals["cached"] += record.cached_tokens
        totals["output"] += record.output_tokens
        totals["cost"] += record.cost
    return dict(out)


def actual(periods: list[rollups.Period], by_day: bool) -> dict[Any, dict[str, Any]]:
    return {
        (period.start.date() if by_day else None): {
            "requests": period.totals.requests,
            "input": period.totals.input_tokens,
            "cached": period.totals.cached_tokens,
            "output": period.totals.output_tokens,
            "cost": period.totals.cost,
        }
        for period in periods
    }


def random_window(rng: random.Random, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """Local midnights (whole local days) or arbitrary 15-minute-aligned instants."""
    if rng.random() < 0.5:
        first = (ORIGIN - timedelta(days=1)).astimezone(zone).date()
        day = first + timedelta(days=rng.randrange(0, 3))
        start = datetime(day.year, day.month, day.day, tzinfo=zone)
        end_day = day + timedelta(days=rng.randrange(1, 4))
        return start, datetime(end_day.year, end_day.month, end_day.day, tzinfo=zone)
    buckets = int(SPAN / rollups.BUCKET)
    low = rng.randrange(-4, buckets)
    high = rng.randrange(low + 1, buckets + 8)
    return ORIGIN + low * rollups.BUCKET, ORIGIN + high * rollups.BUCKET


def test_rollups_equal_the_ledger_in_every_zone(cast) -> None:
    users, keys = cast
    rng = random.Random(12)
    records = make_records(rng, users, keys, 1500)
    settle()
    assert UsageRollupState.objects.get().watermark_id == max(r.pk for r in records)

    # The roll-up table itself: per bucket, exactly the ledger.
    per_bucket: dict[datetime, list[int]] = defaultdict(lambda: [0, 0])
    for record in records:
        slot = per_bucket[rollups.bucket_of(record.created_at)]
        slot[0] += 1
        slot[1] += int(record.cost.scaleb(12))
    stored: dict[datetime, list[int]] = defaultdict(lambda: [0, 0])
    for row in UsageRollup.objects.all():
        stored[row.bucket_start][0] += row.requests
        stored[row.bucket_start][1] += row.cost_units
    assert stored == per_bucket

    for zone_name in ZONES:
        zone = ZoneInfo(zone_name)
        for _ in range(6):
            start, end = random_window(rng, zone)
            by_day = rng.random() < 0.7
            periods = rollups.summarize(
                start,
                end,
                zone=zone,
                granularity="day" if by_day else "total",
                now=NOW,
                catch_up_first=False,
            )
            assert actual(periods, by_day) == expected(records, start, end, zone, by_day), (
                zone_name,
                start,
                end,
            )


def test_new_york_dst_day_has_25_hours(cast) -> None:
    users, keys = cast
    rng = random.Random(5)
    day = datetime(2026, 11, 1, tzinfo=ZoneInfo("America/New_York"))
    make_records(rng, users, keys, 400, start=day.astimezone(UTC), span=timedelta(hours=25))
    settle()
    end = datetime(2026, 11, 2, tzinfo=ZoneInfo("America/New_York"))
    hours = rollups.summarize(
        day, end, zone="America/New_York", granularity="hour", now=NOW, catch_up_first=False
    )
    assert len(hours) == 25  # 01:00 EDT and 01:00 EST are two hours
    assert sum(p.totals.requests for p in hours) == 400
    (total,) = rollups.summarize(day, end, zone="America/New_York", now=NOW, catch_up_first=False)
    assert total.end.astimezone(UTC) - total.start.astimezone(UTC) == timedelta(hours=25)


def test_kathmandu_hours_are_exact(cast) -> None:
    users, keys = cast
    records = make_records(random.Random(3), users, keys, 300)
    settle()
    zone = ZoneInfo("Asia/Kathmandu")
    start = ORIGIN + timedelta(hours=6, minutes=15)  # 12:00 in +05:45
    hours = rollups.summarize(
        start,
        start + timedelta(hours=6),
        zone=zone,
        granularity="hour",
        now=NOW,
        catch_up_first=False,
    )
    for period in hours:
        assert period.start.minute == 0
        want = [r for r in records if period.start <= r.created_at < period.end]
        assert period.totals.requests == len(want)
        assert period.totals.cost == sum((r.cost for r in want), Decimal(0))


def test_recomputing_twice_changes_nothing(cast) -> None:
    users, keys = cast
    records = make_records(random.Random(7), users, keys, 500)
    settle(max_buckets=7)  # many bounded runs make one scan, then the watermark moves
    assert UsageRollupState.objects.get().watermark_id == max(r.pk for r in records)
    fields = [f.attname for f in UsageRollup._meta.concrete_fields if f.name != "id"]

    def snapshot() -> list[tuple[Any, ...]]:
        return sorted(
            UsageRollup.objects.values_list(*fields), key=lambda row: tuple(map(str, row))
        )

    before = snapshot()
    buckets = list(UsageRollup.objects.values_list("bucket_start", flat=True).distinct())
    for _ in range(2):
        rollups.recompute(buckets)
        assert snapshot() == before
    rollups.rebuild(ORIGIN, ORIGIN + SPAN)
    assert snapshot() == before


def test_late_rows_are_picked_up_and_read_before_that(cast) -> None:
    users, keys = cast
    rng = random.Random(9)
    records = make_records(rng, users, keys, 300)
    settle()
    # A replayed journal: rows of an old, rolled-up bucket arrive with new ids.
    late_start = ORIGIN + timedelta(hours=5)
    records = make_records(rng, users, keys, 20, start=late_start, span=timedelta(minutes=10))
    window = (ORIGIN, ORIGIN + SPAN)
    want = expected(records, *window, ZoneInfo("UTC"), False)
    # Not rolled up yet: the reader takes that bucket from the ledger.
    got = rollups.summarize(*window, granularity="total", now=NOW, catch_up_first=False)
    assert actual(got, False) == want
    result = rollups.roll_up(now=NOW + timedelta(minutes=10))
    assert result.buckets == 1
    settle(NOW + timedelta(minutes=10))
    assert actual(rollups.summarize(*window, granularity="total", now=NOW), False) == want
    assert sum(UsageRollup.objects.values_list("requests", flat=True)) == len(records)


def test_the_open_bucket_is_read_raw_then_rolled_up_once_closed(cast) -> None:
    users, keys = cast
    records = make_records(random.Random(4), users, keys, 400)
    now = ORIGIN + SPAN - timedelta(minutes=5)  # the last records are in the open bucket
    open_bucket = rollups.bucket_of(now)
    assert any(r.created_at >= open_bucket for r in records)
    settle(now)
    assert not UsageRollup.objects.filter(bucket_start__gte=open_bucket).exists()
    current = UsageRollupState.objects.get()
    assert current.watermark_id == max(r.pk for r in records)
    assert current.unrolled_from == open_bucket
    (total,) = rollups.summarize(
        ORIGIN, ORIGIN + SPAN, granularity="total", now=now, catch_up_first=False
    )
    assert total.totals.requests == len(records)
    # Later, the bucket is closed: the next run rolls it up.
    settle(NOW)
    assert UsageRollup.objects.filter(bucket_start=open_bucket).exists()
    assert UsageRollupState.objects.get().unrolled_from is None
    assert sum(UsageRollup.objects.values_list("requests", flat=True)) == len(records)
    (total,) = rollups.summarize(
        ORIGIN, ORIGIN + SPAN, granularity="total", now=NOW, catch_up_first=False
    )
    assert total.totals.requests == len(records)


def test_a_member_view_counts_only_their_usage(cast) -> None:
    (alice, bob), keys = cast
    records = make_records(random.Random(11), [alice, bob], keys, 400)
    settle()
    # Some of bob's usage is still raw (not rolled up) when alice reads.
    make_records(random.Random(12), [bob], [k for k in keys if k.user_id == bob.pk], 30)
    records = list(UsageRecord.objects.all())
    for person in (alice, bob):
        (total,) = rollups.summarize(
            ORIGIN,
            ORIGIN + SPAN,
            granularity="total",
            user=person.pk,
            now=NOW,
            catch_up_first=False,
        )
        mine = [r for r in records if r.user_id == person.pk]
        assert total.totals.requests == len(mine)
        assert total.totals.cost == sum((r.cost for r in mine), Decimal(0))
    by_user = rollups.summarize(
        ORIGIN, ORIGIN + SPAN, granularity="total", by="user_id", now=NOW, catch_up_first=False
    )
    assert {p.group: p.totals.requests for p in by_user} == {
        person.pk: len([r for r in records if r.user_id == person.pk]) for person in (alice, bob)
    }


def test_errors_and_percentiles(cast) -> None:
    users, keys = cast
    records = make_records(random.Random(13), users, keys, 600)
    settle()
    (total,) = rollups.summarize(
        ORIGIN, ORIGIN + SPAN, granularity="total", now=NOW, catch_up_first=False
    )
    t = total.totals
    assert t.by_status["rate_limited"] == len([r for r in records if r.http_status == 429])
    assert t.errors == len([r for r in records if r.status == "error"])
    assert t.ttft_count == len([r for r in records if r.ttft_ms is not None])
    assert t.streamed == len([r for r in records if r.stream])
    latencies = sorted(r.latency_ms for r in records)
    p95 = t.latency_percentile(0.95)
    assert p95 is not None
    true_p95 = latencies[int(0.95 * len(latencies)) - 1]
    bounds = rollups.LATENCY_BOUNDS_MS
    # The histogram answer is the upper bound of the bucket that holds the true value.
    assert true_p95 <= p95 or p95 == bounds[-1]
    lower = max([b for b in bounds if b < p95], default=0)
    assert true_p95 > lower or p95 == bounds[0]


def test_embedded_reads_catch_up(cast, settings) -> None:
    settings.CELERY_TASK_ALWAYS_EAGER = True
    users, keys = cast
    make_records(random.Random(1), users, keys, 50)
    rollups.summarize(ORIGIN, ORIGIN + SPAN, granularity="total")
    assert UsageRollup.objects.exists()


def test_windows_must_be_aligned(db) -> None:
    with pytest.raises(ValueError, match="15-minute"):
        rollups.summarize(ORIGIN + timedelta(minutes=5), ORIGIN + SPAN)
    with pytest.raises(ValueError, match="granularity"):
        rollups.summarize(ORIGIN, ORIGIN + SPAN, granularity="year")


def test_a_record_in_the_last_microsecond_of_a_bucket_stays_in_that_bucket(cast) -> None:
    # SQLite rounds fractional seconds to the millisecond: 15:59:59.999999 must not become
    # 16:00 (here: the next day in Shanghai, and the next month).
    users, keys = cast
    edge = datetime(2026, 10, 31, 16, 0, tzinfo=UTC)
    for offset, cost in ((timedelta(microseconds=-1), "0.5"), (timedelta(0), "2")):
        UsageRecord.objects.create(
            created_at=edge + offset,
            request_id=f"edge{cost}",
            user_id=keys[0].user_id,
            key=keys[0],
            model="m",
            provider="p",
            endpoint="chat.completions",
            dialect="openai",
            status="ok",
            http_status=200,
            cost=Decimal(cost),
        )
    settle()
    before = UsageRollup.objects.filter(bucket_start=edge - rollups.BUCKET).get()
    assert before.requests == 1
    days = rollups.summarize(
        edge - timedelta(days=1), edge + timedelta(days=1), zone="Asia/Shanghai", now=NOW
    )
    assert [(p.start.date().isoformat(), p.totals.cost) for p in days] == [
        ("2026-10-31", Decimal("0.5")),
        ("2026-11-01", Decimal("2")),
    ]
