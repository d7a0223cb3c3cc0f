"""Usage roll-ups: the ledger per 15-minute UTC bucket, kept incrementally, read exactly.

Writing.  ``recompute(buckets)`` replaces the roll-up rows of whole buckets with one
GROUP BY over their ledger rows (DELETE + INSERT in one transaction): idempotent by
construction, so a bucket can be recomputed any time with the same result.
``roll_up()`` finds the buckets to recompute from a watermark on the ledger's id:
every row with an id above it marks its bucket dirty, late rows (a journal replayed
after a crash) included.  Only closed buckets are rolled up; the open one is always
read raw.  Celery beat runs it every minute (``keys.tasks.roll_up_usage``); in the
embedded mode (no worker, no beat) ``summarize()`` runs a bounded catch-up itself.

Reading.  ``summarize()`` adds the roll-ups of clean closed buckets to the raw ledger
of the dirty and open ones, so a chart is never behind and never counts a row twice.
Any zone is exact: 15 minutes divides every zone's UTC offset.

Retention (``apply_retention``) deletes raw rows only of rolled-up buckets, and seals
them (``UsageRollupState.raw_kept_from``) so they are never recomputed from nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection, transaction
from django.db.models import (
    Aggregate,
    BigIntegerField,
    Case,
    CharField,
    Count,
    F,
    Max,
    Min,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.db.models.expressions import Func
from django.utils import timezone

from keys.models import (
    BUCKET_SECONDS,
    COST_SCALE,
    LATENCY_BOUNDS_MS,
    LATENCY_COLUMNS,
    TTFT_BOUNDS_MS,
    TTFT_COLUMNS,
    StatusClass,
    UsageRecord,
    UsageRollup,
    UsageRollupState,
    UsageSource,
)

logger = logging.getLogger(__name__)

BUCKET = timedelta(seconds=BUCKET_SECONDS)
DIMENSIONS = ("user_id", "key_id", "model", "provider", "route_id", "source", "status_class")
SUMS = ("input_tokens", "cached_tokens", "output_tokens", "latency_sum_ms", "ttft_sum_ms")
COUNTS = (
    "requests",
    "streamed",
    "cost_units",
    "upstream_cost_units",
    "estimated",
    "unpriced",
    "zero_cost",
    "ttft_count",
    *LATENCY_COLUMNS,
    *TTFT_COLUMNS,
)
MEASURES = (*COUNTS, *SUMS)
GRANULARITIES = ("15min", "hour", "day", "week", "month", "total")


# --- Buckets --------------------------------------------------------------------------


def bucket_of(when: datetime) -> datetime:
    """The start of the UTC bucket holding ``when``."""
    epoch = int(when.timestamp())
    return datetime.fromtimestamp(epoch - epoch % BUCKET_SECONDS, UTC)


def check_aligned(when: datetime, name: str) -> None:
    if timezone.is_naive(when):
        raise ValueError(f"{name} must be an aware datetime")
    if when.timestamp() % BUCKET_SECONDS:
        raise ValueError(f"{name}={when.isoformat()} is not on a 15-minute boundary")


class BucketIndex(Func):
    """A ledger row's bucket as an integer: UTC epoch seconds // 900."""

    output_field = BigIntegerField()

    def __init__(self, expression: Any = "created_at") -> None:
        super().__init__(F(expression) if isinstance(expression, str) else expression)

    def as_sql(  # PostgreSQL and SQLite only (as_postgresql, as_sqlite)
        self,
        compiler: Any,
        connection: Any,
        function: Any = None,
        template: Any = None,
        arg_joiner: Any = None,
        **extra_context: Any,
    ) -> Any:
        raise NotImplementedError(f"BucketIndex on {connection.vendor}")

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return super().as_sql(
            compiler,
            connection,
            template=f"FLOOR(EXTRACT(EPOCH FROM %(expressions)s) / {BUCKET_SECONDS})::bigint",
            **extra,
        )

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Django keeps SQLite datetimes as UTC text; strftime('%s') reads them as UTC.  Only
        # the whole seconds (substr: "YYYY-MM-DD HH:MM:SS"): SQLite rounds fractions to the
        # millisecond, which put 23:59:59.9996 into the next bucket (and the next month).
        return super().as_sql(
            compiler,
            connection,
            template=(
                f"(CAST(strftime('%%%%s', substr(%(expressions)s, 1, 19)) AS INTEGER)"
                f" / {BUCKET_SECONDS})"
            ),
            **extra,
        )


class CostUnits(Aggregate):
    """SUM(cost) as an integer of 10⁻¹² units, exact on both databases.

    PostgreSQL sums the numeric column exactly.  SQLite keeps decimals as floats: each
    row's float is rounded back to its 12 decimal places (what Django reads for it)
    before the integer sum, so the total equals the sum of the rows as the ORM sees them.
    """

    function = "SUM"
    name = "CostUnits"
    output_field = BigIntegerField()

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return super().as_sql(
            compiler,
            connection,
            template=f"CAST(SUM(%(expressions)s) * 1e{COST_SCALE} AS BIGINT)",
            **extra,
        )

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return super().as_sql(
            compiler,
            connection,
            template=f"SUM(CAST(ROUND(%(expressions)s * 1e{COST_SCALE}) AS INTEGER))",
            **extra,
        )


def _source() -> Case:
    return Case(
        When(dialect="browser", then=Value(UsageSource.BROWSER.value)),
        default=Value(UsageSource.API.value),
        output_field=CharField(),
    )


def _status_class() -> Case:
    return Case(
        When(status="ok", then=Value(StatusClass.OK.value)),
        When(
            status__in=["client_disconnected", "stopped"], then=Value(StatusClass.CANCELLED.value)
        ),
        When(status="interrupted", then=Value(StatusClass.INTERRUPTED.value)),
        When(http_status=429, then=Value(StatusClass.RATE_LIMITED.value)),
        When(http_status__gte=400, http_status__lt=500, then=Value(StatusClass.CLIENT_ERROR.value)),
        default=Value(StatusClass.UPSTREAM_ERROR.value),
        output_field=CharField(),
    )


def _histogram(column: str, bounds: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    aggregates: dict[str, Any] = {}
    low: int | None = None
    for bound, name in zip(bounds, names, strict=False):
        within = Q(**{f"{column}__lte": bound})
        if low is not None:
            within &= Q(**{f"{column}__gt": low})
        aggregates[name] = Count("id", filter=within)
        low = bound
    aggregates[names[-1]] = Count("id", filter=Q(**{f"{column}__gt": low}))
    return aggregates


_used_tokens = Q(input_tokens__gt=0) | Q(output_tokens__gt=0)


def _ledger_measures() -> dict[str, Any]:
    # The data-quality counts come first: their filters name ledger columns
    # (input_tokens...) that the sums below shadow once annotated.
    return {
        "estimated": Count("id", filter=Q(estimated=True)),
        "unpriced": Count("id", filter=Q(priced=False) & _used_tokens),
        "zero_cost": Count("id", filter=Q(cost=0) & _used_tokens),
        "requests": Count("id"),
        "streamed": Count("id", filter=Q(stream=True)),
        "input_tokens": Sum("input_tokens"),
        "cached_tokens": Sum("cached_tokens"),
        "output_tokens": Sum("output_tokens"),
        "cost_units": CostUnits("cost"),
        "upstream_cost_units": CostUnits("upstream_cost"),
        "latency_sum_ms": Sum("latency_ms"),
        "ttft_count": Count("ttft_ms"),
        "ttft_sum_ms": Sum("ttft_ms"),
        **_histogram("latency_ms", LATENCY_BOUNDS_MS, LATENCY_COLUMNS),
        **_histogram("ttft_ms", TTFT_BOUNDS_MS, TTFT_COLUMNS),
    }


def _in_buckets(buckets: Iterable[datetime]) -> Q:
    """created_at within the given buckets, as ranges of consecutive buckets (index-friendly)."""
    ranges: list[list[datetime]] = []
    for start in sorted(set(buckets)):
        if ranges and ranges[-1][1] == start:
            ranges[-1][1] = start + BUCKET
        else:
            ranges.append([start, start + BUCKET])
    q = Q(pk__in=[])
    for low, high in ranges:
        q |= Q(created_at__gte=low, created_at__lt=high)
    return q


def ledger_groups(
    records: QuerySet[UsageRecord], dimensions: Sequence[str] = DIMENSIONS
) -> QuerySet[Any, dict[str, Any]]:
    """The ledger rows grouped by bucket (an epoch index) and ``dimensions``, with measures."""
    if "status_class" not in records.query.annotations:
        records = records.annotate(source=_source(), status_class=_status_class())
    return (
        records.annotate(bucket=BucketIndex())
        .values("bucket", *dimensions)
        .annotate(**_ledger_measures())
        .order_by()
    )


# --- Writing ----------------------------------------------------------------------------


def state(*, lock: bool = False) -> UsageRollupState:
    UsageRollupState.objects.get_or_create(pk=1)
    rows = UsageRollupState.objects.filter(pk=1)
    return (rows.select_for_update() if lock else rows).get()


def recompute(buckets: Iterable[datetime]) -> int:
    """Replace the roll-ups of these (closed) buckets from the ledger; the rows written.

    Call inside the state lock (``roll_up`` and ``rebuild`` do): one recompute at a time,
    so two never interleave their DELETE and INSERT.  Sealed buckets (raw rows deleted
    by retention) are skipped: their roll-ups are all that is left of them.
    """
    wanted = sorted(set(buckets))
    sealed_before = state().raw_kept_from
    if sealed_before is not None:
        wanted = [b for b in wanted if b >= sealed_before]
    if not wanted:
        return 0
    rows = [
        UsageRollup(
            bucket_start=datetime.fromtimestamp(group.pop("bucket") * BUCKET_SECONDS, UTC),
            **{name: value or 0 for name, value in group.items() if name in MEASURES},
            **{name: group[name] for name in DIMENSIONS},
        )
        for group in ledger_groups(UsageRecord.objects.filter(_in_buckets(wanted)))
    ]
    # One transaction: readers see the old rows or the new ones, never neither.
    with transaction.atomic():
        UsageRollup.objects.filter(bucket_start__in=wanted).delete()
        UsageRollup.objects.bulk_create(rows, batch_size=500)
    return len(rows)


@dataclass
class RollUpResult:
    buckets: int = 0
    rows: int = 0
    watermark_id: int = 0
    done: bool = True  # False: more dirty buckets than max_buckets; run again


def dirty_buckets(after_id: int, up_to_id: int | None = None) -> dict[datetime, int]:
    """Buckets holding ledger rows with an id above ``after_id``: bucket → lowest such id."""
    records = UsageRecord.objects.filter(pk__gt=after_id)
    if up_to_id is not None:
        records = records.filter(pk__lte=up_to_id)
    return {
        datetime.fromtimestamp(row["bucket"] * BUCKET_SECONDS, UTC): row["first"]
        for row in records.annotate(bucket=BucketIndex())
        .values("bucket")
        .annotate(first=Min("id"))
        .order_by()
    }


def committed_high() -> int:
    """The highest ledger id such that every lower id is committed (or never will be).

    Ids are handed out before commit, so a concurrent insert can commit a lower id after
    a higher one is visible.  On PostgreSQL a SHARE lock on the ledger waits for every
    insert in flight (they hold ROW EXCLUSIVE) and holds new ones back while MAX(id) is
    read: a few milliseconds, once a run, in its own transaction so that the lock goes
    at once (inserts happen in the ledger's writer thread, off any request's path).
    SQLite has one writer at a time: ids commit in order.
    """
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f"LOCK TABLE {UsageRecord._meta.db_table} IN SHARE MODE")
        return UsageRecord.objects.aggregate(high=Max("id"))["high"] or 0


def unrolled_buckets(since: datetime) -> list[datetime]:
    """The buckets from ``since`` on that hold ledger rows (a short, indexed range)."""
    return [
        datetime.fromtimestamp(bucket * BUCKET_SECONDS, UTC)
        for bucket in UsageRecord.objects.filter(created_at__gte=since)
        .annotate(bucket=BucketIndex())
        .values_list("bucket", flat=True)
        .distinct()
        .order_by()
    ]


def raw_buckets(current: UsageRollupState) -> set[datetime]:
    """Buckets whose roll-ups may miss rows: read them from the ledger."""
    found = set(dirty_buckets(current.watermark_id))
    if current.unrolled_from is not None:
        found.update(unrolled_buckets(current.unrolled_from))
    return found


def roll_up(*, max_buckets: int = 96, now: datetime | None = None) -> RollUpResult:
    """Recompute the closed buckets that gained ledger rows since the last run (bounded).

    Idempotent and safe to run from several places at once: the state row's lock
    makes them take turns.  More than ``max_buckets`` dirty buckets take several runs
    (a scan, see ``UsageRollupState``); ``result.done`` says whether this one finished.
    """
    now = now or timezone.now()
    open_bucket = bucket_of(now)
    result = RollUpResult()
    high = committed_high()  # before the state lock: the table lock must not be held long
    with transaction.atomic():
        current = state(lock=True)  # held to the end: one roll-up or retention at a time
        if current.scan_high is None:
            current.scan_high, current.scan_next = high, None
        dirty = dirty_buckets(current.watermark_id, current.scan_high)
        if current.unrolled_from is not None:
            for bucket in unrolled_buckets(current.unrolled_from):
                dirty.setdefault(bucket, current.watermark_id)
        sealed = current.raw_kept_from
        late_sealed = [b for b in dirty if sealed is not None and b < sealed]
        if late_sealed:
            logger.warning(
                "usage rows arrived for %d buckets whose raw rows retention already deleted "
                "(oldest %s); they are not in the roll-ups",
                len(late_sealed),
                min(late_sealed).isoformat(),
            )
        closed = sorted(
            b
            for b in dirty
            if b < open_bucket
            and (sealed is None or b >= sealed)
            and (current.scan_next is None or b >= current.scan_next)
        )
        todo = closed[:max_buckets]
        result.buckets = len(todo)
        result.rows = recompute(todo)
        if len(closed) > max_buckets:
            current.scan_next = closed[max_buckets]
            result.done = False
        else:
            # The scan is complete.  Rows of the open bucket (or later: a skewed clock)
            # are not rolled up yet: ``unrolled_from`` says so until a scan finds it closed.
            current.watermark_id = max(current.watermark_id, current.scan_high)
            current.unrolled_from = min((b for b in dirty if b >= open_bucket), default=None)
            current.scan_high = current.scan_next = None
        current.save(
            update_fields=["watermark_id", "scan_high", "scan_next", "unrolled_from", "updated_at"]
        )
        result.watermark_id = current.watermark_id
    return result


def catch_up(*, max_buckets: int = 96, max_runs: int = 100) -> RollUpResult:
    """Run ``roll_up`` until nothing closed is left to do (or ``max_runs``)."""
    total = RollUpResult()
    for _ in range(max_runs):
        result = roll_up(max_buckets=max_buckets)
        total.buckets += result.buckets
        total.rows += result.rows
        total.watermark_id = result.watermark_id
        total.done = result.done
        if result.done:
            break
    return total


def rebuild(start: datetime, end: datetime) -> int:
    """Recompute every closed bucket in [start, end) (a repair; sealed buckets are kept)."""
    begin, stop = bucket_of(start), bucket_of(end - timedelta(microseconds=1)) + BUCKET
    stop = min(stop, bucket_of(timezone.now()))  # the open bucket is read raw, never rolled up
    rows = 0
    while begin < stop:
        chunk: list[datetime] = []
        while begin < stop and len(chunk) < 96:
            chunk.append(begin)
            begin += BUCKET
        with transaction.atomic():
            state(lock=True)
            rows += recompute(chunk)
    return rows


def apply_retention(
    days: int | None = None,
    *,
    batch: int = 10_000,
    max_batches: int = 100,
    now: datetime | None = None,
) -> int:
    """Delete raw ledger rows older than ``days`` whose buckets are rolled up; rows deleted.

    The cutoff is a bucket boundary.  First the roll-ups catch up (every bucket before
    the cutoff must be rolled up), then the cutoff is recorded as ``raw_kept_from``
    (sealing those buckets: never recomputed from their now partial raw rows), then
    rows go in batches of ``batch`` ids, each its own short transaction.
    """
    days = days if days is not None else settings.SWITCHBOARD_USAGE_RETENTION_DAYS
    if not days:
        return 0
    now = now or timezone.now()
    cutoff = bucket_of(now - timedelta(days=days))
    catch_up()
    with transaction.atomic():
        current = state(lock=True)
        # A bucket before the cutoff still dirty (its rows within the grace period)
        # moves the cutoff back to it: it is rolled up on a later run, then deleted.
        dirty = [b for b in raw_buckets(current) if b < cutoff]
        if current.raw_kept_from is not None:
            dirty = [b for b in dirty if b >= current.raw_kept_from]
        if dirty:
            cutoff = min(dirty)
        if current.raw_kept_from is None or cutoff > current.raw_kept_from:
            current.raw_kept_from = cutoff
            current.save(update_fields=["raw_kept_from", "updated_at"])
        cutoff = current.raw_kept_from
    deleted = 0
    for _ in range(max_batches):
        ids = list(
            UsageRecord.objects.filter(created_at__lt=cutoff)
            .order_by("created_at")
            .values_list("id", flat=True)[:batch]
        )
        if not ids:
            break
        deleted += UsageRecord.objects.filter(pk__in=ids).delete()[0]
    return deleted


# --- Reading ----------------------------------------------------------------------------


@dataclass
class Totals:
    requests: int = 0
    streamed: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost_units: int = 0
    upstream_cost_units: int = 0
    estimated: int = 0
    unpriced: int = 0
    zero_cost: int = 0
    latency_sum_ms: int = 0
    ttft_count: int = 0
    ttft_sum_ms: int = 0
    latency_histogram: list[int] = field(default_factory=lambda: [0] * len(LATENCY_COLUMNS))
    ttft_histogram: list[int] = field(default_factory=lambda: [0] * len(TTFT_COLUMNS))
    by_status: dict[str, int] = field(default_factory=dict)

    def add(self, group: dict[str, Any]) -> None:
        for name in (
            "requests",
            "streamed",
            *SUMS,
            "cost_units",
            "upstream_cost_units",
            "estimated",
            "unpriced",
            "zero_cost",
            "ttft_count",
        ):
            setattr(self, name, getattr(self, name) + (group.get(name) or 0))
        for index, column in enumerate(LATENCY_COLUMNS):
            self.latency_histogram[index] += group.get(column) or 0
        for index, column in enumerate(TTFT_COLUMNS):
            self.ttft_histogram[index] += group.get(column) or 0
        if "status_class" in group:
            status = group["status_class"]
            self.by_status[status] = self.by_status.get(status, 0) + (group.get("requests") or 0)

    @property
    def cost(self) -> Decimal:
        return Decimal(self.cost_units).scaleb(-COST_SCALE)

    @property
    def upstream_cost(self) -> Decimal:
        return Decimal(self.upstream_cost_units).scaleb(-COST_SCALE)

    @property
    def margin(self) -> Decimal:
        return Decimal(self.cost_units - self.upstream_cost_units).scaleb(-COST_SCALE)

    @property
    def errors(self) -> int:
        """Requests that failed (cancelled and interrupted ones are not errors)."""
        return sum(
            count
            for status, count in self.by_status.items()
            if status
            in (StatusClass.RATE_LIMITED, StatusClass.CLIENT_ERROR, StatusClass.UPSTREAM_ERROR)
        )

    def latency_percentile(self, q: float) -> int | None:
        return percentile(self.latency_histogram, LATENCY_BOUNDS_MS, q)

    def ttft_percentile(self, q: float) -> int | None:
        return percentile(self.ttft_histogram, TTFT_BOUNDS_MS, q)


def percentile(histogram: Sequence[int], bounds: Sequence[int], q: float) -> int | None:
    """The upper bound (ms) of the histogram bucket holding the q-quantile; None when empty.

    A quantile in the open-ended top bucket reads as the last bound (``> bound``).
    """
    total = sum(histogram)
    if not total:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank and count:
            return bounds[min(index, len(bounds) - 1)]
    return bounds[-1]


@dataclass
class Period:
    start: datetime  # in the reporting zone
    end: datetime
    group: Any  # the value of ``by`` (None when not grouped)
    totals: Totals


def _period_start(local: datetime, granularity: str) -> datetime:
    if granularity == "15min":
        return local
    if granularity == "hour":
        return local.replace(minute=0)
    day = local.replace(hour=0, minute=0)
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    if granularity == "month":
        return day.replace(day=1)
    raise ValueError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")


def _period_end(start: datetime, granularity: str, zone: ZoneInfo) -> datetime:
    naive = start.replace(tzinfo=None)
    if granularity == "15min":
        return start + BUCKET  # UTC arithmetic: a bucket is always 15 real minutes
    if granularity == "hour":
        return (start.astimezone(UTC) + timedelta(hours=1)).astimezone(zone)
    if granularity == "day":
        following = naive + timedelta(days=1)
    elif granularity == "week":
        following = naive + timedelta(days=7)
    else:
        following = (naive.replace(day=28) + timedelta(days=4)).replace(day=1)
    return following.replace(tzinfo=zone)


def summarize(
    start: datetime,
    end: datetime,
    *,
    zone: str | ZoneInfo = "UTC",
    granularity: str = "day",
    by: str | Sequence[str] | None = None,
    user: int | None = None,
    key: int | None = None,
    model: str | None = None,
    provider: str | None = None,
    route: int | None = None,
    source: str | None = None,
    status_class: str | None = None,
    now: datetime | None = None,
    catch_up_first: bool | None = None,
) -> list[Period]:
    """Usage in [start, end) per period of ``granularity`` in ``zone`` (and per ``by``).

    ``start``/``end`` must lie on 15-minute boundaries (every local midnight and hour
    does).  Filters narrow to one user, key, model...: a member's view passes
    ``user=request.user.pk``.  ``by`` is one of the dimensions (``user_id``, ``key_id``,
    ``model``, ``provider``, ``route_id``, ``source``, ``status_class``), or a tuple of
    them (each period's ``group`` is then the tuple of their values).  Periods with
    no usage are left out.  ``catch_up_first`` (default: in the embedded mode, where no
    beat runs) rolls up dirty closed buckets before reading.
    """
    check_aligned(start, "start")
    check_aligned(end, "end")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    by_fields: tuple[str, ...] = (by,) if isinstance(by, str) else tuple(by or ())
    for name in by_fields:
        if name not in DIMENSIONS:
            raise ValueError(f"by={name!r}: expected one of {', '.join(DIMENSIONS)}")
    tz = zone if isinstance(zone, ZoneInfo) else ZoneInfo(zone)
    now = now or timezone.now()
    if catch_up_first is None:
        catch_up_first = settings.CELERY_TASK_ALWAYS_EAGER
    if catch_up_first:
        roll_up(max_buckets=96 * 7)

    filters = {
        "user_id": user,
        "key_id": key,
        "model": model,
        "provider": provider,
        "route_id": route,
        "source": source,
        "status_class": status_class,
    }
    wanted = {name: value for name, value in filters.items() if value is not None}
    group_on = tuple(dict.fromkeys((*by_fields, "status_class")))

    # Buckets read raw: the open one and the dirty ones (rows not yet rolled up).
    raw = {b for b in raw_buckets(state()) if start <= b < end}
    open_bucket = bucket_of(now)
    if start <= open_bucket < end:
        raw.add(open_bucket)

    groups: list[dict[str, Any]] = []
    rollups = UsageRollup.objects.filter(bucket_start__gte=start, bucket_start__lt=end, **wanted)
    if raw:
        rollups = rollups.exclude(bucket_start__in=raw)
    for row in (
        rollups.values("bucket_start", *group_on)
        .annotate(**{name: Sum(name) for name in MEASURES})
        .order_by()
    ):
        groups.append(row)
    if raw:
        records = (
            UsageRecord.objects.filter(_in_buckets(raw))
            .annotate(source=_source(), status_class=_status_class())
            .filter(**wanted)
        )
        for row in ledger_groups(records, group_on):
            row["bucket_start"] = datetime.fromtimestamp(row.pop("bucket") * BUCKET_SECONDS, UTC)
            groups.append(row)

    periods: dict[tuple[datetime, Any], Period] = {}
    for row in groups:
        local = row["bucket_start"].astimezone(tz)
        if granularity == "total":
            period_start, period_end = start.astimezone(tz), end.astimezone(tz)
        elif granularity in ("15min", "hour"):
            # By UTC arithmetic: right in a repeated DST hour and in +05:45 alike.
            period_start = (
                row["bucket_start"]
                - timedelta(minutes=local.minute % 60 if granularity == "hour" else 0)
            ).astimezone(tz)
        else:
            period_start = _period_start(local, granularity).replace(tzinfo=None).replace(tzinfo=tz)
        if isinstance(by, str):
            group_value = row.get(by)
        elif by_fields:
            group_value = tuple(row.get(name) for name in by_fields)
        else:
            group_value = None
        # Keyed by the UTC instant: the two 01:00 of a DST change are two periods.
        slot = (period_start.astimezone(UTC), group_value)
        if slot not in periods:
            if granularity != "total":
                period_end = _period_end(period_start, granularity, tz)
            periods[slot] = Period(period_start, period_end, group_value, Totals())
        periods[slot].totals.add(row)
    return sorted(periods.values(), key=lambda p: (p.start.astimezone(UTC), str(p.group)))
