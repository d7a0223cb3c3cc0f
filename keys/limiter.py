"""Per-key rate limits, concurrency and budgets: reserve on admission, settle after.

Admission checks every limit and reserves the request's worst case in ONE atomic
step, so two concurrent requests can never both pass on the same remaining budget:

- requests per minute / per day and tokens per minute / per day: fixed windows
  (the minute since the epoch, the calendar day in ``TIME_ZONE``);
- concurrent requests: the number of live reservations;
- token and money budgets per period (day, ISO week, month in ``TIME_ZONE``, or
  lifetime): spent + reserved + this request's worst case must fit.

Settlement replaces the reservation by the actual usage.  A reservation whose
request never settles expires after ``SWITCHBOARD_RESERVATION_TTL`` and is
released by the next admission (a backstop: with Redis, a dead worker's
reservations go with its lease, ``keys.leases``).

With ``REDIS_URL`` the counters live in Redis and both steps are Lua scripts
(atomic across every worker process and machine).  Without Redis an in-process
twin with one lock serves the single-process embedded mode.

When Redis loses the counters (flushed, restarted without its data), nothing may
be let through that the lost counters would have refused.  Two sources rebuild
them: the usage ledger (the database, the record of truth) for what has settled,
and the workers themselves for what is in flight: each one keeps its live
tickets, and publishes their reservations again.  Rebuilding was chosen over
refusing every key with limits until the in-flight requests end (they may be
long streams: minutes of 503s on every key) — but rebuilding alone would let an
admission race the workers that have not published yet, so admissions wait
while a short recovery is open (``keys.leases``: until every worker has
answered, milliseconds after a flush; at most ``SWITCHBOARD_LEASE_SECONDS``).
Then, per key and only once per store:

- budgets: spent = the ledger's sum for the period (plus the requests settled
  while the counter was missing, whose records may not be written yet);
  reserved = the reservations published again;
- rate windows (``ep`` marks a key whose windows are counted in this store): the
  ledger's requests and tokens since the start of the minute and the day, added
  to the reservations published again (each counted in its windows).  A record's
  time is its settlement, so a request admitted the minute before counts in this
  one too: after a loss a window may count a little more, never less;
- concurrency: the reservations published again.

Money in the counters is integer nano-units of ``SWITCHBOARD_CURRENCY`` (Lua
numbers are doubles: exact for integers up to 2**53, so budgets up to about nine
million currency units); usage records keep the exact ``Decimal`` cost.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from channels.db import database_sync_to_async
from django.conf import settings
from django.db.models import Count, F, Q, Sum
from django.utils import timezone

from chatapp import hotstore
from keys import leases
from keys.exceptions import LimiterUnavailable, LimitExceeded, RateWindow
from keys.pricing import from_nano, to_nano

MAX_MONEY_BUDGET = Decimal(9_000_000)
PREFIX = "switchboard:lim:"
REBUILD = "rebuild"


def clock() -> datetime:
    """Now; tests freeze it."""
    return timezone.now()


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    rpd: int | None = None
    tpm: int | None = None
    tpd: int | None = None
    concurrency: int | None = None
    token_budget: int | None = None
    money_budget: Decimal | None = None
    period: str = "monthly"
    max_output_tokens: int | None = None
    clamp_max_tokens: bool = False

    @property
    def any(self) -> bool:
        return any(
            value is not None
            for value in (
                self.rpm,
                self.rpd,
                self.tpm,
                self.tpd,
                self.concurrency,
                self.token_budget,
                self.money_budget,
            )
        )

    @property
    def budgets(self) -> bool:
        return self.token_budget is not None or self.money_budget is not None


@dataclass(frozen=True, slots=True)
class Windows:
    minute: str
    minute_reset: datetime
    day: str
    day_reset: datetime
    period: str
    period_start: datetime
    period_reset: datetime | None  # None: lifetime
    day_start: datetime


def windows(now: datetime, period: str) -> Windows:
    zone = ZoneInfo(settings.TIME_ZONE)
    local = now.astimezone(zone)
    minute = int(now.timestamp()) // 60
    day_start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = (day_start + timedelta(days=1, hours=3)).replace(hour=0)  # DST-safe
    if period == "daily":
        start, reset, name = day_start, next_day, f"d{day_start:%Y%m%d}"
    elif period == "weekly":
        start = day_start - timedelta(days=day_start.weekday())
        reset = (start + timedelta(days=7, hours=3)).replace(hour=0)
        year, week, _ = start.isocalendar()
        name = f"w{year}{week:02d}"
    elif period == "monthly":
        start = day_start.replace(day=1)
        reset = (start + timedelta(days=32)).replace(day=1)
        name = f"m{start:%Y%m}"
    else:
        start, reset, name = datetime(2000, 1, 1, tzinfo=zone), None, "all"
    return Windows(
        minute=str(minute),
        minute_reset=datetime.fromtimestamp((minute + 1) * 60, tz=now.tzinfo),
        day=f"{day_start:%Y%m%d}",
        day_reset=next_day,
        period=name,
        period_start=start,
        period_reset=reset,
        day_start=day_start,
    )


@dataclass
class Ticket:
    """An admitted request's reservation, kept until settlement."""

    key_id: int
    request_id: str
    limits: Limits
    windows: Windows
    tokens: int
    money_nano: int
    label: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # rm, rd, tm, td after admission
    settled: bool = False
    # With Redis, what publishing the reservation again takes (keys.leases).
    expiry_ms: int = 0
    period_ttl: int = 0
    epoch: str = ""
    admitted_at: float = 0.0

    def rate(self) -> tuple[RateWindow, ...]:
        """The key's rate limits after this admission, for the client's headers."""
        return rate_windows(self.limits, self.windows, self.counts)


def rate_windows(limits: Limits, win: Windows, counts: dict[str, int]) -> tuple[RateWindow, ...]:
    """Per kind (requests, tokens): the tightest window that has a limit (minute, else day)."""
    out: list[RateWindow] = []
    for kind, minute_limit, day_limit, minute_key, day_key in (
        ("requests", limits.rpm, limits.rpd, "rm", "rd"),
        ("tokens", limits.tpm, limits.tpd, "tm", "td"),
    ):
        if minute_limit is not None:
            limit, used, reset = minute_limit, counts.get(minute_key, 0), win.minute_reset
        elif day_limit is not None:
            limit, used, reset = day_limit, counts.get(day_key, 0), win.day_reset
        else:
            continue
        out.append(RateWindow(kind, limit, max(0, limit - used), reset))
    return tuple(out)


# --- the two backends: same data, same steps ---

ADMIT = (
    leases.RECOVERING
    + """
local p = ARGV[1]
local now = tonumber(ARGV[2])
local rid = ARGV[3]
local expiry = ARGV[4]
local rpm, rpd = tonumber(ARGV[5]), tonumber(ARGV[6])
local tpm, tpd = tonumber(ARGV[7]), tonumber(ARGV[8])
local conc = tonumber(ARGV[9])
local tbud, mbud = tonumber(ARGV[10]), tonumber(ARGV[11])
local minute, day, period = ARGV[12], ARGV[13], ARGV[14]
local period_ttl = tonumber(ARGV[15])
local tok_s, money_s = ARGV[16], ARGV[17]
local tokens, money = tonumber(tok_s), tonumber(money_s)
local g, owner, known = ARGV[18], ARGV[19], ARGV[20]
local wall, grace = tonumber(ARGV[21]), tonumber(ARGV[22])

local function num(v) return tonumber(v or '0') or 0 end
-- HINCRBY by minus a decimal string ("-0" is not an integer to Redis).
local function dec(key, fieldname, v) if v ~= '0' then redis.call('HINCRBY', key, fieldname, '-' .. v) end end

-- This process must see the store as it is: same epoch (nothing lost since its
-- last sync) and its lease current (nobody released its reservations).
local epoch = redis.call('GET', g .. 'epoch')
if not epoch or epoch ~= known or redis.call('EXISTS', g .. 'lease:' .. owner) == 0 then
  return {-2}
end
local wait = recovering(g)
if wait > 0 then return {-4, wait} end
-- This key's rate windows were counted in this store (else: rebuilt from the ledger first).
if redis.call('GET', p .. 'ep') ~= epoch then return {-3} end

local function release(id)
  local d = redis.call('HGET', p .. 'resd', id)
  if d then
    local t, m, per, o = string.match(d, '^(%d+):(%d+):([^:]*):?(.*)$')
    dec(p .. 'rv:' .. per, 'tok', t)
    dec(p .. 'rv:' .. per, 'money', m)
    redis.call('HDEL', p .. 'resd', id)
    if o ~= '' then redis.call('SREM', p .. 'ro:' .. o, id) end
  end
  redis.call('ZREM', p .. 'res', id)
end

-- Release reservations whose request never settled (the backstop)...
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. 'res', '-inf', now)) do release(id) end
-- ...and those of workers whose lease has been gone for the grace period (counting
-- those still in it, for the concurrency refusal's message).
local stale, stale_wait = 0, 0
for _, o in ipairs(redis.call('SMEMBERS', p .. 'owners')) do
  if redis.call('EXISTS', g .. 'lease:' .. o) == 0 then
    local since = tonumber(redis.call('HGET', g .. 'suspect', o) or '')
    if not since then
      since = wall
      redis.call('HSET', g .. 'suspect', o, wall)
    end
    if wall - since >= grace then
      for _, id in ipairs(redis.call('SMEMBERS', p .. 'ro:' .. o)) do release(id) end
      redis.call('SREM', p .. 'owners', o)
    else
      stale = stale + redis.call('SCARD', p .. 'ro:' .. o)
      stale_wait = math.max(stale_wait, grace - (wall - since))
    end
  end
end

local rm = num(redis.call('GET', p .. 'rm:' .. minute))
local rd = num(redis.call('GET', p .. 'rd:' .. day))
local tm = num(redis.call('GET', p .. 'tm:' .. minute))
local td = num(redis.call('GET', p .. 'td:' .. day))
if rpm >= 0 and rm + 1 > rpm then return {0, 'rpm', rpm, rm} end
if rpd >= 0 and rd + 1 > rpd then return {0, 'rpd', rpd, rd} end
if tpm >= 0 and tm + tokens > tpm then return {0, 'tpm', tpm, tm} end
if tpd >= 0 and td + tokens > tpd then return {0, 'tpd', tpd, td} end
if conc >= 0 then
  local c = redis.call('ZCARD', p .. 'res')
  if c + 1 > conc then return {0, 'concurrency', conc, c, stale, stale_wait} end
end
if tbud >= 0 or mbud >= 0 then
  if redis.call('EXISTS', p .. 'sp:' .. period) == 0 then return {-1} end
  local sp = redis.call('HMGET', p .. 'sp:' .. period, 'tok', 'money')
  local rv = redis.call('HMGET', p .. 'rv:' .. period, 'tok', 'money')
  if tbud >= 0 then
    local used = num(sp[1]) + num(rv[1])
    if used + tokens > tbud then return {0, 'token_budget', tbud, num(sp[1]), num(rv[1])} end
  end
  if mbud >= 0 then
    local used = num(sp[2]) + num(rv[2])
    if used + money > mbud then return {0, 'money_budget', mbud, num(sp[2]), num(rv[2])} end
  end
end

rm = redis.call('INCR', p .. 'rm:' .. minute)
redis.call('EXPIRE', p .. 'rm:' .. minute, 120)
rd = redis.call('INCR', p .. 'rd:' .. day)
redis.call('EXPIRE', p .. 'rd:' .. day, 172800)
tm = redis.call('INCRBY', p .. 'tm:' .. minute, tok_s)
redis.call('EXPIRE', p .. 'tm:' .. minute, 120)
td = redis.call('INCRBY', p .. 'td:' .. day, tok_s)
redis.call('EXPIRE', p .. 'td:' .. day, 172800)
redis.call('ZADD', p .. 'res', expiry, rid)
redis.call('HSET', p .. 'resd', rid, tok_s .. ':' .. money_s .. ':' .. period .. ':' .. owner)
redis.call('SADD', p .. 'ro:' .. owner, rid)
redis.call('SADD', p .. 'owners', owner)
redis.call('HINCRBY', p .. 'rv:' .. period, 'tok', tok_s)
redis.call('HINCRBY', p .. 'rv:' .. period, 'money', money_s)
if period_ttl > 0 then redis.call('EXPIRE', p .. 'rv:' .. period, period_ttl) end
return {1, rm, rd, tm, td}
"""
)

STATUS = leases.RECOVERING + "return recovering(ARGV[1])"

# Adds a key's rate windows from the ledger to what was counted since the store was
# lost (reservations published again), once per key and store.
WINDOWS = """
local p, g, epoch = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', g .. 'epoch') ~= epoch or redis.call('GET', p .. 'ep') == epoch then return 0 end
local adds = {
  {p .. 'rm:' .. ARGV[4], ARGV[6], 120}, {p .. 'tm:' .. ARGV[4], ARGV[7], 120},
  {p .. 'rd:' .. ARGV[5], ARGV[8], 172800}, {p .. 'td:' .. ARGV[5], ARGV[9], 172800},
}
for _, a in ipairs(adds) do
  if a[2] ~= '0' then
    redis.call('INCRBY', a[1], a[2])
    redis.call('EXPIRE', a[1], a[3])
  end
end
redis.call('SET', p .. 'ep', epoch)
return 1
"""

SETTLE = """
local p = ARGV[1]
local rid = ARGV[2]
local tok_s, money_s = ARGV[3], ARGV[4]
local minute, day, period = ARGV[5], ARGV[6], ARGV[7]
local budgets = ARGV[8]
local reserved = '0'
local function dec(key, fieldname, v) if v ~= '0' then redis.call('HINCRBY', key, fieldname, '-' .. v) end end
local d = redis.call('HGET', p .. 'resd', rid)
if d then
  local t, m, _, o = string.match(d, '^(%d+):(%d+):([^:]*):?(.*)$')
  reserved = t
  dec(p .. 'rv:' .. period, 'tok', t)
  dec(p .. 'rv:' .. period, 'money', m)
  redis.call('HDEL', p .. 'resd', rid)
  redis.call('ZREM', p .. 'res', rid)
  if o ~= '' then
    redis.call('SREM', p .. 'ro:' .. o, rid)
    if redis.call('EXISTS', p .. 'ro:' .. o) == 0 then redis.call('SREM', p .. 'owners', o) end
  end
else
  -- Lost (or released): never publish this reservation again (keys.leases).
  redis.call('SET', p .. 'done:' .. rid, 1, 'EX', ARGV[9])
end
for _, w in ipairs({p .. 'tm:' .. minute, p .. 'td:' .. day}) do
  if redis.call('EXISTS', w) == 1 then
    redis.call('INCRBY', w, tok_s)
    redis.call('DECRBY', w, reserved)
  end
end
if redis.call('EXISTS', p .. 'sp:' .. period) == 1 then
  redis.call('HINCRBY', p .. 'sp:' .. period, 'tok', tok_s)
  redis.call('HINCRBY', p .. 'sp:' .. period, 'money', money_s)
elseif budgets == '1' then
  -- No spent counter to add to (lost, not rebuilt yet): the record may not be in the
  -- ledger when it is rebuilt, so the rebuild adds these (and leaves their records out).
  redis.call('HSET', p .. 'spq:' .. period, rid, tok_s .. ':' .. money_s)
  redis.call('EXPIRE', p .. 'spq:' .. period, 172800)
end
return 1
"""

# KEYS[1] the spent counter, ARGV: the ledger's sum without the pending records,
# the counter's TTL, the pending records' hash (settled while the counter was missing).
SEED = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'tok', ARGV[1], 'money', ARGV[2])
  for _, v in ipairs(redis.call('HVALS', ARGV[4])) do
    local t, m = string.match(v, '^(%d+):(%d+)$')
    redis.call('HINCRBY', KEYS[1], 'tok', t)
    redis.call('HINCRBY', KEYS[1], 'money', m)
  end
  redis.call('DEL', ARGV[4])
  if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
end
return 1
"""


def _ttl(win: Windows, now: datetime) -> int:
    if win.period_reset is None:
        return 0
    return int((win.period_reset - now).total_seconds()) + 86400


def _args(ticket: Ticket, now: datetime) -> list[Any]:
    limits = ticket.limits

    def value(limit: int | None) -> int:
        return -1 if limit is None else limit

    money_budget = -1 if limits.money_budget is None else to_nano(limits.money_budget)
    expiry = int((now.timestamp() + settings.SWITCHBOARD_RESERVATION_TTL) * 1000)
    return [
        f"{PREFIX}{ticket.key_id}:",
        int(now.timestamp() * 1000),
        ticket.request_id,
        expiry,
        value(limits.rpm),
        value(limits.rpd),
        value(limits.tpm),
        value(limits.tpd),
        value(limits.concurrency),
        value(limits.token_budget),
        money_budget,
        ticket.windows.minute,
        ticket.windows.day,
        ticket.windows.period,
        _ttl(ticket.windows, now),
        ticket.tokens,
        ticket.money_nano,
    ]


class LocalBackend:
    """The Lua scripts' in-process twin for the embedded (single-process) mode."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, int] = {}  # rm/rd/tm/td windows
        self.reservations: dict[
            str, dict[str, tuple[int, int, int, str]]
        ] = {}  # key → id → (expiry, tok, money, period)
        self.reserved: dict[str, list[int]] = {}  # key+period → [tok, money]
        self.spent: dict[str, list[int]] = {}  # key+period → [tok, money]

    def clear(self) -> None:
        with self.lock:
            self.counters.clear()
            self.reservations.clear()
            self.reserved.clear()
            self.spent.clear()

    def admit(self, args: list[Any]) -> list[Any]:
        p, now, rid, expiry = args[0], args[1], args[2], args[3]
        rpm, rpd, tpm, tpd, conc, tbud, mbud = args[4:11]
        minute, day, period = args[11], args[12], args[13]
        tokens, money = args[15], args[16]
        with self.lock:
            live = self.reservations.setdefault(p, {})
            for rid_old, (exp, tok, mon, per) in list(live.items()):
                if exp <= now:
                    reserved = self.reserved.setdefault(f"{p}rv:{per}", [0, 0])
                    reserved[0] -= tok
                    reserved[1] -= mon
                    del live[rid_old]
            rm = self.counters.get(f"{p}rm:{minute}", 0)
            rd = self.counters.get(f"{p}rd:{day}", 0)
            tm = self.counters.get(f"{p}tm:{minute}", 0)
            td = self.counters.get(f"{p}td:{day}", 0)
            if rpm >= 0 and rm + 1 > rpm:
                return [0, "rpm", rpm, rm]
            if rpd >= 0 and rd + 1 > rpd:
                return [0, "rpd", rpd, rd]
            if tpm >= 0 and tm + tokens > tpm:
                return [0, "tpm", tpm, tm]
            if tpd >= 0 and td + tokens > tpd:
                return [0, "tpd", tpd, td]
            if conc >= 0 and len(live) + 1 > conc:
                return [0, "concurrency", conc, len(live)]
            if tbud >= 0 or mbud >= 0:
                spent = self.spent.get(f"{p}sp:{period}")
                if spent is None:
                    return [-1]
                reserved = self.reserved.get(f"{p}rv:{period}", [0, 0])
                if tbud >= 0 and spent[0] + reserved[0] + tokens > tbud:
                    return [0, "token_budget", tbud, spent[0], reserved[0]]
                if mbud >= 0 and spent[1] + reserved[1] + money > mbud:
                    return [0, "money_budget", mbud, spent[1], reserved[1]]
            self._prune(minute, day)
            rm = self.counters[f"{p}rm:{minute}"] = rm + 1
            rd = self.counters[f"{p}rd:{day}"] = rd + 1
            tm = self.counters[f"{p}tm:{minute}"] = tm + tokens
            td = self.counters[f"{p}td:{day}"] = td + tokens
            live[rid] = (expiry, tokens, money, period)
            reserved = self.reserved.setdefault(f"{p}rv:{period}", [0, 0])
            reserved[0] += tokens
            reserved[1] += money
            return [1, rm, rd, tm, td]

    def _prune(self, minute: str, day: str) -> None:
        """Forget windows that ended (the Redis twin lets them expire)."""
        if len(self.counters) > 4096:
            current = (f"rm:{minute}", f"tm:{minute}", f"rd:{day}", f"td:{day}")
            for name in [name for name in self.counters if not name.endswith(current)]:
                del self.counters[name]

    def settle(self, args: list[Any]) -> None:
        p, rid, tokens, money, minute, day, period = args[:7]
        with self.lock:
            entry = self.reservations.get(p, {}).pop(rid, None)
            reserved_tokens = 0
            if entry is not None:
                _expiry, reserved_tokens, reserved_money, per = entry
                reserved = self.reserved.setdefault(f"{p}rv:{per}", [0, 0])
                reserved[0] -= reserved_tokens
                reserved[1] -= reserved_money
            for window in (f"{p}tm:{minute}", f"{p}td:{day}"):
                if window in self.counters:
                    self.counters[window] += tokens - reserved_tokens
            spent = self.spent.get(f"{p}sp:{period}")
            if spent is not None:
                spent[0] += tokens
                spent[1] += money

    def seed(self, name: str, tokens: int, money: int) -> None:
        with self.lock:
            self.spent.setdefault(name, [tokens, money])

    def drop_spent(self) -> None:
        """Forget every spent counter, as a Redis restart would (tests)."""
        with self.lock:
            self.spent.clear()


local_backend = LocalBackend()
_scripts: dict[str, Any] = {}
_pending: set[asyncio.Task[Any]] = set()


def _redis() -> bool:
    return settings.REDIS_URL is not None


async def _run(name: str, script: str, args: list[Any], keys: list[str] | None = None) -> Any:
    client = hotstore.async_client()
    # One registered Script per client: it runs EVALSHA and reloads after a flush.
    registered = _scripts.get(f"{name}:{id(client)}")
    if registered is None:
        registered = client.register_script(script)
        _scripts[f"{name}:{id(client)}"] = registered
    return await registered(keys=keys or [], args=args)


def _spent_from_ledger(
    key_id: int, start: datetime, end: datetime | None, *, leave_out: list[str] | None = None
) -> tuple[int, int]:
    from keys.models import UsageRecord

    records = UsageRecord.objects.filter(key_id=key_id, created_at__gte=start)
    if end is not None:
        records = records.filter(created_at__lt=end)
    if leave_out:
        records = records.exclude(request_id__in=leave_out)
    totals = records.aggregate(
        input=Sum("input_tokens"), output=Sum("output_tokens"), cost=Sum("cost")
    )
    return (totals["input"] or 0) + (totals["output"] or 0), to_nano(totals["cost"] or Decimal(0))


def spent_in_period(key_id: int, period: str, when: datetime) -> tuple[int, Decimal, Windows]:
    """Tokens and money a key spent in the budget period holding ``when``, from the ledger.

    The usage ledger is the record of truth on every backend (Redis or embedded), so
    budget alerts (``keys.alerts``) read the same numbers whichever limiter runs.
    """
    from keys.models import COST_SCALE, UsageRecord
    from keys.rollups import CostUnits

    win = windows(when, period)
    records = UsageRecord.objects.filter(key_id=key_id, created_at__gte=win.period_start)
    if win.period_reset is not None:
        records = records.filter(created_at__lt=win.period_reset)
    # Cost summed as integer 10**-12 units: exact on SQLite too (it keeps decimals as floats).
    totals = records.aggregate(
        input=Sum("input_tokens"), output=Sum("output_tokens"), cost=CostUnits("cost")
    )
    money = Decimal(totals["cost"] or 0).scaleb(-COST_SCALE)
    return (totals["input"] or 0) + (totals["output"] or 0), money, win


def _windows_from_ledger(key_id: int, win: Windows) -> tuple[int, int, int, int]:
    """Requests and tokens in the current minute and day: (rm, tm, rd, td).

    By the records' time, which is their settlement: a request admitted in the minute
    before counts in this one too (an overcount, never an undercount).  Requests that
    never passed admission (4xx without an upstream attempt, but 499, a client gone
    while waiting) are left out.
    """
    from keys.models import UsageRecord

    minute_start = win.minute_reset - timedelta(seconds=60)
    tokens = F("input_tokens") + F("output_tokens")
    in_minute = Q(created_at__gte=minute_start)
    totals = (
        UsageRecord.objects.filter(key_id=key_id, created_at__gte=min(minute_start, win.day_start))
        .exclude(attempts=0, http_status__gte=400, http_status__lt=499)
        .aggregate(
            rm=Count("id", filter=in_minute),
            tm=Sum(tokens, filter=in_minute),
            rd=Count("id", filter=Q(created_at__gte=win.day_start)),
            td=Sum(tokens, filter=Q(created_at__gte=win.day_start)),
        )
    )
    return totals["rm"] or 0, totals["tm"] or 0, totals["rd"] or 0, totals["td"] or 0


_rebuilds: dict[tuple[int, str], asyncio.Future[None]] = {}


async def _single_flight(name: str, make: Any) -> None:
    """Run ``make()`` once per event loop and name however many ask at once."""
    flight = (id(asyncio.get_running_loop()), name)
    running = _rebuilds.get(flight)
    if running is None:
        running = asyncio.ensure_future(make())
        _rebuilds[flight] = running
        running.add_done_callback(lambda _done: _rebuilds.pop(flight, None))
    await asyncio.shield(running)


async def _rebuild(ticket: Ticket, now: datetime) -> None:
    """Rebuild a period's spent counters, once per key and period however many ask at once."""
    name = f"{PREFIX}{ticket.key_id}:sp:{ticket.windows.period}"
    await _single_flight(name, lambda: _rebuild_once(ticket, now))


async def _rebuild_once(ticket: Ticket, now: datetime) -> None:
    """Rebuild a period's spent counters from the usage ledger (the record of truth)."""
    from keys import ledger

    # Records still queued in this process belong in the sum.
    await asyncio.to_thread(ledger.flush, 5.0)
    win = ticket.windows
    name = f"{PREFIX}{ticket.key_id}:sp:{win.period}"
    pending_name = f"{PREFIX}{ticket.key_id}:spq:{win.period}"
    pending: list[str] = []
    if _redis():
        # Settled while the counter was missing: SEED adds them, so the sum leaves them out.
        pending = [_text(rid) for rid in await hotstore.async_client().hkeys(pending_name)]
    tokens, money = await database_sync_to_async(_spent_from_ledger)(
        ticket.key_id, win.period_start, win.period_reset, leave_out=pending
    )
    if _redis():
        await _run("seed", SEED, [tokens, money, _ttl(win, now), pending_name], keys=[name])
    else:
        local_backend.seed(name, tokens, money)


async def _rebuild_windows(ticket: Ticket) -> None:
    """Count a key's current rate windows from the ledger, once per store (Redis only)."""
    await _single_flight(f"{PREFIX}{ticket.key_id}:ep", lambda: _rebuild_windows_once(ticket))


async def _rebuild_windows_once(ticket: Ticket) -> None:
    from keys import ledger

    await asyncio.to_thread(ledger.flush, 5.0)
    win = ticket.windows
    rm, tm, rd, td = await database_sync_to_async(_windows_from_ledger)(ticket.key_id, win)
    args = [f"{PREFIX}{ticket.key_id}:", PREFIX, leases.epoch()]
    await _run("windows", WINDOWS, [*args, win.minute, win.day, rm, tm, rd, td])


async def _await_recovery() -> None:
    """Wait until the recovery after a loss is over (one poller per event loop)."""
    await _single_flight(f"{PREFIX}rec", _poll_recovery)


async def _poll_recovery() -> None:
    delay = 0.002
    deadline = time.monotonic() + settings.SWITCHBOARD_LEASE_SECONDS + 1
    while time.monotonic() < deadline:
        await asyncio.sleep(delay)
        if not int(await _run("status", STATUS, [PREFIX])):
            return
        delay = min(delay * 2, 0.1)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _used(result: list[Any]) -> dict[str, int]:
    """Counts for the headers of a refusal: the window that refused is full."""
    kind = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
    key = {"rpm": "rm", "rpd": "rd", "tpm": "tm", "tpd": "td"}.get(kind)
    return {key: int(result[2])} if key else {}


def _refusal(result: list[Any], ticket: Ticket, now: datetime) -> LimitExceeded:
    kind = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
    limit = int(result[2])
    used = int(result[3])
    win = ticket.windows
    prefix = ticket.label or f"API key #{ticket.key_id}"
    rate = rate_windows(ticket.limits, win, _used(result))
    if kind in ("rpm", "rpd", "tpm", "tpd", "concurrency"):
        reset = {
            "rpm": win.minute_reset,
            "tpm": win.minute_reset,
            "rpd": win.day_reset,
            "tpd": win.day_reset,
        }.get(kind)
        wait = max(1, int((reset - now).total_seconds() + 0.999)) if reset else 1
        label = {
            "rpm": "requests per minute",
            "rpd": "requests per day",
            "tpm": "tokens per minute",
            "tpd": "tokens per day",
            "concurrency": "concurrent requests",
        }[kind]
        needed = (
            f" (this request needs up to {ticket.tokens} tokens)" if kind in ("tpm", "tpd") else ""
        )
        when = (
            f"Try again in {wait}s."
            if reset
            else "Try again when one of the key's requests in flight has ended."
        )
        stale = int(result[4]) if kind == "concurrency" and len(result) > 5 else 0
        if stale:
            # Counted until released: requests of a worker that stopped renewing its lease.
            wait = max(1, -(-int(result[5]) // 1000))
            when += (
                f" Requests held by a worker that stopped responding ({stale}) are released"
                f" within {wait}s."
            )
        return LimitExceeded(
            kind,
            f"Rate limit reached for {label} on {prefix}: limit {limit}, used {used}{needed}. {when}",
            limit=limit,
            used=used,
            resets_at=reset,
            retry_after=wait,
            rate=rate,
        )
    reserved = int(result[4])
    resets = (
        f"resets at {win.period_reset.isoformat()}"
        if win.period_reset is not None
        else "it does not reset (lifetime budget)"
    )
    period = ticket.limits.period
    if kind == "token_budget":
        message = (
            f"The {period} token budget of {prefix} is exhausted: {used} of {limit} tokens used"
            f"{f', {reserved} reserved by requests in flight' if reserved else ''}; this request needs up to "
            f"{ticket.tokens}; {resets}."
        )
        limit_value: object = limit
        used_value: object = used
    else:
        currency = settings.SWITCHBOARD_CURRENCY
        message = (
            f"The {period} money budget of {prefix} is exhausted: {from_nano(used).normalize():f} of "
            f"{from_nano(limit).normalize():f} {currency} used"
            f"{f', {from_nano(reserved).normalize():f} reserved by requests in flight' if reserved else ''}; "
            f"this request may cost up to {from_nano(ticket.money_nano).normalize():f}; {resets}."
        )
        limit_value, used_value = from_nano(limit), from_nano(used)
    retry = (
        max(1, int((win.period_reset - now).total_seconds()))
        if win.period_reset is not None
        else None
    )
    return LimitExceeded(
        kind,
        message,
        limit=limit_value,
        used=used_value,
        resets_at=win.period_reset,
        retry_after=retry,
        rate=rate,
    )


async def aadmit(
    *,
    key_id: int,
    request_id: str,
    limits: Limits,
    tokens: int,
    money_nano: int,
    label: str = "",
) -> Ticket:
    """Check every limit and reserve ``tokens`` / ``money_nano`` atomically.

    Raises ``LimitExceeded`` naming the limit that refused.
    """
    now = clock()
    ticket = Ticket(
        key_id, request_id, limits, windows(now, limits.period), tokens, money_nano, label
    )
    redis = _redis()
    steps = 0
    deadline = time.monotonic() + settings.SWITCHBOARD_LEASE_SECONDS + 5
    while steps < 6 and time.monotonic() < deadline:
        args = _args(ticket, now)
        if redis:
            published = leases.snapshots()
            about_us = leases.admit_args()
            result = await _run("admit", ADMIT, [*args, *about_us])
        else:
            result = local_backend.admit(args)
        status = int(result[0])
        if status == -4:  # Redis lost its counters: recovering from the workers and the ledger
            await _await_recovery()
            continue
        steps += 1
        if status == -2:  # this process's reservations may be missing from Redis (or first use)
            await _single_flight(f"{PREFIX}sync", leases.async_sync)
            continue
        if status == -3:
            await _rebuild_windows(ticket)
            continue
        if status == -1:
            await _rebuild(ticket, now)
            continue
        if status == 0:
            raise _refusal(list(result), ticket, now)
        ticket.counts = {
            "rm": int(result[1]),
            "rd": int(result[2]),
            "tm": int(result[3]),
            "td": int(result[4]),
        }
        if redis:
            ticket.expiry_ms, ticket.period_ttl = int(args[3]), int(args[14])
            leases.track(ticket, epoch=about_us[2])
            if leases.snapshots() != published:
                # This process published its reservations while this one was on its way:
                # it may have missed it, and the store it was admitted in may be gone.
                await leases.async_sync(force=True)
        return ticket
    raise LimiterUnavailable("The limiter could not rebuild its counters; try again.")


def settle(ticket: Ticket, *, tokens: int, money_nano: int) -> None:
    """Replace the reservation by the actual usage (never blocks the event loop)."""
    if ticket.settled:
        return
    ticket.settled = True
    win = ticket.windows
    args = [
        f"{PREFIX}{ticket.key_id}:",
        ticket.request_id,
        tokens,
        money_nano,
        win.minute,
        win.day,
        win.period,
        "1" if ticket.limits.budgets else "0",
        leases.TOMBSTONE_SECONDS,
    ]
    if not _redis():
        local_backend.settle(args)
        return
    leases.forget(ticket)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        hotstore.sync_client().eval(SETTLE, 0, *args)
        return
    # A task of its own: settlement must finish even if the request's task is being
    # cancelled (client gone); the set keeps a strong reference until it is done.
    task = loop.create_task(_run("settle", SETTLE, args))
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def aflush() -> None:
    """Wait for settlements in flight (tests, shutdown)."""
    while _pending:
        await asyncio.gather(*list(_pending), return_exceptions=True)


def usage(*, key_id: int, limits: Limits, in_server: bool = True) -> dict[str, Any]:
    """Current use against every limit, read without reserving.

    With Redis every process reads the counters the servers enforce.  In the embedded
    mode they live in the server process's memory: ``in_server=False`` (another
    process, ``manage.py key usage``) recomputes the request and token windows from
    the usage ledger instead, the way a rebuild after a lost store does (settled
    requests, by their settlement time); what is in flight only the server knows, so
    ``in_flight`` and ``reserved`` are None.  ``source`` says which: ``redis``,
    ``server`` or ``ledger``.
    """
    now = clock()
    win = windows(now, limits.period)
    p = f"{PREFIX}{key_id}:"
    in_flight: int | None
    reserved: list[int | None]
    source = "redis" if _redis() else "server" if in_server else "ledger"
    if source == "ledger":
        rm, tm, rd, td = _windows_from_ledger(key_id, win)
        counts = [rm, rd, tm, td]
        in_flight, reserved = None, [None, None]
    elif source == "redis":
        client = hotstore.sync_client()
        values = client.mget(
            [
                p + f"rm:{win.minute}",
                p + f"rd:{win.day}",
                p + f"tm:{win.minute}",
                p + f"td:{win.day}",
            ]
        )
        counts = [int(value or 0) for value in values]
        # Live reservations, but those of workers whose lease is gone (dead, not yet released).
        ids = client.zrangebyscore(p + "res", int(now.timestamp() * 1000) + 1, "+inf")
        owners = [_owner(entry) for entry in (client.hmget(p + "resd", ids) if ids else [])]
        alive = leases.alive(client, {owner for owner in owners if owner})
        in_flight = sum(1 for owner in owners if not owner or owner in alive)
        reserved_raw = client.hmget(p + f"rv:{win.period}", "tok", "money")
        reserved = [int(value or 0) for value in reserved_raw]
    else:
        backend = local_backend
        with backend.lock:
            counts = [
                backend.counters.get(f"{p}rm:{win.minute}", 0),
                backend.counters.get(f"{p}rd:{win.day}", 0),
                backend.counters.get(f"{p}tm:{win.minute}", 0),
                backend.counters.get(f"{p}td:{win.day}", 0),
            ]
            now_ms = int(now.timestamp() * 1000)
            in_flight = sum(
                1 for entry in backend.reservations.get(p, {}).values() if entry[0] > now_ms
            )
            reserved = list(backend.reserved.get(f"{p}rv:{win.period}", [0, 0]))
    spent_tokens, spent_money = _spent_from_ledger(key_id, win.period_start, win.period_reset)
    return {
        "time": now.isoformat(),
        "source": source,
        "rpm": {"limit": limits.rpm, "used": counts[0], "resets_at": win.minute_reset.isoformat()},
        "rpd": {"limit": limits.rpd, "used": counts[1], "resets_at": win.day_reset.isoformat()},
        "tpm": {"limit": limits.tpm, "used": counts[2], "resets_at": win.minute_reset.isoformat()},
        "tpd": {"limit": limits.tpd, "used": counts[3], "resets_at": win.day_reset.isoformat()},
        "concurrency": {"limit": limits.concurrency, "in_flight": in_flight},
        "token_budget": {
            "limit": limits.token_budget,
            "period": limits.period,
            "spent": spent_tokens,
            "reserved": reserved[0],
            "resets_at": win.period_reset.isoformat() if win.period_reset else None,
        },
        "money_budget": {
            "limit": f"{limits.money_budget.normalize():f}"
            if limits.money_budget is not None
            else None,
            "currency": settings.SWITCHBOARD_CURRENCY,
            "period": limits.period,
            "spent": str(from_nano(spent_money).normalize()),
            "reserved": str(from_nano(reserved[1]).normalize())
            if reserved[1] is not None
            else None,
            "resets_at": win.period_reset.isoformat() if win.period_reset else None,
        },
    }


def _owner(entry: bytes | None) -> str:
    """The owner of a reservation, from its ``tokens:money:period:owner`` entry."""
    return _text(entry).split(":", 3)[3] if entry and _text(entry).count(":") >= 3 else ""


def reset_local() -> None:
    """Drop the embedded backend's state and this process's live tickets (tests)."""
    local_backend.clear()
    leases.forget_all()
