"""Celery tasks of the usage ledger: roll-ups and retention (both on the beat schedule)."""

from __future__ import annotations

from celery import shared_task

from keys import rollups


@shared_task(ignore_result=True)
def roll_up_usage(max_buckets: int = 96) -> int:
    """Recompute the closed buckets that gained ledger rows; idempotent, bounded."""
    return rollups.roll_up(max_buckets=max_buckets).buckets


@shared_task(ignore_result=True)
def apply_usage_retention(batch: int = 10_000, max_batches: int = 100) -> int:
    """Delete raw ledger rows older than SWITCHBOARD_USAGE_RETENTION_DAYS (rolled up first)."""
    return rollups.apply_retention(batch=batch, max_batches=max_batches)


@shared_task(ignore_result=True)
def produce_monthly_statements() -> str:
    """Last month's statements, once: run hourly by the beat, it acts on the first run of a
    month (in ``TIME_ZONE``) and finds them produced on every later one."""
    from keys import statements

    month = statements.produce()
    return f"{month}" if month else ""
