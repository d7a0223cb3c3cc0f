"""Which worker holds which reservation, and the limiter's recovery when Redis loses it (Redis only).

Every process that admits requests has an owner id (``host:pid:random``) and a
lease: the key ``switchboard:lim:lease:<owner>``, expiring after
``SWITCHBOARD_LEASE_SECONDS`` and refreshed five times per lease period by a
daemon thread (started on the process's first admission).  Each reservation
records its owner.  An admission that finds an owner's lease gone marks the owner
suspect; one that finds it still gone half a lease later releases the owner's
reservations.  So a killed worker's requests are released about 1 to 1.5 lease
periods after its death, instead of after ``SWITCHBOARD_RESERVATION_TTL`` (which
stays as a backstop).  The half-lease of suspicion covers a Redis restarted from
its saved data after an outage longer than a lease, every lease expired: live
workers renew theirs (and publish their reservations again) well within it.

Each process also keeps its live tickets (admitted, not yet settled) in memory, so
it can publish their reservations again (``sync()``) whenever they may be missing
from Redis:

- its own lease was gone (it stalled, or was cut off from Redis, for a lease
  period: others may have released its reservations);
- the store was lost (restart without persistence, flush): the epoch key, set
  once per store, is gone.  The first process to notice sets a new epoch and opens
  a *recovery*, announced on a pub/sub channel (subscriptions survive a flush).
  Every subscribed process publishes its live reservations again (with the rate
  windows they counted), writes out its queued usage records, then acknowledges.
  Admissions wait until every process that received the announcement has
  acknowledged, and, when Redis itself restarted less than a lease period ago
  (its subscribers may not have reconnected yet), until it has been up for one;
  in any case for at most a lease period.  After a flush that takes milliseconds.

Settlement races publication: a request that settles while its reservation is
missing leaves a tombstone (``done:<request id>``, ten minutes), and publication
skips tombstoned requests, so a settled request is never reserved again.

Not covered: a worker alive but cut off from Redis (or frozen) for longer than
1.5 lease periods counts as dead meanwhile, so its requests in flight stop being
counted until it reconnects; a failover to a replica that lagged behind; a Redis
that evicts keys under memory pressure (use ``maxmemory-policy noeviction``).

The in-process backend of the embedded mode needs none of this: a process that
dies takes its counters with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.conf import settings

from chatapp import hotstore

if TYPE_CHECKING:
    from keys.limiter import Ticket

logger = logging.getLogger(__name__)

PREFIX = "switchboard:lim:"  # the limiter's prefix; these keys have no key id in them


def channel(client: Any) -> str:
    """The recovery channel of this database: pub/sub is server-wide, not per database,
    so two deployments (or test runs) on one Redis server must not hear each other."""
    database = client.connection_pool.connection_kwargs.get("db", 0)
    return f"{PREFIX}recover:{database}"


SUBSCRIBE_TIMEOUT = 5.0  # seconds a first admission waits for the thread to subscribe
TOMBSTONE_SECONDS = 600


def lease_ms() -> int:
    return int(settings.SWITCHBOARD_LEASE_SECONDS * 1000)


def grace_ms() -> int:
    """How long an owner's lease must stay gone before its reservations are released."""
    return lease_ms() // 2


def refresh_every() -> float:
    return settings.SWITCHBOARD_LEASE_SECONDS / 5


# The recovery after a loss: open until every process that was told has acknowledged
# (and Redis has been up for a lease period), at most a lease period (rec's expiry).
# Shared by the limiter's ADMIT and STATUS scripts; returns the milliseconds left, or 0.
RECOVERING = """
local function recovering(g)
  if redis.call('EXISTS', g .. 'rec') == 0 then return 0 end
  local expected = tonumber(redis.call('HGET', g .. 'rec', 'expected') or '-1') or -1
  if expected >= 0 and redis.call('SCARD', g .. 'rec:acks') >= expected
      and redis.call('EXISTS', g .. 'rec:hold') == 0 then
    redis.call('DEL', g .. 'rec', g .. 'rec:acks')
    return 0
  end
  return math.max(1, redis.call('PTTL', g .. 'rec'))
end
"""

LEASE = """
local g, owner = ARGV[1], ARGV[2]
local wall, forget = tonumber(ARGV[4]), tonumber(ARGV[5])
local had = redis.call('PEXPIRE', g .. 'lease:' .. owner, ARGV[3])
if had == 1 then redis.call('HDEL', g .. 'suspect', owner) end
-- Forget suspects long dead: the TTL has released whatever they still held.
local suspects = redis.call('HGETALL', g .. 'suspect')
for i = 1, #suspects, 2 do
  if wall - tonumber(suspects[i + 1]) > forget then redis.call('HDEL', g .. 'suspect', suspects[i]) end
end
return {had, redis.call('GET', g .. 'epoch') or ''}
"""

BEGIN = """
local g, epoch = ARGV[1], ARGV[2]
if not redis.call('SET', g .. 'epoch', epoch, 'NX') then
  return {0, redis.call('GET', g .. 'epoch')}
end
redis.call('DEL', g .. 'rec:acks')
redis.call('HSET', g .. 'rec', 'epoch', epoch, 'expected', -1)
redis.call('PEXPIRE', g .. 'rec', ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('SET', g .. 'rec:hold', 1, 'PX', ARGV[4]) end
return {1, epoch}
"""

EXPECT = """
if redis.call('HGET', ARGV[1] .. 'rec', 'epoch') == ARGV[2] then
  redis.call('HSET', ARGV[1] .. 'rec', 'expected', ARGV[3])
end
return 1
"""

REPUBLISH = """
local p, rid, expiry = ARGV[1], ARGV[2], ARGV[3]
local tok, money, period, period_ttl = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local owner, restore, minute, day = ARGV[8], ARGV[9], ARGV[10], ARGV[11]
-- Into the store this process looked at, or not at all (it was lost again meanwhile).
if redis.call('GET', ARGV[13] .. 'epoch') ~= ARGV[12] then return -1 end
if redis.call('EXISTS', p .. 'done:' .. rid) == 1 or redis.call('HEXISTS', p .. 'resd', rid) == 1 then
  return 0
end
redis.call('ZADD', p .. 'res', expiry, rid)
redis.call('HSET', p .. 'resd', rid, tok .. ':' .. money .. ':' .. period .. ':' .. owner)
redis.call('SADD', p .. 'ro:' .. owner, rid)
redis.call('SADD', p .. 'owners', owner)
redis.call('HINCRBY', p .. 'rv:' .. period, 'tok', tok)
redis.call('HINCRBY', p .. 'rv:' .. period, 'money', money)
if period_ttl > 0 then redis.call('EXPIRE', p .. 'rv:' .. period, period_ttl) end
if restore == '1' then
  -- The store was lost since the admission: count it in its windows again.
  redis.call('INCR', p .. 'rm:' .. minute)
  redis.call('EXPIRE', p .. 'rm:' .. minute, 120)
  redis.call('INCR', p .. 'rd:' .. day)
  redis.call('EXPIRE', p .. 'rd:' .. day, 172800)
  redis.call('INCRBY', p .. 'tm:' .. minute, tok)
  redis.call('EXPIRE', p .. 'tm:' .. minute, 120)
  redis.call('INCRBY', p .. 'td:' .. day, tok)
  redis.call('EXPIRE', p .. 'td:' .. day, 172800)
end
return 1
"""

FINISH = """
local g, owner, epoch = ARGV[1], ARGV[2], ARGV[3]
redis.call('SET', g .. 'lease:' .. owner, 1, 'PX', ARGV[4])
redis.call('HDEL', g .. 'suspect', owner)
if redis.call('HGET', g .. 'rec', 'epoch') == epoch then
  redis.call('SADD', g .. 'rec:acks', owner)
  redis.call('PEXPIRE', g .. 'rec:acks', math.max(1, redis.call('PTTL', g .. 'rec')))
end
return redis.call('GET', g .. 'epoch') or ''
"""


def _new_owner() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(eq=False)
class _Process:
    """This process's owner id, its live tickets, and its lease thread."""

    owner: str
    pid: int
    epoch: str | None = None  # the store's epoch as of this process's last sync
    syncs: int = 0  # completed syncs (admissions that raced one skip their own)
    snapshots: int = 0  # times the live tickets were read to be published
    live: dict[tuple[int, str], Ticket] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards live
    # One sync at a time: two would publish the same tickets twice (harmless, wasted).
    sync_lock: threading.Lock = field(default_factory=threading.Lock)
    start_lock: threading.Lock = field(default_factory=threading.Lock)
    subscribed: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


_current: _Process | None = None
_create_lock = threading.Lock()
_scripts: dict[str, Any] = {}


def _process() -> _Process:
    """This process's state; a forked child starts its own (new owner, no tickets)."""
    global _current
    proc = _current
    if proc is None or proc.pid != os.getpid():
        with _create_lock:
            proc = _current
            if proc is None or proc.pid != os.getpid():
                proc = _current = _Process(owner=_new_owner(), pid=os.getpid())
    return proc


def _script(client: Any, name: str, source: str) -> Any:
    registered = _scripts.get(f"{name}:{id(client)}")
    if registered is None:
        registered = _scripts[f"{name}:{id(client)}"] = client.register_script(source)
    return registered


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- what the limiter uses ---


def admit_args() -> list[Any]:
    """ADMIT's arguments about this process: prefix, owner, epoch seen, wall clock, grace."""
    proc = _process()
    return [PREFIX, proc.owner, proc.epoch or "", int(time.time() * 1000), grace_ms()]


def owner() -> str:
    return _process().owner


def epoch() -> str:
    return _process().epoch or ""


def snapshots() -> int:
    return _process().snapshots


async def async_sync(*, force: bool = False) -> None:
    """``sync()`` from the event loop; a burst of callers gets one sync, unless ``force``."""
    seen = None if force else _process().syncs
    await asyncio.to_thread(sync, seen=seen)


def track(ticket: Ticket, *, epoch: str) -> None:
    """Keep an admitted ticket until it settles; ``epoch``: the store it was admitted in."""
    proc = _process()
    ticket.admitted_at = time.monotonic()
    ticket.epoch = epoch
    with proc.lock:
        proc.live[(ticket.key_id, ticket.request_id)] = ticket


def forget(ticket: Ticket) -> None:
    proc = _process()
    with proc.lock:
        proc.live.pop((ticket.key_id, ticket.request_id), None)


def forget_all() -> None:
    """Drop this process's live tickets without settling them (tests)."""
    proc = _process()
    with proc.lock:
        proc.live.clear()


def alive(client: Any, owners: set[str]) -> set[str]:
    """The owners among ``owners`` whose lease is current."""
    ordered = sorted(owners)
    if not ordered:
        return set()
    with client.pipeline(transaction=False) as pipe:
        for name in ordered:
            pipe.exists(PREFIX + "lease:" + name)
        found = pipe.execute()
    return {name for name, exists in zip(ordered, found, strict=True) if exists}


def sync(*, seen: int | None = None, in_thread: bool = False) -> None:
    """Publish this process's live reservations again, renew its lease, acknowledge a recovery.

    Blocking (sync Redis client, ``ledger.flush``): the event loop calls it in a
    thread.  With ``seen``, skipped if a sync completed since the caller read
    ``syncs()`` (a burst of first admissions needs only one).
    """
    from keys import ledger

    proc = _process()
    if not in_thread:
        _ensure_thread(proc)
    with proc.sync_lock:
        if seen is not None and proc.syncs != seen:
            return
        client = hotstore.sync_client()
        for _attempt in range(3):
            epoch = _epoch(client)
            _republish(client, proc, epoch)
            # Usage records queued here belong in the ledger before anyone rebuilds from it.
            ledger.flush(5.0)
            current = _text(
                _script(client, "finish", FINISH)(
                    args=[PREFIX, proc.owner, epoch, lease_ms()], client=client
                )
            )
            if current == epoch:
                proc.epoch = epoch
                proc.syncs += 1
                return
            # Lost again while publishing: publish into the new store.
        logger.warning("the limiter's store keeps changing; this worker's reservations may lag")


def _epoch(client: Any) -> str:
    """The store's epoch; when it is gone, open a recovery and announce it."""
    raw = client.get(PREFIX + "epoch")
    if raw is not None:
        return _text(raw)
    created, epoch = _script(client, "begin", BEGIN)(
        args=[PREFIX, secrets.token_hex(8), lease_ms(), _hold_ms(client)], client=client
    )
    epoch = _text(epoch)
    if int(created):
        told = client.publish(channel(client), epoch)
        _script(client, "expect", EXPECT)(args=[PREFIX, epoch, told], client=client)
        logger.warning(
            "no limiter counters in Redis (first start, or flushed or restarted empty): "
            "recovering them from %d worker(s) and the usage ledger",
            told,
        )
    return epoch


def _hold_ms(client: Any) -> int:
    """After a restart, wait until Redis has been up a lease period: workers reconnect within it."""
    try:
        uptime = int(client.info("server")["uptime_in_seconds"])
    except Exception:  # INFO refused (ACLs): assume the worst
        return lease_ms()
    return max(0, lease_ms() - uptime * 1000)


def _republish(client: Any, proc: _Process, epoch: str) -> None:
    oldest = time.monotonic() - settings.SWITCHBOARD_RESERVATION_TTL
    with proc.lock:
        # Tickets never settled (a bug elsewhere) stop being published with their TTL.
        for name in [name for name, ticket in proc.live.items() if ticket.admitted_at < oldest]:
            del proc.live[name]
        tickets = list(proc.live.values())
        # An admission that was on its way now republishes itself (limiter.aadmit).
        proc.snapshots += 1
    if not tickets:
        return
    script = _script(client, "republish", REPUBLISH)
    with client.pipeline(transaction=False) as pipe:
        for ticket in tickets:
            win = ticket.windows
            script(
                args=[
                    f"{PREFIX}{ticket.key_id}:",
                    ticket.request_id,
                    ticket.expiry_ms,
                    ticket.tokens,
                    ticket.money_nano,
                    win.period,
                    ticket.period_ttl,
                    proc.owner,
                    "1" if ticket.epoch != epoch else "0",
                    win.minute,
                    win.day,
                    epoch,
                    PREFIX,
                ],
                client=pipe,
            )
        results = pipe.execute()
    for ticket, result in zip(tickets, results, strict=True):
        if int(result) >= 0:  # published now, or already there (settled: tombstoned)
            ticket.epoch = epoch


# --- the lease thread ---


def _ensure_thread(proc: _Process) -> None:
    if proc.thread is None or not proc.thread.is_alive():
        with proc.start_lock:
            if proc.thread is None or not proc.thread.is_alive():
                proc.subscribed.clear()
                proc.thread = threading.Thread(
                    target=_run, args=(proc,), name="limiter-lease", daemon=True
                )
                proc.thread.start()
    # Subscribed before the first admission: from then on a recovery waits for us.
    proc.subscribed.wait(SUBSCRIBE_TIMEOUT)


def _run(proc: _Process) -> None:
    client = hotstore.sync_client()
    failing = False  # say so once per outage, not every retry
    while _current is proc:
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(channel(client))
            deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
            while not proc.subscribed.is_set():
                message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if message is not None and message["type"] == "subscribe":
                    proc.subscribed.set()
                elif time.monotonic() >= deadline:
                    raise TimeoutError("no subscription confirmation from Redis")
            due = 0.0
            while _current is proc:
                if time.monotonic() >= due:
                    _refresh(client, proc)
                    due = time.monotonic() + refresh_every()
                    if failing:
                        failing = False
                        logger.warning("limiter lease thread: Redis answers again")
                message = pubsub.get_message(timeout=max(0.0, due - time.monotonic()))
                if message is not None and message["type"] == "message":
                    sync(in_thread=True)
        except Exception as exc:
            proc.subscribed.clear()
            if not failing:
                failing = True
                logger.warning("limiter lease thread: %r; retrying until Redis answers", exc)
            time.sleep(min(1.0, refresh_every()))
        finally:
            pubsub.close()


def _refresh(client: Any, proc: _Process) -> None:
    had, epoch = _script(client, "lease", LEASE)(
        args=[
            PREFIX,
            proc.owner,
            lease_ms(),
            int(time.time() * 1000),
            (settings.SWITCHBOARD_RESERVATION_TTL * 1000) + lease_ms(),
        ],
        client=client,
    )
    if (not int(had) or _text(epoch) != proc.epoch) and proc.live:
        # Our lease lapsed (reservations maybe released) or the store was lost: publish
        # our requests in flight again now.  (Without any, the next admission syncs.)
        sync(in_thread=True)
