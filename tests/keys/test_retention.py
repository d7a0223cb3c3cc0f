"""Retention deletes old raw usage records in batches and never changes a roll-up."""

# ruff: noqa: F811 - the ``cast`` fixture is imported from test_rollups

from __future__ import annotations

import logging
import random
from datetime import timedelta
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command

from chatapp.environ import Env
from keys import rollups
from keys.models import UsageRecord, UsageRollup, UsageRollupState
from tests.keys.test_rollups import NOW, ORIGIN, SPAN, cast, make_records, settle  # noqa: F401


def snapshot() -> list[tuple[Any, ...]]:
    fields = [f.attname for f in UsageRollup._meta.concrete_fields if f.name != "id"]
    return sorted(UsageRollup.objects.values_list(*fields), key=lambda row: tuple(map(str, row)))


def test_retention_never_changes_a_rollup(cast) -> None:
    users, keys = cast
    records = make_records(random.Random(21), users, keys, 800)
    settle()
    before = snapshot()
    (full,) = rollups.summarize(
        ORIGIN, ORIGIN + SPAN, granularity="total", now=NOW, catch_up_first=False
    )
    now = ORIGIN + timedelta(days=2, hours=3, minutes=7)  # keep 1 day: delete the first ~day
    deleted = rollups.apply_retention(1, batch=50, now=now)
    cutoff = rollups.bucket_of(now - timedelta(days=1))
    assert deleted == len([r for r in records if r.created_at < cutoff]) > 0
    assert not UsageRecord.objects.filter(created_at__lt=cutoff).exists()
    assert UsageRecord.objects.count() == len(records) - deleted
    assert UsageRollupState.objects.get().raw_kept_from == cutoff
    assert snapshot() == before
    # Reports of the deleted period still work, and recomputing cannot empty them.
    rollups.rebuild(ORIGIN, ORIGIN + SPAN)
    rollups.recompute(UsageRollup.objects.values_list("bucket_start", flat=True))
    assert snapshot() == before
    (again,) = rollups.summarize(
        ORIGIN, ORIGIN + SPAN, granularity="total", now=NOW, catch_up_first=False
    )
    assert again.totals == full.totals


def test_retention_waits_for_buckets_not_rolled_up(cast) -> None:
    users, keys = cast
    make_records(random.Random(22), users, keys, 200)
    settle()
    # A late row in an old bucket, not rolled up yet: retention rolls it up first.
    late = make_records(
        random.Random(23), users, keys, 1, start=ORIGIN + timedelta(hours=1), span=timedelta(1)
    )
    now = ORIGIN + timedelta(days=3)
    rollups.apply_retention(1, now=now)
    assert sum(UsageRollup.objects.values_list("requests", flat=True)) == len(late)


def test_late_rows_in_sealed_buckets_are_reported(cast, caplog) -> None:
    users, keys = cast
    make_records(random.Random(24), users, keys, 100)
    settle()
    rollups.apply_retention(1, now=ORIGIN + timedelta(days=3))
    before = snapshot()
    make_records(random.Random(25), users, keys, 3, start=ORIGIN, span=timedelta(minutes=30))
    with caplog.at_level(logging.WARNING, logger="keys.rollups"):
        rollups.roll_up(now=NOW)
    assert "retention already deleted" in caplog.text
    assert snapshot() == before


def test_no_retention_by_default(cast, settings) -> None:
    users, keys = cast
    make_records(random.Random(26), users, keys, 50)
    assert settings.SWITCHBOARD_USAGE_RETENTION_DAYS is None
    assert rollups.apply_retention() == 0
    assert UsageRecord.objects.count() == 50


def test_the_task_and_command_apply_the_setting(cast, settings) -> None:
    from keys import tasks

    users, keys = cast
    records = make_records(random.Random(27), users, keys, 100)
    settings.SWITCHBOARD_USAGE_RETENTION_DAYS = 1  # every record is older than a day
    tasks.apply_usage_retention()  # as a worker runs it
    assert not UsageRecord.objects.exists()
    assert sum(UsageRollup.objects.values_list("requests", flat=True)) == len(records)
    call_command("usage", "retention", "--days", "1")


@pytest.mark.parametrize("value", ["0", "-3", "ten", "1.5"])
def test_the_setting_is_a_positive_integer(value: str) -> None:
    def parse(environ: dict[str, str]) -> int | None:
        return Env(environ).integer("SWITCHBOARD_USAGE_RETENTION_DAYS", 0, minimum=1) or None

    with pytest.raises(ImproperlyConfigured):
        parse({"SWITCHBOARD_USAGE_RETENTION_DAYS": value})
    assert parse({}) is None
    assert parse({"SWITCHBOARD_USAGE_RETENTION_DAYS": "90"}) == 90
