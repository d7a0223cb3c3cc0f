"""Shared state read on every request: key principals, the catalog version, limiter counters.

With ``REDIS_URL`` it lives in Redis, read through one ``redis.asyncio`` client per
event loop (no thread hop, unlike Django's cache API whose async methods run the
sync client in a thread).  Without Redis (the single-process embedded mode) it is
a plain in-process dictionary.  Writes from synchronous code (signals, commands)
use a synchronous client.

In the embedded mode other processes (``manage.py key revoke``, ``model disable``…)
cannot reach the server's dictionary, so they announce their changes through a
version file in the data directory instead: a synchronous ``set`` or ``delete`` of
a key under ``SHARED_PREFIXES`` replaces it once the transaction commits, and every
read of such a key first compares the file's ``os.stat`` with the last one seen
(under two microseconds).  When it changed, the process drops its own entries under
those prefixes — cached principals, the catalog version — and reloads them from the
database; other entries (chat stream snapshots, stop flags) are this process's
alone and stay.

Values are pickled: only this process family writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from django.conf import settings
from django.db import transaction

PREFIX = "switchboard:hot:"
MAX_CONNECTIONS = 50  # per process and event loop

# Keys that processes other than the server change (keys.auth's principals, the
# catalog version of chatapp.relay.catalog); in the embedded mode their sync writes
# bump VERSION_FILE (in settings.DATA_DIR) and readers drop them when it changed.
SHARED_PREFIXES = ("apikey:", "catalog:")
VERSION_FILE = "hotstore.version"

# The shared key this task last missed, and the generation it missed it in (see add).
_missed: ContextVar[tuple[str, int] | None] = ContextVar("hotstore_missed", default=None)


class _Local:
    """In-process store with per-key expiry, for the embedded mode."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[float | None, Any]] = {}
        self.lock = threading.Lock()
        # The version file's (inode, mtime) when last looked at, and how many times
        # it was seen to change: another process's change drops the shared keys.
        self.stamp: tuple[int, int] | None = None
        self.generation = 0
        self.data_dir: Any = None
        self.version_path = ""

    def sync_shared(self) -> None:
        """Drop the shared keys if another process changed them since the last look."""
        # Joined once: this runs on every request, where each microsecond shows.
        if settings.DATA_DIR is not self.data_dir:
            self.data_dir = settings.DATA_DIR
            self.version_path = os.path.join(self.data_dir, VERSION_FILE)
        try:
            st = os.stat(self.version_path)
        except FileNotFoundError:
            return  # nothing was ever changed outside this process
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp == self.stamp:
            return
        with self.lock:
            self.stamp = stamp
            self.generation += 1
            # list(): a consistent copy of the keys even while other threads write.
            for key in list(self.data):
                if key.startswith(SHARED_PREFIXES):
                    self.data.pop(key, None)

    def get(self, key: str) -> Any:
        entry = self.data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires is not None and expires < time.monotonic():
            self.data.pop(key, None)
            return None
        return value

    def set(self, key: str, value: Any, ttl: float | None) -> None:
        self.data[key] = (time.monotonic() + ttl if ttl else None, value)

    def add(self, key: str, value: Any, ttl: float | None) -> None:
        missed = _missed.get()
        with self.lock:
            # A reader that missed this key, then loaded it from the database while
            # another process committed a change and this process dropped the shared
            # keys, holds a value that may predate the change: it must not cache it
            # (Redis closes the same race with the writer's fresh write after commit).
            if missed is not None and missed[0] == key and missed[1] != self.generation:
                return
            if self.get(key) is None:
                self.set(key, value, ttl)

    def append(self, key: str, values: list[Any], ttl: float | None) -> None:
        items = self.get(key)
        if items is None:
            items = []
        items.extend(values)
        self.set(key, items, ttl)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.data.pop(key, None)

    def clear(self) -> None:
        self.data.clear()


class _Pipeline:
    """Commands of every task of an event loop, sent together: one round trip at a time.

    Every read and write of the hot store goes through it (``aget``, ``aset``,
    ``aappend``...; the limiter's scripts use the client directly).

    The chat's publications (a reply's frames appended to its snapshot and published
    to its conversation's tabs) are many small writes from hundreds of tasks at once.
    One at a time, each cost a round trip: about 0.3 ms of the worker's CPU and a
    turn of its event loop, and Channels' Redis layer let only one publication of the
    process be in flight at a time (a lock around every ``PUBLISH``).  Here whatever
    the tasks queue while a round trip is under way goes out in the next one, as one
    pipeline: a quarter of the CPU per publication, and none waits behind more than
    one round trip.  Each task's commands stay together and in order (Redis runs a
    connection's commands in the order sent); unlike MULTI, other clients' commands
    may fall between them.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.waiting: list[tuple[Callable[[Any], None], asyncio.Future[list[Any]]]] = []
        self.sending = False
        self.task: asyncio.Task[None] | None = None  # (held: the loop keeps only a weak one)
        self.round_trips = 0

    def submit(self, queue: Callable[[Any], None]) -> asyncio.Future[list[Any]]:
        """``queue(pipeline)`` adds commands; the future gets their replies."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self.waiting.append((queue, future))
        if not self.sending:
            self.sending = True
            self.task = loop.create_task(self._send())
        return future

    async def _send(self) -> None:
        try:
            while self.waiting:
                batch, self.waiting = self.waiting, []
                pipe = self.client.pipeline(transaction=False)
                counts = []
                for queue, future in batch:
                    before = len(pipe)
                    try:
                        queue(pipe)
                    except Exception as exc:  # nothing of it was sent
                        del pipe.command_stack[before:]
                        future.set_exception(exc)
                    counts.append(len(pipe) - before)
                self.round_trips += 1
                try:
                    replies = await pipe.execute(raise_on_error=False) if len(pipe) else []
                except Exception as exc:
                    for _queue, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for (_queue, future), count in zip(batch, counts, strict=True):
                    own = replies[start : start + count]
                    start += count
                    if future.done():  # failed above, or its task gave up waiting
                        continue
                    error = next((r for r in own if isinstance(r, Exception)), None)
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(own)
        finally:
            self.sending = False


_local = _Local()
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
    weakref.WeakKeyDictionary()
)
_pipelines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pipeline] = (
    weakref.WeakKeyDictionary()
)
_sync_client: Any = None


def _redis_url() -> str | None:
    return settings.REDIS_URL


def is_remote() -> bool:
    """Whether a read is a round trip to Redis (else in this process: it never waits)."""
    return _redis_url() is not None


def _required_url() -> str:
    url = settings.REDIS_URL
    assert url is not None, "the Redis clients are only used when REDIS_URL is set"
    return url


def async_client() -> Any:
    """This event loop's ``redis.asyncio`` client (Redis mode only)."""
    import redis.asyncio

    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        # A blocking pool: under a burst, requests wait (up to 5 s) for one of a
        # bounded number of connections instead of failing.
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            _required_url(),
            max_connections=MAX_CONNECTIONS,
            timeout=5,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        client = redis.asyncio.Redis(connection_pool=pool)
        _async_clients[loop] = client
    return client


def pipeline() -> _Pipeline:
    """This event loop's shared pipeline (Redis mode only): see ``_Pipeline``."""
    loop = asyncio.get_running_loop()
    shared = _pipelines.get(loop)
    if shared is None:
        shared = _pipelines[loop] = _Pipeline(async_client())
    return shared


def sync_client() -> Any:
    global _sync_client
    if _sync_client is None:
        import redis

        _sync_client = redis.Redis.from_url(
            _required_url(), socket_timeout=5, socket_connect_timeout=5
        )
    return _sync_client


def _bump_version() -> None:
    """Tell the other processes that shared keys changed: a new version file.

    Written aside and renamed over the old one (readers never see it half-done; it
    only needs the data directory writable, not ownership of the old file), with an
    mtime set strictly after the previous one: two bumps within one tick of the
    kernel's file clock must still look different.
    """
    path = os.path.join(settings.DATA_DIR, VERSION_FILE)
    try:
        previous = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        previous = 0
    stamp = max(time.time_ns(), previous + 1)
    fd, temp = tempfile.mkstemp(dir=settings.DATA_DIR, prefix=f".{VERSION_FILE}.")
    try:
        with open(fd, "wb") as handle:
            handle.write(b"%d\n" % stamp)
        os.utime(temp, ns=(stamp, stamp))
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _changed_shared(keys: tuple[str, ...]) -> None:
    if any(key.startswith(SHARED_PREFIXES) for key in keys):
        # After commit: a process that reloads on the bump must find the new rows.
        # (Outside a transaction, and in on_commit callbacks, this bumps at once.)
        transaction.on_commit(_bump_version)


async def aget(key: str) -> Any:
    if _redis_url() is None:
        if not key.startswith(SHARED_PREFIXES):
            return _local.get(key)
        _local.sync_shared()
        value = _local.get(key)
        if value is None:
            _missed.set((key, _local.generation))
        return value
    (raw,) = await pipeline().submit(lambda pipe: pipe.get(PREFIX + key))
    return None if raw is None else pickle.loads(raw)


def get(key: str) -> Any:
    """``aget`` from synchronous code."""
    if _redis_url() is None:
        if key.startswith(SHARED_PREFIXES):
            _local.sync_shared()
        return _local.get(key)
    raw = sync_client().get(PREFIX + key)
    return None if raw is None else pickle.loads(raw)


async def aset(key: str, value: Any, ttl: float | None = None) -> None:
    if _redis_url() is None:
        _local.set(key, value, ttl)
        return
    raw = pickle.dumps(value)
    await pipeline().submit(lambda pipe: pipe.set(PREFIX + key, raw, ex=int(ttl) if ttl else None))


async def aadd(key: str, value: Any, ttl: float | None = None) -> None:
    """Set ``key`` only if it is absent (so a slow reader cannot overwrite a fresher write)."""
    if _redis_url() is None:
        _local.add(key, value, ttl)
        return
    raw = pickle.dumps(value)
    await pipeline().submit(
        lambda pipe: pipe.set(PREFIX + key, raw, ex=int(ttl) if ttl else None, nx=True)
    )


async def aappend(
    key: str,
    values: list[Any],
    ttl: float | None = None,
    *,
    read: str | None = None,
    publish: Sequence[tuple[str, bytes]] = (),
) -> Any:
    """Append ``values`` to the list at ``key`` and (re)start its time to live.

    Cost in proportion to what is appended, not to the list's length: a reply's
    text so far grows piece by piece without being rewritten.  ``read``: a key of
    this process family's own to read in the same round trip; its value is returned.
    ``publish``: Redis pub/sub messages ``(channel, message)`` sent after the append,
    in the same round trip (Redis mode only).
    """
    if _redis_url() is None:
        assert not publish, "Redis pub/sub messages need REDIS_URL"
        if values:
            _local.append(key, values, ttl)
        return None if read is None else _local.get(read)
    if not values and read is None and not publish:
        return None
    pieces = [pickle.dumps(value) for value in values]

    def queue(pipe: Any) -> None:
        if pieces:
            pipe.rpush(PREFIX + key, *pieces)
            if ttl:
                pipe.expire(PREFIX + key, int(ttl))
        if read is not None:
            pipe.get(PREFIX + read)
        for channel, message in publish:
            pipe.publish(channel, message)

    replies = await pipeline().submit(queue)
    raw = replies[len(replies) - len(publish) - 1] if read is not None else None
    return None if raw is None else pickle.loads(raw)


async def apublish(channel: str, message: bytes) -> None:
    """``PUBLISH`` through the shared pipeline (Redis mode only: ``chatapp.layers``)."""
    await pipeline().submit(lambda pipe: pipe.publish(channel, message))


def _appending(pipe: Any, key: str, values: list[Any], ttl: float | None) -> Any:
    """The pipeline (sync or async) with the commands of an append queued."""
    pipe.rpush(PREFIX + key, *(pickle.dumps(value) for value in values))
    if ttl:
        pipe.expire(PREFIX + key, int(ttl))
    return pipe


async def arange(key: str) -> list[Any]:
    """The list at ``key`` (empty when there is none)."""
    if _redis_url() is None:
        return list(_local.get(key) or ())
    (items,) = await pipeline().submit(lambda pipe: pipe.lrange(PREFIX + key, 0, -1))
    return [pickle.loads(raw) for raw in items]


async def adelete(*keys: str) -> None:
    """Delete keys of this process's own (not ``SHARED_PREFIXES``: see ``delete``)."""
    if _redis_url() is None:
        _local.delete(list(keys))
        return
    if not keys:
        return
    names = [PREFIX + key for key in keys]
    await pipeline().submit(lambda pipe: pipe.delete(*names))


def set(key: str, value: Any, ttl: float | None = None) -> None:  # noqa: A001 - mirrors aset
    if _redis_url() is None:
        _local.set(key, value, ttl)
        _changed_shared((key,))
        return
    sync_client().set(PREFIX + key, pickle.dumps(value), ex=int(ttl) if ttl else None)


def append(key: str, values: list[Any], ttl: float | None = None) -> None:
    """``aappend`` from synchronous code (keys of this process family's own)."""
    if _redis_url() is None:
        _local.append(key, values, ttl)
        return
    with sync_client().pipeline(transaction=True) as pipe:
        _appending(pipe, key, values, ttl).execute()


def delete(*keys: str) -> None:
    if not keys:
        return
    if _redis_url() is None:
        _local.delete(list(keys))
        _changed_shared(keys)
        return
    sync_client().delete(*(PREFIX + key for key in keys))


def clear() -> None:
    """Drop everything (tests)."""
    if _redis_url() is None:
        _local.clear()
        return
    client = sync_client()
    for key in client.scan_iter(PREFIX + "*"):
        client.delete(key)


async def aclose() -> None:
    _pipelines.pop(asyncio.get_running_loop(), None)
    client = _async_clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()
