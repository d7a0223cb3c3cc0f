"""``manage.py usage demo|rollup|retention``: synthetic usage, roll-up catch-up, retention.

- ``usage demo --records N [--days D] [--seed S] [--force]``: fill the ledger with realistic
  synthetic usage (COPY on PostgreSQL, batched inserts on SQLite), then roll it up.
  Refuses a database that already holds real usage unless ``--force``.
- ``usage rollup [--rebuild --since T --until T]``: catch the roll-ups up now, or
  recompute a range (a repair).
- ``usage retention [--days D]``: delete old raw records now (default: the setting).
"""

from __future__ import annotations

import io
import math
import random
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

DEMO_PREFIX = "demo-"
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


def generate(count: int, *, days: int, seed: int, end: datetime, people: int = 12) -> Any:
    """Ledger rows as tuples in COLUMNS order (text-ready values), lazily.

    The queries (catalog, demo users) run now: none may run while the COPY holds the
    connection.
    """
    return _rows(count, days=days, seed=seed, end=end, offers=_offers(), cast=_demo_cast(people))


def _rows(
    count: int,
    *,
    days: int,
    seed: int,
    end: datetime,
    offers: list[Offer],
    cast: list[tuple[int, list[tuple[int, bool]]]],
) -> Any:
    rng = random.Random(seed)
    user_weights = [1 / (n + 1) for n in range(len(cast))]  # a few heavy users, a long tail
    currency = settings.SWITCHBOARD_CURRENCY
    run = uuid.uuid4().hex[:10]
    start = end - timedelta(days=days)
    # Slots of an hour each, weighted by the weekly rhythm; a record falls in one at random.
    first_hour = start.replace(minute=0, second=0, microsecond=0)
    slots, weights = [], []
    hour = first_hour
    while hour < end:
        local = hour + timedelta(hours=8)
        slots.append(hour.timestamp())
        weights.append(HOURS[local.hour] * WEEKDAYS[local.weekday()])
        hour += timedelta(hours=1)
    low, high = start.timestamp(), end.timestamp()
    # In time order, as a real ledger's ids are (roughly).
    times = sorted(rng.choices(slots, weights, k=count))
    people_of = rng.choices(range(len(cast)), user_weights, k=count)
    offer_of = rng.choices(offers, [o.weight for o in offers], k=count)
    outcome_of = rng.choices(OUTCOMES, [o[3] for o in OUTCOMES], k=count)
    random_ = rng.random
    lognorm = rng.lognormvariate
    for i in range(count):
        at = min(max(times[i] + random_() * 3600, low), high - 0.001)
        user_id, keys = cast[people_of[i]]
        key_id, is_web = keys[int(random_() * len(keys))]
        offer = offer_of[i]
        status, http, error_type, _weight = outcome_of[i]
        browser = is_web
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
        cost = f"{units // 10**12}.{units % 10**12:012d}"
        upstream_units = units * 7 // 10  # what the provider charges us: a 30 % margin
        upstream_cost = f"{upstream_units // 10**12}.{upstream_units % 10**12:012d}"
        yield (
            datetime.fromtimestamp(at, UTC),
            f"{DEMO_PREFIX}{run}-{i}",
            user_id,
            key_id,
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
            cost,
            currency,
            any(offer.per_token),
            upstream_cost,
            latency,
            ttft,
        )


def _text(value: Any) -> str:
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def load_postgresql(rows: Any, batch: int = 50_000) -> int:
    """COPY the rows in (text format, one COPY per batch of lines)."""
    table = UsageRecord._meta.db_table
    written = 0
    with transaction.atomic(), connection.cursor() as cursor:
        raw = cursor.cursor  # the psycopg cursor under Django's wrapper
        with raw.copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            buffer = io.StringIO()
            pending = 0
            for row in rows:
                buffer.write("\t".join(map(_text, row)))
                buffer.write("\n")
                pending += 1
                if pending >= batch:
                    copy.write(buffer.getvalue())
                    written += pending
                    buffer, pending = io.StringIO(), 0
            copy.write(buffer.getvalue())
            written += pending
    return written


def load_sqlite(rows: Any, batch: int = 10_000) -> int:
    """executemany() of one INSERT in batches: bulk_create's per-row work costs 10x more."""
    table = UsageRecord._meta.db_table
    sql = f"INSERT INTO {table} ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    written = 0
    chunk: list[tuple[Any, ...]] = []
    with transaction.atomic(), connection.cursor() as cursor:
        for row in rows:
            # Django's SQLite format: naive UTC text; decimals as text (NUMERIC affinity).
            chunk.append((row[0].strftime("%Y-%m-%d %H:%M:%S.%f"), *row[1:]))
            if len(chunk) >= batch:
                cursor.executemany(sql, chunk)
                written += len(chunk)
                chunk = []
        if chunk:
            cursor.executemany(sql, chunk)
            written += len(chunk)
    return written


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
        real = UsageRecord.objects.exclude(request_id__startswith=DEMO_PREFIX)
        if real.exists() and not options["force"]:
            raise CommandError(
                "this database already holds real usage records; demo data would mix with "
                "them (use --force to add it anyway)"
            )
        end = timezone.now()
        rows = generate(count, days=days, seed=options["seed"], end=end, people=options["users"])
        started = time.perf_counter()
        load = load_postgresql if connection.vendor == "postgresql" else load_sqlite
        written = load(rows)
        elapsed = time.perf_counter() - started
        self.stdout.write(
            f"{written} demo records in {elapsed:.2f}s "
            f"({written / elapsed:,.0f} records/s, {connection.vendor})"
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
