"""``manage.py usage demo|rollup``: synthetic usage that the roll-ups count exactly."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from keys import rollups
from keys.models import UsageRecord, UsageRollup, UsageRollupState


def run(*args: str) -> str:
    out = StringIO()
    call_command("usage", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_demo_fills_the_ledger_and_the_rollups() -> None:
    output = run("demo", "--records", "3000", "--days", "3", "--seed", "5")
    assert "3000 demo records" in output
    records = list(UsageRecord.objects.all())
    assert len(records) == 3000
    assert all(r.request_id.startswith("demo-") for r in records)
    now = timezone.now()
    assert all(now - timedelta(days=3, minutes=1) <= r.created_at <= now for r in records)
    # Realistic: several users, models, sources, outcomes; costs from prices.
    assert len({r.user_id for r in records}) >= 5
    assert len({r.model for r in records}) >= 4
    assert {r.dialect for r in records} >= {"browser", "openai"}
    statuses = Counter(r.status for r in records)
    assert statuses["ok"] > 2500
    assert statuses["error"] > 0
    assert any(r.http_status == 429 for r in records)
    priced = [r for r in records if r.priced]
    assert priced
    assert all(
        r.cost
        == (
            (r.input_tokens - r.cached_tokens) * r.input_price
            + r.output_tokens * r.output_price
            + r.cached_tokens * r.cached_input_price
        )
        / 1_000_000
        for r in priced[:200]
    )
    # Rolled up: the closed buckets are in the roll-ups, exactly.
    open_bucket = rollups.bucket_of(now)
    # The newest bucket with records that was closed when the command ran (a 15-minute
    # boundary may have passed since) is rolled up.  Not "the last closed bucket": the
    # demo's traffic follows the time of day, and its last buckets may hold no record.
    rolled = set(UsageRollup.objects.values_list("bucket_start", flat=True))
    closed_then = {
        rollups.bucket_of(r.created_at)
        for r in records
        if rollups.bucket_of(r.created_at) < open_bucket - rollups.BUCKET
    }
    assert max(closed_then) in rolled
    closed = [r for r in records if rollups.bucket_of(r.created_at) <= max(rolled)]
    assert sum(UsageRollup.objects.values_list("requests", flat=True)) == len(closed)
    assert sum(UsageRollup.objects.values_list("cost_units", flat=True)) == sum(
        int(r.cost.scaleb(12)) for r in closed
    )
    start = rollups.bucket_of(now - timedelta(days=4))
    (total,) = rollups.summarize(start, open_bucket + rollups.BUCKET, granularity="total")
    assert total.totals.requests == 3000
    assert total.totals.cost == sum((r.cost for r in records), Decimal(0))


@pytest.mark.django_db
def test_demo_refuses_more_records_than_its_request_ids_number() -> None:
    with pytest.raises(CommandError, match="at most 999,999,999"):
        run("demo", "--records", str(10**9))
    assert not UsageRecord.objects.exists()


@pytest.mark.django_db
def test_demo_refuses_a_database_with_real_usage(alice) -> None:
    UsageRecord.objects.create(
        request_id="real-1",
        user=alice,
        endpoint="messages",
        dialect="anthropic",
        model="m",
        status="ok",
    )
    with pytest.raises(CommandError, match="real usage"):
        run("demo", "--records", "10")
    assert UsageRecord.objects.count() == 1
    run("demo", "--records", "10", "--force", "--no-rollup")
    assert UsageRecord.objects.count() == 11
    # Demo data again is fine without --force.
    UsageRecord.objects.filter(request_id="real-1").delete()
    run("demo", "--records", "10", "--no-rollup")
    assert UsageRecord.objects.count() == 20


@pytest.mark.django_db
def test_rollup_command_catches_up_and_rebuilds() -> None:
    run("demo", "--records", "500", "--days", "1", "--no-rollup")
    assert not UsageRollup.objects.exists()
    assert "rolled up" in run("rollup")
    rows = list(UsageRollup.objects.order_by("id").values_list("bucket_start", "requests"))
    assert UsageRollupState.objects.get().watermark_id == UsageRecord.objects.latest("id").id
    since = (timezone.now() - timedelta(days=2)).isoformat()
    assert "rebuilt" in run(
        "rollup", "--rebuild", "--since", since, "--until", timezone.now().isoformat()
    )
    assert sorted(UsageRollup.objects.values_list("bucket_start", "requests")) == sorted(rows)
    with pytest.raises(CommandError):
        run("rollup", "--rebuild")


@pytest.mark.django_db(transaction=True)
def test_a_large_postgresql_load_restores_every_index_and_constraint() -> None:
    """A load of 100,000+ rows drops the ledger's indexes and keys for speed: all come back."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the index rebuild is PostgreSQL's")

    def schema() -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'keys_usagerecord'"
            )
            indexes = set(cursor.fetchall())
            cursor.execute(
                "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = 'keys_usagerecord'::regclass"
            )
            return indexes, set(cursor.fetchall())

    before = schema()
    output = run("demo", "--records", "100000", "--days", "2", "--no-rollup")
    assert "100000 demo records" in output
    assert UsageRecord.objects.count() == 100_000
    assert schema() == before


@pytest.mark.django_db
def test_sqlite_learns_the_ledgers_statistics_and_reads_recent_rows_by_time(monkeypatch) -> None:
    """Without statistics SQLite read every row of a model for its last minutes."""
    from django.db import connection

    if connection.vendor != "sqlite":
        pytest.skip("PostgreSQL's autovacuum keeps its statistics")
    run("demo", "--records", "12000", "--days", "2", "--no-rollup")
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM sqlite_stat1")
        cursor.execute("ANALYZE sqlite_schema")  # the planner forgets what it knew
    monkeypatch.setattr(rollups, "_analyzed_high", 0)
    recent = UsageRecord.objects.filter(
        model="gpt-4o", created_at__gte=timezone.now() - timedelta(minutes=15)
    )

    def plan() -> str:
        sql, params = recent.query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params)
            return " ".join(str(row[-1]) for row in cursor.fetchall())

    assert "usage_record_model_id" in plan()  # the trap
    rollups.roll_up()  # (every minute, or before a dashboard's reads) keeps them
    assert "created_at" in plan()
    assert not rollups.keep_statistics(rollups.committed_high())  # again once it has doubled


@pytest.mark.django_db(transaction=True)
def test_the_binary_copy_stores_exactly_the_rows_drawn() -> None:
    """PostgreSQL gets the rows in its binary COPY format: each the generator's, to the digit."""
    from datetime import UTC, datetime

    from django.db import connection

    from keys.management.commands.usage import COLUMNS, generate, load_postgresql

    if connection.vendor != "postgresql":
        pytest.skip("the binary COPY is PostgreSQL's")
    end = timezone.now()
    load_postgresql(generate(3000, days=2, seed=9, end=end))
    # The same seed draws the same rows; as tuples they are what SQLite is given.
    drawn = [row for block in generate(3000, days=2, seed=9, end=end).tuples() for row in block]
    loaded = list(UsageRecord.objects.order_by("id").values_list(*COLUMNS))
    assert len(loaded) == len(drawn) == 3000
    numeric = {"input_price", "output_price", "cached_input_price", "cost", "upstream_cost"}
    for got, want in zip(loaded, drawn, strict=True):
        expected = dict(zip(COLUMNS, want, strict=True))
        expected["created_at"] = datetime.fromisoformat(want[0]).replace(tzinfo=UTC)
        for name in numeric:
            expected[name] = Decimal(expected[name])
        row = dict(zip(COLUMNS, got, strict=True))
        # Request ids differ per load (their run prefix); their numbers do not.
        assert row.pop("request_id")[-9:] == expected.pop("request_id")[-9:]
        assert row == expected
