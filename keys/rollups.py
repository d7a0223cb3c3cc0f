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
Any zone is exact: 15 minutes divides every zone's UTC offset.  The database sums per
local period (``_rollup_periods``: within a stretch of constant offset a local hour or
day is an integer expression of the bucket), and whole local days come from a coarser
tier, ``UsageRollupDay`` (24-hour windows starting at the zone's midnight, each the
sum of its 96 buckets; written by the roll-up for UTC and ``TIME_ZONE``, on first read
for other zones, and deleted with any recompute that touches them).  A 30-day
dashboard over 10 million records reads some 30,000 day rows instead of 900,000
bucket rows.

Retention (``apply_retention``) deletes raw rows only of rolled-up buckets, and seals
them (``UsageRollupState.raw_kept_from``) so they are never recomputed from nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection, models, transaction
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

from chatapp.connections import on_own_connection
from keys.models import (
    BUCKET_SECONDS,
    COST_SCALE,
    LATENCY_BOUNDS_MS,
    LATENCY_COLUMNS,
    TTFT_BOUNDS_MS,
    TTFT_COLUMNS,
    ApiKey,
    StatusClass,
    UsageRecord,
    UsageRollup,
    UsageRollupState,
    UsageSource,
)

logger = logging.getLogger(__name__)

BUCKET = timedelta(seconds=BUCKET_SECONDS)
DAY = timedelta(days=1)
FILL_DAYS = 62  # day windows one read may write (the first read of a new zone's days)
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


def _measure_field(name: str) -> models.Field[Any, Any]:
    field = UsageRollup._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field.clone()


class UsageRollupDay(models.Model):
    """The roll-ups of one 24-hour window × the same dimensions: a coarser tier for long ranges.

    A window starts at any 15-minute boundary (``day_start``, UTC): each reporting
    zone's local days are their own windows (Shanghai's start at 16:00 UTC,
    Kathmandu's at 18:15).  Rows are the sums of the 15-minute roll-ups of the window,
    written on first read of a closed, clean day (``fill_days``) and deleted with every
    recompute that touches the window, so they are never stale.  Every written window
    has one marker row (``requests=0``, no dimensions) that reads skip: it says the
    window is there (a tiny partial index finds it), usage or not.  Days of 23 or 25 hours (DST
    changes) are never windows: they are read from the 15-minute roll-ups.

    (Kept here, next to the only code that writes and reads it; it belongs with
    ``UsageRollup`` in ``keys.models``.)
    """

    day_start = models.DateTimeField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        related_name="+",
        db_index=False,
    )
    key = models.ForeignKey(
        ApiKey, on_delete=models.SET_NULL, null=True, related_name="+", db_index=False
    )
    model = models.CharField(max_length=128)
    provider = models.CharField(max_length=64, blank=True)
    route_id = models.BigIntegerField(null=True, blank=True)
    source = models.CharField(max_length=8, blank=True)
    status_class = models.CharField(max_length=16, blank=True)
    for _name in (*COUNTS, *SUMS):
        locals()[_name] = _measure_field(_name)
    del _name

    objects: models.Manager[UsageRollupDay] = models.Manager()

    class Meta:
        app_label = "keys"
        indexes = [
            models.Index(fields=["day_start"], name="usage_rollup_day_start"),
            models.Index(fields=["user", "day_start"], name="usage_rollup_day_user"),
            models.Index(
                fields=["day_start"], condition=Q(requests=0), name="usage_rollup_day_written"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.day_start:%Y-%m-%d %H:%M}+24h {self.model} {self.status_class}"


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
    records: QuerySet[UsageRecord],
    dimensions: Sequence[str] = DIMENSIONS,
    measures: Sequence[str] = MEASURES,
) -> QuerySet[Any, dict[str, Any]]:
    """The ledger rows grouped by bucket (an epoch index) and ``dimensions``, with measures."""
    if "status_class" not in records.query.annotations:
        records = records.annotate(source=_source(), status_class=_status_class())
    wanted = {name: value for name, value in _ledger_measures().items() if name in measures}
    return (
        records.annotate(bucket=BucketIndex())
        .values("bucket", *dimensions)
        .annotate(**wanted)  # in _ledger_measures' order (see there)
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
    # One INSERT ... SELECT: the ledger's GROUP BY goes straight into the roll-ups,
    # no row passes through Python (set-based: a catch-up of millions of rows is a few
    # statements, not a Python object per roll-up row).
    groups = ledger_groups(UsageRecord.objects.filter(_in_buckets(wanted)))
    sql, params = groups.query.sql_with_params()
    bucket = (
        f"to_timestamp(g.bucket * {BUCKET_SECONDS})"
        if connection.vendor == "postgresql"
        else f"datetime(g.bucket * {BUCKET_SECONDS}, 'unixepoch')"  # Django's SQLite text
    )
    qn = connection.ops.quote_name
    columns = ", ".join(qn(name) for name in ("bucket_start", *DIMENSIONS, *MEASURES))
    selected = ", ".join(
        [bucket, *(f"g.{qn(name)}" for name in DIMENSIONS)]
        + [f"COALESCE(g.{qn(name)}, 0)" for name in MEASURES]
    )
    # One transaction: readers see the old rows or the new ones, never neither.
    with transaction.atomic(), connection.cursor() as cursor:
        _reporting_memory()  # a week of buckets groups a few hundred thousand rows
        UsageRollup.objects.filter(bucket_start__in=wanted).delete()
        for low, high in _ranges(wanted):  # the day windows these buckets are in
            UsageRollupDay.objects.filter(day_start__gt=low - DAY, day_start__lt=high).delete()
        cursor.execute(
            f"INSERT INTO {qn(UsageRollup._meta.db_table)} ({columns}) "
            f"SELECT {selected} FROM ({sql}) g",
            params,
        )
        written = cursor.rowcount
    return written


@dataclass
class RollUpResult:
    buckets: int = 0
    rows: int = 0
    watermark_id: int = 0
    done: bool = True  # False: more dirty buckets than max_buckets; run again


def dirty_buckets(
    after_id: int, up_to_id: int | None = None, since: datetime | None = None
) -> dict[datetime, int]:
    """Buckets holding ledger rows with an id above ``after_id``: bucket → lowest such id.

    ``since``: only buckets from there on (a scan's later runs skip what it has done).
    """
    records = UsageRecord.objects.filter(pk__gt=after_id)
    if up_to_id is not None:
        records = records.filter(pk__lte=up_to_id)
    if since is not None:
        records = records.filter(created_at__gte=since)
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
        fields = ("watermark_id", "scan_high", "scan_next", "unrolled_from")
        before = [getattr(current, name) for name in fields]
        if current.scan_high is None:
            current.scan_high, current.scan_next = high, None
        dirty = dirty_buckets(current.watermark_id, current.scan_high, current.scan_next)
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
        if [getattr(current, name) for name in fields] != before or result.buckets:
            # (Nothing new: no write, no commit to wait for; reads roll up this way often.)
            current.save(update_fields=[*fields, "updated_at"])
        result.watermark_id = current.watermark_id
    _prefill_days(todo, open_bucket)
    keep_statistics(high)
    return result


STATISTICS_FROM = 10_000  # ledger rows before SQLite's planner needs statistics
_analyzed_high = 0  # the ledger's highest id at this process's last ANALYZE


def keep_statistics(high: int) -> bool:
    """On SQLite, give the query planner statistics of the ledger, and again each time
    it has doubled since (PostgreSQL's autovacuum keeps its own).

    The ledger's reads choose between its indexes by them (a time range by
    ``created_at`` against a user's, key's or model's rows by id): without them
    SQLite takes the model's index for the last minutes of one model and reads all
    of that model's rows.  A sampled ANALYZE (``analysis_limit``) misjudges how many
    rows a model has; a full one takes about 0.4 s per million rows, once per
    process start and doubling.  ``high``: the ledger's highest id (``committed_high``,
    which the roll-up has just read).  Returns whether it ran.
    """
    global _analyzed_high
    if connection.vendor != "sqlite":
        return False
    if high < max(STATISTICS_FROM, 2 * _analyzed_high):
        return False
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {UsageRecord._meta.db_table}")
    _analyzed_high = high
    return True


def _prefill_days(buckets: Sequence[datetime], open_bucket: datetime) -> None:
    """Write the day windows that these recomputed buckets completed, for UTC and
    ``TIME_ZONE`` days: the default zone's dashboards never wait for them.  (Other
    zones' windows are written on their first read.)
    """
    if not buckets:
        return
    low = bucket_of(min(buckets) - DAY)
    high = min(bucket_of(max(buckets) + DAY), open_bucket)
    days: set[datetime] = set()
    for name in {"UTC", settings.TIME_ZONE}:
        days.update(_whole_days(low, high, ZoneInfo(name), open_bucket, ()))
    fill_days(sorted(days), limit=len(days))


def catch_up(*, max_buckets: int = 96 * 7, max_runs: int = 100) -> RollUpResult:
    """Run ``roll_up`` until nothing closed is left to do (or ``max_runs``).

    A week of buckets a run: each run of a scan reads the ledger rows above the
    watermark to find its dirty buckets, so fewer, larger runs catch up a large
    backlog faster (10M rows: 30 runs of a day spent most of their time there).
    """
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


_SCALARS = frozenset(
    (
        "requests",
        "streamed",
        *SUMS,
        "cost_units",
        "upstream_cost_units",
        "estimated",
        "unpriced",
        "zero_cost",
        "ttft_count",
    )
)
_LATENCY_INDEX = {column: index for index, column in enumerate(LATENCY_COLUMNS)}
_TTFT_INDEX = {column: index for index, column in enumerate(TTFT_COLUMNS)}


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
        # Only the columns the row has (a read may sum a few measures): a dashboard
        # adds thousands of rows, so the loop is over the row, not over every measure.
        for name, value in group.items():
            if not value:
                continue
            if name in _SCALARS:
                setattr(self, name, getattr(self, name) + value)
            elif name in _LATENCY_INDEX:
                self.latency_histogram[_LATENCY_INDEX[name]] += value
            elif name in _TTFT_INDEX:
                self.ttft_histogram[_TTFT_INDEX[name]] += value
        if "status_class" in group:
            status = group["status_class"]
            self.by_status[status] = self.by_status.get(status, 0) + (group.get("requests") or 0)

    def add_totals(self, other: Totals) -> None:
        for name in ("requests", "streamed", *SUMS, "cost_units", "upstream_cost_units"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("estimated", "unpriced", "zero_cost", "ttft_count"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for index, count in enumerate(other.latency_histogram):
            self.latency_histogram[index] += count
        for index, count in enumerate(other.ttft_histogram):
            self.ttft_histogram[index] += count
        for status, count in other.by_status.items():
            self.by_status[status] = self.by_status.get(status, 0) + count

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
        # UTC arithmetic: a bucket is always 15 real minutes (aware + is wall-clock).
        return (start.astimezone(UTC) + BUCKET).astimezone(zone)
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
    measures: Sequence[str] | None = None,
    by_status: bool = True,
) -> list[Period]:
    """Usage in [start, end) per period of ``granularity`` in ``zone`` (and per ``by``).

    ``start``/``end`` must lie on 15-minute boundaries (every local midnight and hour
    does).  Filters narrow to one user, key, model...: a member's view passes
    ``user=request.user.pk``.  ``by`` is one of the dimensions (``user_id``, ``key_id``,
    ``model``, ``provider``, ``route_id``, ``source``, ``status_class``), or a tuple of
    them (each period's ``group`` is then the tuple of their values).  Periods with
    no usage are left out.  ``measures`` (default: all of ``MEASURES``) names the sums a
    caller reads: the others stay 0, and a narrower read is faster.  ``by_status=False``
    leaves the status classes out (``Totals.by_status`` stays empty; fewer rows).  ``catch_up_first`` (default: in the embedded mode, where no
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
    summed = tuple(measures) if measures is not None else MEASURES
    for name in summed:
        if name not in MEASURES:
            raise ValueError(f"measure {name!r}: expected some of {', '.join(MEASURES)}")
    now = now or timezone.now()
    if catch_up_first is not False:
        catch_up_for_reading(force=catch_up_first is True)

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
    group_on = tuple(dict.fromkeys((*by_fields, *(("status_class",) if by_status else ()))))
    if not group_on:
        raise ValueError("by_status=False needs a by")

    # The reads in one transaction: one snapshot of roll-ups and ledger, and (on
    # PostgreSQL) memory enough to group in it.
    with transaction.atomic():
        _reporting_memory()
        # Buckets read raw: the open one and the dirty ones (rows not yet rolled up).
        raw = {b for b in raw_buckets(state()) if start <= b < end}
        open_bucket = bucket_of(now)
        if start <= open_bucket < end:
            raw.add(open_bucket)

        # The roll-ups are summed per period in SQL (one row per period and group, not per
        # bucket): see ``_rollup_periods``.  The raw buckets are few (the open one and any
        # not rolled up yet): grouped per bucket, then placed in their periods here.
        periods: dict[tuple[datetime, Any], Period] = {}
        # A few periods, thousands of rows.  Keyed with the fold: the two 01:00 of a DST
        # change compare (and hash) equal in their zone.
        utc_of: dict[tuple[datetime, int], datetime] = {}
        end_of: dict[datetime, datetime] = {}  # per period, whatever the group

        def add(period_start: datetime, row: dict[str, Any]) -> None:
            if isinstance(by, str):
                group_value = row.get(by)
            elif by_fields:
                group_value = tuple(row.get(name) for name in by_fields)
            else:
                group_value = None
            # Keyed by the UTC instant: the two 01:00 of a DST change are two periods.
            utc = utc_of.get((period_start, period_start.fold))
            if utc is None:
                utc = utc_of[(period_start, period_start.fold)] = period_start.astimezone(UTC)
            slot = (utc, group_value)
            found = periods.get(slot)
            if found is None:
                period_end = end_of.get(utc)
                if period_end is None:
                    if granularity == "total":
                        period_end = end.astimezone(tz)
                    else:
                        period_end = _period_end(period_start, granularity, tz)
                    end_of[utc] = period_end
                found = periods[slot] = Period(period_start, period_end, group_value, Totals())
            found.totals.add(row)

        # Whole local days, closed and clean, come from the day windows; the rest of the
        # range (its ends, DST days, days with raw buckets) from the 15-minute roll-ups.
        days: list[datetime] = []
        if granularity in ("day", "week", "month", "total"):
            days = fill_days(_whole_days(start, end, tz, min(open_bucket, end), raw))
            day_periods: dict[datetime, datetime] = {}
            for row in _day_rows(days, group_on, wanted, summed, by_day=granularity != "total"):
                day_start = row.pop("day_start", start)
                if day_start not in day_periods:
                    day_periods[day_start] = _period_of(day_start, start, tz, granularity)
                add(day_periods[day_start], row)
        rollups = UsageRollup.objects.filter(**wanted)
        if raw:
            rollups = rollups.exclude(_bucket_ranges("bucket_start", raw))
        rest = _without(start, end, [(day, day + DAY) for day in days])
        for period_start, row in _rollup_periods(
            rollups, rest, start, tz, granularity, group_on, summed
        ):
            add(period_start, row)
        if raw:
            records = (
                UsageRecord.objects.filter(_in_buckets(raw))
                .annotate(source=_source(), status_class=_status_class())
                .filter(**wanted)
            )
            for row in ledger_groups(records, group_on, summed):
                bucket_start = datetime.fromtimestamp(row.pop("bucket") * BUCKET_SECONDS, UTC)
                add(_period_of(bucket_start, start, tz, granularity), row)
        return sorted(periods.values(), key=lambda p: (p.start.astimezone(UTC), str(p.group)))


def catch_up_for_reading(*, force: bool = False) -> None:
    """In the embedded mode (no Celery beat), roll up what is new before a read.

    A bounded catch-up (a week of buckets): with a beat running this is its job.
    """
    if force or settings.CELERY_TASK_ALWAYS_EAGER:
        roll_up(max_buckets=96 * 7)


# Threads for the reads run beside a request's own (read_together): at most this many
# extra database connections at a time in the process, whatever the traffic.
PARALLEL_READS = 4
# Made here, once (its threads start with the first read): no two requests race to make it.
_readers = ThreadPoolExecutor(PARALLEL_READS, thread_name_prefix="usage-read")


def read_together(*reads: Callable[[], Any]) -> list[Any]:
    """Call every read and return their results in order; side by side on PostgreSQL.

    A dashboard makes a few independent summarize() reads, each a transaction of its
    own: on PostgreSQL the database sums them on every core at once when each has a
    connection of its own (from the pool; ``PARALLEL_READS`` threads at most), and the
    rows of one are turned into periods while the database sums the next.  Inside a
    transaction (whose snapshot and uncommitted rows other connections do not share)
    and on SQLite they run one after another, here.
    """
    if len(reads) < 2 or connection.vendor != "postgresql" or connection.in_atomic_block:
        return [read() for read in reads]
    futures = [_readers.submit(on_own_connection, read) for read in reads[1:]]
    first = reads[0]()
    return [first, *(future.result() for future in futures)]


REPORTING_WORK_MEM = "64MB"


def _reporting_memory() -> None:
    """Let this transaction's GROUP BYs hash in memory (PostgreSQL; reads and recomputes).

    A 24-hour read groups some 30,000 roll-up rows of 10 million records; with the
    default 4 MB ``work_mem`` PostgreSQL sorts them on disk instead (measured: 80 ms
    against 25 ms).  SET LOCAL ends with the transaction.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"SET LOCAL work_mem = '{REPORTING_WORK_MEM}'")


def regroup(periods: Iterable[Period], index: int) -> list[Period]:
    """Periods read ``by`` a tuple of dimensions, summed by the ``index``-th of them.

    One read by (model, key_id, user_id) gives the by-model, by-key and by-user
    figures alike: each equals ``summarize`` by that one dimension.
    """
    merged: dict[tuple[datetime, Any], Period] = {}
    for period in periods:
        group = period.group[index]
        slot = (period.start.astimezone(UTC), group)
        found = merged.get(slot)
        if found is None:
            found = merged[slot] = Period(period.start, period.end, group, Totals())
        found.totals.add_totals(period.totals)
    return sorted(merged.values(), key=lambda p: (p.start.astimezone(UTC), str(p.group)))


def _period_of(bucket_start: datetime, start: datetime, tz: ZoneInfo, granularity: str) -> datetime:
    """The start (in ``tz``) of the period holding a bucket."""
    local = bucket_start.astimezone(tz)
    if granularity == "total":
        return start.astimezone(tz)
    if granularity in ("15min", "hour"):
        # By UTC arithmetic: right in a repeated DST hour and in +05:45 alike.
        minutes = local.minute % 60 if granularity == "hour" else 0
        return (bucket_start - timedelta(minutes=minutes)).astimezone(tz)
    return _period_start(local, granularity).replace(tzinfo=None).replace(tzinfo=tz)


def _bucket_ranges(column: str, buckets: Iterable[datetime]) -> Q:
    """``column`` within the given buckets, as ranges of consecutive buckets."""
    q = Q(pk__in=[])
    for low, high in _ranges(buckets):
        q |= Q(**{f"{column}__gte": low, f"{column}__lt": high})
    return q


def _ranges(buckets: Iterable[datetime]) -> list[tuple[datetime, datetime]]:
    ranges: list[list[datetime]] = []
    for start in sorted(set(buckets)):
        if ranges and ranges[-1][1] == start:
            ranges[-1][1] = start + BUCKET
        else:
            ranges.append([start, start + BUCKET])
    return [(low, high) for low, high in ranges]


def offset_segments(
    start: datetime, end: datetime, tz: ZoneInfo
) -> list[tuple[datetime, datetime, int]]:
    """[start, end) cut where ``tz``'s UTC offset changes: (from, to, offset in seconds).

    A bucket belongs to the offset its start has (as ``_period_of`` reads it).  Offsets
    are probed a day apart and a change is narrowed to its bucket by bisection (zones
    change offset at most a few times a year).
    """

    def offset(moment: datetime) -> int:
        delta = moment.astimezone(tz).utcoffset()
        return int(delta.total_seconds()) if delta is not None else 0

    segments: list[tuple[datetime, datetime, int]] = []
    low, current = start, offset(start)
    probe = start
    while probe < end:
        following = min(probe + timedelta(days=1), end - BUCKET)
        if following <= probe:
            break
        if offset(following) != current:
            lo, hi = probe, following  # offset(lo) == current != offset(hi)
            while hi - lo > BUCKET:
                mid = lo + BUCKET * ((hi - lo) // BUCKET // 2)
                if offset(mid) == current:
                    lo = mid
                else:
                    hi = mid
            segments.append((low, hi, current))
            low, current = hi, offset(hi)
            probe = hi
        else:
            probe = following
    segments.append((low, end, current))
    return segments


class PeriodIndex(Func):
    """A roll-up's local period as an integer: (UTC epoch seconds + offset) // seconds."""

    output_field = BigIntegerField()

    def __init__(self, offset: int, seconds: int) -> None:
        super().__init__(F("bucket_start"))
        self.offset, self.seconds = offset, seconds

    def as_sql(  # PostgreSQL and SQLite only (as_postgresql, as_sqlite)
        self,
        compiler: Any,
        connection: Any,
        function: Any = None,
        template: Any = None,
        arg_joiner: Any = None,
        **extra_context: Any,
    ) -> Any:
        raise NotImplementedError(f"PeriodIndex on {connection.vendor}")

    def as_postgresql(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return super().as_sql(
            compiler,
            connection,
            template=(
                # Integer arithmetic (EXTRACT gives numeric, slow per row): a bucket start
                # is a whole second, and epoch + offset is positive, so / floors.
                f"((EXTRACT(EPOCH FROM %(expressions)s))::bigint + {self.offset:d})"
                f" / {self.seconds:d}"
            ),
            **extra,
        )

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        # Every offset is above -86400 and every epoch here is positive: integer
        # division of a positive number floors.
        return super().as_sql(
            compiler,
            connection,
            template=(
                f"((CAST(strftime('%%%%s', %(expressions)s) AS INTEGER) + {self.offset:d})"
                f" / {self.seconds:d})"
            ),
            **extra,
        )


_PERIOD_SECONDS = {
    "15min": BUCKET_SECONDS,
    "hour": 3600,
    "day": 86400,
    "week": 86400,
    "month": 86400,
}


def _rollup_periods(
    rollups: QuerySet[UsageRollup],
    intervals: Sequence[tuple[datetime, datetime]],
    start: datetime,
    tz: ZoneInfo,
    granularity: str,
    group_on: Sequence[str],
    summed: Sequence[str] = MEASURES,
) -> Iterable[tuple[datetime, dict[str, Any]]]:
    """The 15-minute roll-ups in ``intervals`` summed per (local period, group) in SQL.

    Within a stretch of constant UTC offset O a bucket's local 15 minutes, hour or day
    is (epoch + O) // 900, 3600 or 86400: the GROUP BY is on that integer.  Weeks and
    months are summed from days (a few hundred rows at most).  A day cut by a DST
    change comes from two stretches: its two parts land in the same period.
    """
    if not intervals:
        return
    sums = {name: Sum(name) for name in summed}
    if granularity == "total":
        within = Q(pk__in=[])
        for low, high in intervals:
            within |= Q(bucket_start__gte=low, bucket_start__lt=high)
        period_start = start.astimezone(tz)
        for row in _rows(rollups.filter(within).values(*group_on).annotate(**sums).order_by()):
            yield period_start, row
        return
    seconds = _PERIOD_SECONDS[granularity]
    for interval_start, interval_end in intervals:
        for low, high, offset in offset_segments(interval_start, interval_end, tz):
            rows = (
                rollups.filter(bucket_start__gte=low, bucket_start__lt=high)
                .annotate(period=PeriodIndex(offset, seconds))
                .values("period", *group_on)
                .annotate(**sums)
                .order_by()
            )
            for row in _rows(rows):
                index = row.pop("period")
                if seconds < 86400:
                    yield datetime.fromtimestamp(index * seconds - offset, UTC).astimezone(tz), row
                else:
                    day = datetime(1970, 1, 1) + timedelta(days=index)  # noqa: DTZ001 - wall time
                    yield _period_start(day, granularity).replace(tzinfo=tz), row


def _rows(queryset: QuerySet[Any, dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """A values() query's rows straight from the cursor.

    Django's per-value converters cost more than the query itself on a dashboard
    (thousands of rows × dozens of sums).  Here: PostgreSQL's SUM of a bigint column
    is numeric (back to int), and SQLite's datetimes are text (``day_start``, parsed).
    """
    sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        names = [column[0] for column in cursor.description]
        found = cursor.fetchall()
    for values in found:
        row = {
            name: int(value) if type(value) is Decimal else value
            for name, value in zip(names, values, strict=True)
        }
        day_start = row.get("day_start")
        if isinstance(day_start, str):
            row["day_start"] = datetime.fromisoformat(day_start).replace(tzinfo=UTC)
        yield row


def _without(
    start: datetime, end: datetime, holes: Sequence[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    """[start, end) less the (sorted, disjoint) ``holes``, as intervals."""
    left: list[tuple[datetime, datetime]] = []
    cursor = start
    for low, high in holes:
        if low > cursor:
            left.append((cursor, low))
        cursor = max(cursor, high)
    if cursor < end:
        left.append((cursor, end))
    return left


# --- The day windows ----------------------------------------------------------------------


def _whole_days(
    start: datetime, end: datetime, tz: ZoneInfo, closed_before: datetime, raw: Iterable[datetime]
) -> list[datetime]:
    """The UTC starts of the local days of ``tz`` that lie in [start, closed_before), last
    exactly 24 hours and hold no raw bucket: the days a day window can answer for.
    """
    raw_sorted = sorted(raw)
    local = start.astimezone(tz)
    day = datetime(local.year, local.month, local.day, tzinfo=tz)
    if day < start:
        day = _period_end(day, "day", tz)
    found = []
    while True:
        following = _period_end(day, "day", tz)
        if following > closed_before:
            break
        begin = day.astimezone(UTC)
        if (
            following.astimezone(UTC) - begin == DAY  # (aware - aware in one zone is wall-clock)
            and not begin.timestamp() % BUCKET_SECONDS
            and not any(begin <= bucket < begin + DAY for bucket in raw_sorted)
        ):
            found.append(begin)
        day = following
    return found


def _day_rows(
    days: Sequence[datetime],
    group_on: Sequence[str],
    wanted: dict[str, Any],
    summed: Sequence[str],
    *,
    by_day: bool,
) -> Iterable[dict[str, Any]]:
    if not days:
        return []
    rows = UsageRollupDay.objects.filter(day_start__in=days, **wanted).exclude(requests=0)
    return _rows(
        rows.values(*(("day_start",) if by_day else ()), *group_on)
        .annotate(**{name: Sum(name) for name in summed})
        .order_by()
    )


def fill_days(days: Sequence[datetime], *, limit: int = FILL_DAYS) -> list[datetime]:
    """Of these day windows (closed, clean), those ready to read: written now if missing.

    A missing window is the sum of its 15-minute roll-ups, one INSERT ... SELECT per
    start time of day (a zone's days share it), at most ``limit`` windows a call (the
    rest are read from the 15-minute roll-ups this time).  Written under the state
    lock: a recompute (which deletes the windows it touches) cannot interleave with the
    sums being taken, and two readers cannot write the same window twice.
    """
    if not days:
        return []
    present = _written(days)
    missing = [day for day in days if day not in present][:limit]
    if missing:
        with transaction.atomic():
            current = state(lock=True)
            present.update(_written(missing))
            dirty = sorted(raw_buckets(current))
            todo = [
                day
                for day in missing
                if day not in present and not any(day <= b < day + DAY for b in dirty)
            ]
            _write_days(todo)
            present.update(todo)
    return [day for day in days if day in present]


def _write_days(days: Sequence[datetime]) -> None:
    by_shift: dict[int, list[datetime]] = {}
    for day in days:
        by_shift.setdefault(int(day.timestamp()) % 86400, []).append(day)
    qn = connection.ops.quote_name
    columns = ", ".join(qn(name) for name in ("day_start", *DIMENSIONS, *MEASURES))
    for shift, starts in by_shift.items():
        within = Q(pk__in=[])
        for low, high in _ranges(
            [start + BUCKET * n for start in starts for n in range(DAY // BUCKET)]
        ):
            within |= Q(bucket_start__gte=low, bucket_start__lt=high)
        groups = (
            UsageRollup.objects.filter(within)
            .annotate(day=PeriodIndex(-shift, 86400))
            .values("day", *DIMENSIONS)
            .annotate(**{name: Sum(name) for name in MEASURES})
            .order_by()
        )
        sql, params = groups.query.sql_with_params()
        day_start = (
            f"to_timestamp(g.day * 86400 + {shift:d})"
            if connection.vendor == "postgresql"
            else f"datetime(g.day * 86400 + {shift:d}, 'unixepoch')"
        )
        selected = ", ".join(
            [day_start, *(f"g.{qn(name)}" for name in DIMENSIONS)]
            + [f"COALESCE(g.{qn(name)}, 0)" for name in MEASURES]
        )
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {qn(UsageRollupDay._meta.db_table)} ({columns}) "
                f"SELECT {selected} FROM ({sql}) g",
                params,
            )
    UsageRollupDay.objects.bulk_create(UsageRollupDay(day_start=day, requests=0) for day in days)


def _written(days: Sequence[datetime]) -> set[datetime]:
    """The day windows written (their markers), of these."""
    return set(
        UsageRollupDay.objects.filter(day_start__in=days, requests=0).values_list(
            "day_start", flat=True
        )
    )
