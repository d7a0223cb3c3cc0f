"""``manage.py usage demo|rollup|retention``: synthetic usage, roll-up catch-up, retention.

- ``usage demo --records N [--days D] [--seed S] [--force]``: fill the ledger with realistic
  synthetic usage (COPY on PostgreSQL, batched inserts on SQLite), then roll it up.
  Refuses a database that already holds real usage unless ``--force``.
- ``usage rollup [--rebuild --since T --until T]``: catch the roll-ups up now, or
  recompute a range (a repair).
- ``usage retention [--days D]``: delete old raw records now (default: the setting).
"""

from __future__ import annotations

import itertools
import math
import random
import struct
import time
import uuid
from argparse import ArgumentParser
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.utils import timezone

from accounts.models import User
from keys import rollups
from keys.models import ApiKey, ModelPrice, UsageRecord

# PostgreSQL's binary COPY: its header (signature, no flags, no extension), a NULL
# field, the end; its time origin; the type OIDs the demo's columns need.
BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
BINARY_TRAILER = struct.pack(">h", -1)
NULL_FIELD = struct.pack(">i", -1)
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
INT4_OID, INT8_OID, NUMERIC_OID = 23, 20, 1700
DEMO_PREFIX = "demo-"
MAX_RECORDS = 10**9 - 1  # a request id numbers its record in nine digits
DEMO_DOMAIN = "demo.switchboard.invalid"
COLUMNS = (
    "created_at",
    "request_id",
    "user_id",
    "key_id",
    "endpoint",
    "dialect",
    "model",
    "provider",
    "route_id",
    "upstream_model",
    "stream",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "estimated",
    "status",
    "http_status",
    "error_type",
    "error_message",
    "attempts",
    "input_price",
    "output_price",
    "cached_input_price",
    "cost",
    "currency",
    "priced",
    "upstream_cost",
    "latency_ms",
    "ttft_ms",
)
# Hourly weights (UTC+8 office hours, a lighter evening) and weekday weights (Mon..Sun).
HOURS = [1, 1, 1, 1, 1, 1, 2, 4, 8, 12, 14, 13, 9, 12, 14, 14, 12, 9, 6, 5, 4, 3, 2, 1]
WEEKDAYS = [10, 10, 10, 10, 9, 4, 3]
OUTCOMES = [
    # status, http status, error type, weight
    ("ok", 200, "", 9300),
    ("error", 429, "rate_limited", 250),
    ("error", 400, "invalid_request", 80),
    ("error", 502, "upstream_error", 120),
    ("error", 504, "upstream_timeout", 50),
    ("client_disconnected", 200, "", 120),
    ("stopped", 200, "", 70),
    ("interrupted", 200, "", 10),
]
BUILT_IN = [
    # model, provider, upstream model, input / output / cached per 1M tokens, weight
    ("gpt-4o", "openai", "gpt-4o-2024-08-06", "2.5", "10", "1.25", 30),
    ("gpt-4o-mini", "openai", "gpt-4o-mini", "0.15", "0.6", "0.075", 35),
    ("claude-sonnet", "anthropic", "claude-sonnet-4", "3", "15", "0.3", 20),
    ("qwen-local", "vllm", "Qwen2.5-7B-Instruct", "0", "0", "0", 10),
    ("text-embedding-3-small", "openai", "text-embedding-3-small", "0.02", "0", "0", 5),
]


@dataclass
class Offer:
    model: str
    provider: str
    route_id: int | None
    upstream: str
    prices: tuple[Decimal, Decimal, Decimal]
    per_token: tuple[int, int, int]  # price per token in 10**-12 units
    texts: tuple[str, str, str]
    weight: int


def _offers() -> list[Offer]:
    """The catalog's routes and prices when there are any, else a built-in catalog."""
    from chatapp.models import Route

    found: list[tuple[str, str, int | None, str, tuple[Decimal, Decimal, Decimal], int]] = []
    for route in Route.objects.select_related("model", "provider").order_by("id")[:20]:
        price = ModelPrice.objects.filter(model=route.model).order_by("-effective_from").first()
        values = (
            (
                price.input_per_mtok,
                price.output_per_mtok,
                price.cached_input_per_mtok
                if price.cached_input_per_mtok is not None
                else price.input_per_mtok,
            )
            if price
            else (Decimal(1), Decimal(3), Decimal("0.5"))
        )
        found.append(
            (route.model.name, route.provider.name, route.id, route.upstream_model, values, 10)
        )
    if not found:
        found = [
            (m, p, None, u, (Decimal(i), Decimal(o), Decimal(c)), w)
            for m, p, u, i, o, c, w in BUILT_IN
        ]
    return [
        Offer(
            model,
            provider,
            route_id,
            upstream,
            values,
            tuple(int(v * 10**6) for v in values),  # type: ignore[arg-type]
            tuple(f"{v:.12f}" for v in values),  # type: ignore[arg-type]
            weight,
        )
        for model, provider, route_id, upstream, values, weight in found
    ]


def _demo_cast(people: int) -> list[tuple[int, list[tuple[int, bool]]]]:
    """Demo users (email @demo.switchboard.invalid) with two API keys and a web key each."""
    cast = []
    for n in range(people):
        user, _created = User.objects.get_or_create(
            email=f"demo{n + 1}@{DEMO_DOMAIN}", defaults={"is_active": True}
        )
        keys = list(ApiKey.objects.filter(user=user).values_list("id", "is_web_key"))
        if not keys:
            ApiKey.issue(user=user, name="demo app")
            ApiKey.issue(user=user, name="demo notebook")
            ApiKey.issue(user=user, name="chat", is_web_key=True)
            keys = list(ApiKey.objects.filter(user=user).values_list("id", "is_web_key"))
        cast.append((user.pk, keys))
    return cast


def generate(count: int, *, days: int, seed: int, end: datetime, people: int = 12) -> DemoRows:
    """The demo rows to load (lazily).

    The queries (catalog, demo users) run now: none may run while the COPY holds the
    connection.
    """
    return DemoRows(count, days=days, seed=seed, end=end, offers=_offers(), cast=_demo_cast(people))


def _tail(rng: random.Random, offer: Offer, browser: bool) -> tuple[Any, ...]:
    """One request's columns after the key (COLUMNS[4:]): tokens, outcome, cost, latency."""
    random_, lognorm = rng.random, rng.lognormvariate
    status, http, error_type, _weight = rng.choices(OUTCOMES, [o[3] for o in OUTCOMES])[0]
    embedding = offer.model.startswith("text-embedding")
    stream = not embedding and (browser or random_() < 0.6)
    input_tokens = int(lognorm(6.5, 1.1)) + 1
    cached = int(input_tokens * random_() * 0.8) if random_() < 0.3 else 0
    if embedding or status == "error":
        output = 0
    else:
        output = int(lognorm(5.3, 0.9)) + 1
        if status != "ok":
            output = int(output * random_())
    if status == "error" and http in (400, 429):
        input_tokens = cached = 0
    latency = int(lognorm(6.8, 0.8) + output * (8 + 10 * random_())) + 5
    ttft = int(lognorm(5.8, 0.7)) + 20 if stream and output else None
    p_in, p_out, p_cached = offer.per_token
    units = (input_tokens - cached) * p_in + output * p_out + cached * p_cached
    upstream_units = units * 7 // 10  # what the provider charges us: a 30 % margin
    return (
        "browser" if browser else ("embeddings" if embedding else "chat.completions"),
        "browser" if browser else ("anthropic" if random_() < 0.3 else "openai"),
        offer.model,
        offer.provider,
        offer.route_id,
        offer.upstream,
        stream,
        input_tokens,
        output,
        cached,
        False,
        status,
        http,
        error_type,
        "",
        0 if http in (400, 429) else 1 + (random_() < 0.05),
        *offer.texts,
        f"{units // 10**12}.{units % 10**12:012d}",
        settings.SWITCHBOARD_CURRENCY,
        any(offer.per_token),
        f"{upstream_units // 10**12}.{upstream_units % 10**12:012d}",
        latency,
        ttft,
    )


class DemoRows:
    """Synthetic ledger rows in time order, generated fast enough to feed a COPY.

    Per-row Python work is what limits a bulk load, so the expensive part of a row (its
    tokens, outcome, cost and latencies: ``_tail``) is drawn from pools of
    ``POOL`` pre-built tails per source (API keys, web keys), each drawn from the full
    distributions; a row is then a time, an id, a (user, key) and a pool index.  Hours
    get records by the weekly rhythm (Shanghai office hours, quiet weekends); within an
    hour they are spread evenly with jitter, so ids follow time as in a real ledger.
    """

    POOL = 20_000

    def __init__(
        self,
        count: int,
        *,
        days: int,
        seed: int,
        end: datetime,
        offers: list[Offer],
        cast: list[tuple[int, list[tuple[int, bool]]]],
    ) -> None:
        self.count, self.end, self.start = count, end, end - timedelta(days=days)
        self.rng = rng = random.Random(seed)
        # Request ids differ per run (a second load adds to the first); the data is the seed's.
        self.run = f"{DEMO_PREFIX}{uuid.uuid4().hex[:10]}-"
        size = min(count, self.POOL)
        weights = [o.weight for o in offers]
        self.tails = {
            browser: [_tail(rng, offer, browser) for offer in rng.choices(offers, weights, k=size)]
            for browser in (False, True)
        }
        # A few heavy users and a long tail; a user's usage split over their keys.
        self.keys: list[tuple[int, int, bool]] = []
        key_weights: list[float] = []
        for n, (user_id, keys) in enumerate(cast):
            for key_id, is_web in keys:
                self.keys.append((user_id, key_id, is_web))
                key_weights.append(1 / (n + 1) / len(keys))
        self.cum_weights = list(itertools.accumulate(key_weights))

    def hours(self) -> list[tuple[datetime, datetime, int]]:
        """(window start, window end, records) per hour of the range, by the weekly rhythm."""
        windows, weights = [], []
        hour = self.start.replace(minute=0, second=0, microsecond=0)
        while hour < self.end:
            low, high = max(hour, self.start), min(hour + timedelta(hours=1), self.end)
            local = hour + timedelta(hours=8)
            windows.append((low, high))
            weights.append(
                HOURS[local.hour] * WEEKDAYS[local.weekday()] * (high - low).total_seconds()
            )
            hour += timedelta(hours=1)
        total = sum(weights)
        expected = [self.count * w / total for w in weights]
        counts = [int(e) for e in expected]
        short = self.count - sum(counts)
        for index in self.rng.choices(
            range(len(counts)), [e - c for e, c in zip(expected, counts, strict=True)], k=short
        ):
            counts[index] += 1
        return [(low, high, n) for (low, high), n in zip(windows, counts, strict=True) if n]

    def chunks(self, *, binary: bool = False) -> Any:
        """Per hour: (times, record numbers, (user, key, is_web), tail numbers).

        Times are Django's SQLite text (naive UTC), or with ``binary`` PostgreSQL's own
        form: microseconds since 2000-01-01 UTC.  The same seed draws the same times
        whichever the form.
        """
        rng, random_ = self.rng, self.rng.random
        number = 0
        for low, high, n in self.hours():
            base = (low.minute * 60 + low.second) * 1_000_000 + low.microsecond
            step = (high - low).total_seconds() * 1_000_000 / n
            # Microseconds into the hour, spread evenly with jitter.
            offsets = [base + int((j + random_()) * step) for j in range(n)]
            hour = low.replace(minute=0, second=0, microsecond=0)
            times: list[Any]
            if binary:
                origin = (hour - PG_EPOCH) // MICROSECOND
                times = [origin + offset for offset in offsets]
            else:
                prefix = f"{hour:%Y-%m-%d %H}:"
                times = [_sqlite_time(prefix, offset) for offset in offsets]
            picks = rng.choices(self.keys, cum_weights=self.cum_weights, k=n)
            size = len(self.tails[False])
            tails = [int(random_() * size) for _ in range(n)]
            yield times, range(number, number + n), picks, tails
            number += n

    def copy_binary(self, types: dict[str, Any]) -> Any:
        """The rows in PostgreSQL's binary COPY format, a block of bytes per hour.

        No text for the server to parse (timestamps, numerics): a third less of its
        time per row, which is what bounds the load.  ``types``: each column's type OID.
        A row's tail is encoded once per pool entry, by psycopg's binary dumpers; per
        row only the time, the id and the (user, key) are packed here.
        """
        from psycopg.adapt import PyFormat, Transformer
        from psycopg.pq import Format

        transformer = Transformer()
        tail_columns = COLUMNS[4:]
        transformer.set_dumper_types([types[name] for name in tail_columns], Format.BINARY)
        formats = [PyFormat.BINARY] * len(tail_columns)

        def field(value: Any) -> bytes:
            if value is None:
                return NULL_FIELD
            return struct.pack(">i", len(value)) + bytes(value)

        def encoded(tail: tuple[Any, ...]) -> bytes:
            values = [
                Decimal(value) if types[name] == NUMERIC_OID and value is not None else value
                for name, value in zip(tail_columns, tail, strict=True)
            ]
            return b"".join(map(field, transformer.dump_sequence(values, formats)))

        tails = {browser: [encoded(tail) for tail in pool] for browser, pool in self.tails.items()}

        def integer(column: str, value: int | None) -> bytes:
            if value is None:
                return NULL_FIELD
            code, size = {INT4_OID: ("i", 4), INT8_OID: ("q", 8)}[types[column]]
            return struct.pack(f">i{code}", size, value)

        picks_of = {
            (user_id, key_id): integer("user_id", user_id) + integer("key_id", key_id)
            for user_id, key_id, _web in self.keys
        }
        run = self.run.encode()
        # Each row: the field count, the time (8 bytes), the request id (run + 9 digits).
        start = struct.Struct(f">hiqi{len(run)}s")
        head_size = len(run) + 9
        pack = start.pack
        yield BINARY_HEADER
        for times, numbers, picks, indexes in self.chunks(binary=True):
            yield b"".join(
                b"%b%09d%b%b"
                % (
                    pack(len(COLUMNS), 8, at, head_size, run),
                    number,
                    picks_of[(user_id, key_id)],
                    tails[is_web][index],
                )
                for at, number, (user_id, key_id, is_web), index in zip(
                    times, numbers, picks, indexes, strict=True
                )
            )
        yield BINARY_TRAILER

    def tuples(self) -> Any:
        """The rows as parameter tuples in COLUMNS order (SQLite), a list per hour."""
        run, pools = self.run, self.tails
        for times, numbers, picks, tails in self.chunks():
            yield [
                (at, f"{run}{number:09d}", user_id, key_id, *pools[is_web][tail])
                for at, number, (user_id, key_id, is_web), tail in zip(
                    times, numbers, picks, tails, strict=True
                )
            ]


def _sqlite_time(hour: str, offset: int) -> str:
    """``offset`` microseconds into ``hour`` (``YYYY-MM-DD HH:``) as Django writes a time
    to SQLite: naive UTC text, no fraction on a whole second (SQLite compares text)."""
    minute, rest = divmod(offset, 60_000_000)
    second, micro = divmod(rest, 1_000_000)
    fraction = f".{micro:06d}" if micro else ""
    return f"{hour}{minute:02d}:{second:02d}{fraction}"


def load_postgresql(
    rows: DemoRows, batch: int = 1 << 20, *, phases: dict[str, float] | None = None
) -> int:
    """COPY the rows in (binary format, written in blocks of about ``batch`` bytes).

    A large load (at least as many rows as the ledger holds) drops the ledger's
    secondary indexes and foreign keys first and builds them again afterwards, all in
    the one transaction: maintaining nine indexes row by row makes COPY three to four
    times slower than building them once (measured: 64,000 against 208,000 rows/s),
    and re-adding a foreign key validates it with one join instead of a check per row.
    A failure rolls everything back, indexes included.  ``phases`` gets the seconds
    spent copying and rebuilding.
    """
    phases = {} if phases is None else phases
    started = time.perf_counter()
    table = UsageRecord._meta.db_table
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", [table])
        held = max(0, int(cursor.fetchone()[0]))
        rebuilt = _drop_secondary(cursor, table) if rows.count >= max(held, 100_000) else []
        cursor.execute(
            "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s::regclass"
            " AND attnum > 0 AND NOT attisdropped",
            [table],
        )
        types = {name: int(oid) for name, oid in cursor.fetchall()}
        raw = cursor.cursor  # the psycopg cursor under Django's wrapper
        with raw.copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN (FORMAT binary)") as copy:
            pending: list[bytes] = []
            size = 0
            for block in rows.copy_binary(types):
                pending.append(block)
                size += len(block)
                if size >= batch:
                    copy.write(b"".join(pending))
                    pending, size = [], 0
            copy.write(b"".join(pending))
        phases["copy"] = time.perf_counter() - started
        started = time.perf_counter()
        if rebuilt:
            cursor.execute("SET LOCAL maintenance_work_mem = '256MB'")
            for statement in rebuilt:
                cursor.execute(statement)
        cursor.execute(f"ANALYZE {table}")
        phases["indexes"] = time.perf_counter() - started
    return rows.count


def _drop_secondary(cursor: Any, table: str) -> list[str]:
    """Drop the table's foreign keys, unique constraints and plain indexes; the statements
    that restore them (re-adding a constraint checks it: a duplicate fails the load).
    """
    cursor.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype IN ('f', 'u') ORDER BY contype DESC",
        [table],
    )
    constraints = cursor.fetchall()
    cursor.execute(
        "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x "
        "JOIN pg_class i ON i.oid = x.indexrelid "
        "WHERE x.indrelid = %s::regclass AND NOT x.indisprimary AND NOT EXISTS "
        "(SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)",
        [table],
    )
    indexes = cursor.fetchall()
    for name, _definition in constraints:
        cursor.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for name, _definition in indexes:
        cursor.execute(f'DROP INDEX "{name}"')
    return [definition for _name, definition in indexes] + [
        f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'
        for name, definition in reversed(constraints)
    ]


def load_sqlite(rows: DemoRows) -> int:
    """executemany() of one INSERT per hour of rows: bulk_create's per-row work costs 10x more."""
    table = UsageRecord._meta.db_table
    sql = f"INSERT INTO {table} ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    with transaction.atomic(), connection.cursor() as cursor:
        for block in rows.tuples():
            cursor.executemany(sql, block)
        cursor.execute(f"ANALYZE {table}")  # the planner's statistics (see keep_statistics)
    return rows.count


def parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise CommandError(f"{text!r}: expected an ISO-8601 date or time") from None
    return value if timezone.is_aware(value) else value.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = "Usage data: demo (synthetic records), rollup (catch up or rebuild), retention."

    def add_arguments(self, parser: ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        demo = sub.add_parser("demo", help="fill the ledger with synthetic usage")
        demo.add_argument("--records", type=int, required=True)
        demo.add_argument("--days", type=int, default=30)
        demo.add_argument("--seed", type=int, default=1)
        demo.add_argument("--users", type=int, default=12)
        demo.add_argument(
            "--force", action="store_true", help="even if the ledger holds real usage"
        )
        demo.add_argument("--no-rollup", action="store_true", help="load only (benchmarks)")
        rollup = sub.add_parser("rollup", help="catch the roll-ups up now")
        rollup.add_argument("--rebuild", action="store_true", help="recompute a range")
        rollup.add_argument("--since", type=parse_time)
        rollup.add_argument("--until", type=parse_time)
        retention = sub.add_parser("retention", help="delete old raw records now")
        retention.add_argument("--days", type=int)

    def handle(self, *args: Any, **options: Any) -> None:
        getattr(self, f"handle_{options['action']}")(**options)

    def handle_demo(self, **options: Any) -> None:
        count, days = options["records"], options["days"]
        if count < 1 or days < 1:
            raise CommandError("--records and --days must be at least 1")
        if count > MAX_RECORDS:
            raise CommandError(f"--records may be at most {MAX_RECORDS:,} per load")
        real = UsageRecord.objects.exclude(request_id__startswith=DEMO_PREFIX)
        if real.exists() and not options["force"]:
            raise CommandError(
                "this database already holds real usage records; demo data would mix with "
                "them (use --force to add it anyway)"
            )
        end = timezone.now()
        rows = generate(count, days=days, seed=options["seed"], end=end, people=options["users"])
        started = time.perf_counter()
        phases: dict[str, float] = {}
        if connection.vendor == "postgresql":
            written = load_postgresql(rows, phases=phases)
        else:
            written = load_sqlite(rows)
        elapsed = time.perf_counter() - started
        split = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in phases.items())
        self.stdout.write(
            f"{written} demo records in {elapsed:.2f}s "
            f"({written / elapsed:,.0f} records/s, {connection.vendor}"
            + (f"; {split}" if split else "")
            + ")"
        )
        if not options["no_rollup"]:
            started = time.perf_counter()
            result = rollups.catch_up(max_runs=math.ceil(days * 96 / 96) + 10)
            self.stdout.write(
                f"rolled up {result.buckets} buckets ({result.rows} rows) in "
                f"{time.perf_counter() - started:.2f}s"
            )

    def handle_rollup(self, **options: Any) -> None:
        if options["rebuild"]:
            if not (options["since"] and options["until"]):
                raise CommandError("--rebuild needs --since and --until")
            rows = rollups.rebuild(options["since"], options["until"])
            self.stdout.write(f"rebuilt: {rows} roll-up rows")
            return
        result = rollups.catch_up()
        self.stdout.write(
            f"rolled up {result.buckets} buckets ({result.rows} rows); "
            f"watermark at ledger id {result.watermark_id}"
            + ("" if result.done else "; more to do, run again")
        )

    def handle_retention(self, **options: Any) -> None:
        days = options["days"] or settings.SWITCHBOARD_USAGE_RETENTION_DAYS
        if not days or days < 1:
            raise CommandError("no retention: set SWITCHBOARD_USAGE_RETENTION_DAYS or pass --days")
        deleted = rollups.apply_retention(days, max_batches=10**9)
        self.stdout.write(f"deleted {deleted} raw usage records older than {days} days")
