"""The usage ledger writer: records are written off the response's critical path.

Requests hand their usage record to ``submit()``, which appends it to this process's
journal (``keys.journal``: one JSON line, one ``write()``, no ``fsync``; 15-20 µs,
mostly the JSON encoding) and queues it.  One writer thread per process drains the
queue in batches with ``bulk_create``, then marks the journal lines as committed; once
everything in the journal is committed (or past ``ROTATE_BYTES``, under sustained
load) a new journal takes over, and the old one is removed as soon as all of its
lines are committed.  ``request_id`` is unique and inserts ignore conflicts, so
writing a record again — a retried batch, a replayed journal — never writes it twice.

Failures.  When a batch fails because of the records in it (``BAD_RECORD_ERRORS``:
a lone surrogate, a NUL on PostgreSQL, a number out of range), the batch is bisected
until each bad record is alone; each is set aside in ``DATA_DIR/ledger/rejected/``
with its error and a WARNING, and every other record lands.  (SQLite's INSERT OR
IGNORE silently skips a row that breaks a NOT NULL or CHECK constraint: ``write_batch``
checks that every record landed, so such a row is found and set aside too.)  When the
database is unreachable (``OperationalError``, ``InterfaceError``, anything else) the
batch is retried with backoff until it lands, never set aside.

Guarantees.  Once ``submit()`` has returned, the record reaches the database exactly
once, whatever happens to the process afterwards (an exception, the OOM killer,
``kill -9``): its journal line is in the kernel's page cache, the kernel drops the
journal's lock when the process dies, and the next process on the same host to start
its writer (or any live one's sweep, every ``RECOVER_EVERY`` seconds) replays the
journal and removes it.  A record the database refuses on its own is not written but
kept, with the reason, in the rejected files.  Not guaranteed: a machine crash or
power loss before the kernel writes its page cache out (usually within 30 s) loses
the journal lines of those seconds — an ``fsync`` per request would cost milliseconds;
and journals are only recovered on the host that wrote them (by host name): several
machines each recover their own journals when they restart, and the journals of a
machine that never comes back stay in its data directory until replayed from
elsewhere with ``recover(any_host=True)``.  Records reach the database within
``BATCH_WAIT`` while it is up, not at once: readers that need them now call ``flush()``.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import queue
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.db import (
    DataError,
    IntegrityError,
    close_old_connections,
    connection,
    models,
    transaction,
)
from django.utils import timezone

from keys import journal
from keys.journal import journal_dir

__all__ = ["flush", "journal_dir", "recover", "start", "submit", "write_batch"]

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
BATCH_WAIT = 0.02  # seconds to gather a batch once the first record arrived
ROTATE_BYTES = 1024 * 1024  # a journal never caught up with is replaced past this size
RECOVER_EVERY = 60.0  # seconds between sweeps for dead processes' journals
REOPEN_AFTER = 10.0  # seconds before trying again to create a journal that failed

# Errors that a record causes on its own: the record is set aside.  Anything else
# (OperationalError, InterfaceError: the database is down; ProgrammingError: the schema
# is behind) is the database's problem, and the batch waits for it to be solved.
# UnicodeEncodeError is a ValueError; TypeError is a record with an unknown field;
# decimal.InvalidOperation (an ArithmeticError) a Decimal too long for its column.
BAD_RECORD_ERRORS: tuple[type[Exception], ...] = (
    IntegrityError,
    DataError,
    ValueError,
    TypeError,
    ArithmeticError,
    ValidationError,
)

# (record, the journal holding its line or None, the end offset of that line)
Entry = tuple[dict[str, Any], journal.Journal | None, int]


class LedgerWriter:
    def __init__(self) -> None:
        self.queue: queue.Queue[Entry] = queue.Queue()
        self.pending = 0  # submitted but not yet committed
        self.batch_since: Any = None  # created_at of the batch being written (metrics: the lag)
        # Guards pending and the journals.  submit() appends and enqueues under it, so
        # the queue's order is each journal's line order: that is what lets the writer
        # say "every line before offset N is committed" after each batch.
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.journal: journal.Journal | None = None  # the one submit() appends to
        self.sealed: list[journal.Journal] = []  # replaced, removed once committed
        self.journal_retry_at = 0.0
        self.rejected = 0  # records set aside by this process
        self.next_sweep = 0.0
        # One recovery at a time in this process (the writer's sweep, recover()).
        self.recovery_lock = threading.Lock()

    def start(self) -> None:
        """Start the writer thread unless it runs (caller holds the lock)."""
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
            self.thread.start()

    def submit(self, record: dict[str, Any]) -> None:
        line = journal.encode(record)  # the CPU part, outside the lock
        with self.lock:
            self.start()
            current = self._current_journal()
            end = 0
            if current is not None:
                try:
                    end = current.append(line)
                except OSError:
                    # Disk full or the like: keep metering from memory; a new journal
                    # is tried after REOPEN_AFTER (the broken one may end in a torn line).
                    logger.exception("cannot append to the usage journal %s", current.path)
                    current.broken = True
                    current = None
                    self.journal_retry_at = time.monotonic() + REOPEN_AFTER
            self.pending += 1
            self.queue.put((record, current, end))

    def _current_journal(self) -> journal.Journal | None:
        """The journal to append to, created on first use (caller holds the lock)."""
        if self.journal is not None and not self.journal.broken:
            return self.journal
        if time.monotonic() < self.journal_retry_at:
            return None
        try:
            created = journal.Journal.create()
        except OSError:
            logger.exception(
                "cannot create a usage journal in %s; records are kept in memory only",
                journal_dir(),
            )
            self.journal_retry_at = time.monotonic() + REOPEN_AFTER
            return None
        if self.journal is not None:
            self._seal(self.journal)
        self.journal = created
        return created

    def _seal(self, old: journal.Journal) -> None:
        """No more lines go to ``old``; it goes once they are all committed (lock held)."""
        self.sealed.append(old)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every submitted record is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.lock.wait(remaining)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """At exit: flush, then remove this process's (committed) journals."""
        flushed = self.flush(timeout)
        with self.lock:
            if not flushed or self.pending:
                return  # left for the next process on this host to replay
            for old in [self.journal, *self.sealed]:
                if old is not None:
                    old.remove()
            self.journal, self.sealed = None, []

    def after_fork(self) -> None:
        """In a forked child: the parent's journals and queue stay the parent's."""
        for inherited in [self.journal, *self.sealed]:
            if inherited is not None:
                inherited.close()  # close our copy; never unlock or remove it
        self.__init__()  # type: ignore[misc]

    def own_paths(self) -> set[Path]:
        with self.lock:
            return {j.path for j in [self.journal, *self.sealed] if j is not None}

    def _run(self) -> None:
        while True:
            try:
                if time.monotonic() >= self.next_sweep:
                    self.next_sweep = time.monotonic() + RECOVER_EVERY
                    self._sweep()
                try:
                    first = self.queue.get(timeout=max(0.0, self.next_sweep - time.monotonic()))
                except queue.Empty:
                    continue
                batch = [first]
                self.batch_since = first[0].get("created_at")
                deadline = time.monotonic() + BATCH_WAIT
                while len(batch) < BATCH_SIZE:
                    try:
                        batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                    except queue.Empty:
                        break
                self._write_until_done([record for record, _journal, _end in batch])
                self._committed(batch)
                self.batch_since = None
            except Exception:
                logger.exception("the usage ledger writer failed; going on")
                time.sleep(1.0)

    def _sweep(self) -> None:
        try:
            recover()
        except Exception:
            logger.exception("recovering usage journals failed; trying again later")

    def _write_until_done(self, batch: list[dict[str, Any]]) -> None:
        """Write the batch; bad records are set aside, a database outage is waited out."""
        delay = 0.1
        rejected: set[int] = set()  # id() of records already set aside: never twice
        while True:
            try:
                self.write_isolating([r for r in batch if id(r) not in rejected], rejected)
                check_alerts(batch)
                return
            except Exception:
                logger.exception(
                    "writing %d usage records failed; retrying in %.1fs", len(batch), delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                # Return the connection (to the pool on PostgreSQL) between batches;
                # SQLite's is kept (opening one costs more than a small batch).
                close_old_connections()
                if connection.vendor != "sqlite":
                    connection.close()

    def write_isolating(self, batch: list[dict[str, Any]], rejected: set[int]) -> None:
        """Write the batch, bisecting around records that fail on their own.

        One bad record in a batch of 500 costs about 18 small transactions; the good
        halves commit as they go (a retry ignores them as conflicts).  Errors that are
        not the records' fault propagate.
        """
        if not batch:
            return
        try:
            write_batch(batch)
        except BAD_RECORD_ERRORS as exc:
            if len(batch) == 1:
                self.set_aside({"record": batch[0]}, exc, request_id=batch[0].get("request_id"))
                rejected.add(id(batch[0]))
                return
            middle = len(batch) // 2
            self.write_isolating(batch[:middle], rejected)
            self.write_isolating(batch[middle:], rejected)

    def set_aside(self, entry: dict[str, Any], error: Exception, *, request_id: object) -> None:
        self.rejected += 1
        reason = f"{type(error).__name__}: {error}"
        try:
            path = journal.set_aside({"error": reason} | entry)
        except OSError:
            # Nowhere to keep it: the log line is then the only copy.
            logger.exception(
                "usage record %a refused (%s) and could not be set aside: %s",
                request_id,
                reason,
                journal.encode(entry).decode("ascii").strip(),
            )
            return
        logger.warning(
            "usage record %a set aside in %s: %s (%d set aside by this process)",
            request_id,
            path,
            reason,
            self.rejected,
        )

    def _committed(self, batch: list[Entry]) -> None:
        """Mark the batch's journal lines committed, tidy the journals, wake flush()."""
        with self.lock:
            for _record, holder, end in batch:
                if holder is not None:
                    holder.committed = end  # queue order is line order
            current = self.journal
            replace = current is not None and (
                (current.broken and time.monotonic() >= self.journal_retry_at)
                or current.end >= ROTATE_BYTES
                or 0 < current.end <= current.committed  # all of it is in the database
            )
        # File system calls stay outside the lock (and off the event loop): they
        # release the GIL and may wait on the disk, and submit() must not wait on them.
        if replace:
            self._replace_journal()
        with self.lock:
            done = [old for old in self.sealed if old.committed >= old.end]
            self.sealed = [old for old in self.sealed if old not in done]
        for old in done:
            old.remove()
        with self.lock:
            self.pending -= len(batch)
            self.lock.notify_all()

    def _replace_journal(self) -> None:
        """Start a new journal; the old one is removed once all its lines are committed."""
        try:
            created = journal.Journal.create()
        except OSError:
            logger.exception("cannot create a usage journal in %s", journal_dir())
            return  # keep appending to the current one
        with self.lock:
            # Swapped under the lock: a line is appended to the old journal or the new
            # one, and the old one's end is final from here on.
            if self.journal is not None:
                self._seal(self.journal)
            self.journal = created


def write_batch(batch: list[dict[str, Any]]) -> None:
    from keys.models import ApiKey, UsageRecord

    rows = [UsageRecord(**record) for record in batch]
    for row in rows:
        check_decimals(row)
    with transaction.atomic():
        UsageRecord.objects.bulk_create(rows, ignore_conflicts=True)
        # SQLite's INSERT OR IGNORE skips rows that break a NOT NULL or CHECK
        # constraint, not only duplicates: a record missing now was dropped, not
        # already there.  Inserting it plainly raises the database's own error (and
        # rolls the batch back), so that it is found and set aside, never lost unseen.
        wanted = {row.request_id for row in rows}
        present = set(
            UsageRecord.objects.filter(request_id__in=wanted).values_list("request_id", flat=True)
        )
        if wanted - present:
            dropped = [row for row in rows if row.request_id not in present]
            UsageRecord.objects.bulk_create(dropped)
            raise IntegrityError(f"the database ignored {len(dropped)} usage records")
        last_used: dict[int, Any] = {}
        for record in batch:
            if record.get("key_id"):
                last_used[record["key_id"]] = max(
                    last_used.get(record["key_id"], record["created_at"]), record["created_at"]
                )
        for key_id, when in last_used.items():
            ApiKey.objects.filter(pk=key_id).exclude(last_used_at__gte=when).update(
                last_used_at=when
            )


def check_alerts(batch: list[dict[str, Any]]) -> None:
    """Budget alerts for the keys of a batch that just committed (``keys.alerts``).

    Here, in the writer thread, the check is off every request's path.  It never
    holds the ledger up: a failure is logged, and the keys' next records check again.
    """
    try:
        from keys import alerts

        alerts.check(batch)
    except Exception:
        logger.exception("checking budget alerts failed; the keys' next records check again")


def check_decimals(row: models.Model) -> None:
    """Refuse a Decimal too large for its column.

    PostgreSQL refuses it itself; SQLite would store it as a float that then breaks
    every read of the row.  Extra decimal places are rounded by both, as always.
    """
    for field in row._meta.concrete_fields:
        if isinstance(field, models.DecimalField):
            value = getattr(row, field.attname)
            if value is None:
                continue
            value = field.to_python(value)
            whole_digits = (field.max_digits or 0) - (field.decimal_places or 0)
            if not value.is_finite() or abs(value) >= Decimal(10) ** whole_digits:
                raise ValidationError(
                    f"{field.name}={value} does not fit in {whole_digits} whole digits"
                )


def decode(line: bytes) -> dict[str, Any]:
    """A journal line back to the record submit() was given (Decimals, datetimes)."""
    fields = _record_fields()
    record: dict[str, Any] = {}
    for name, value in json.loads(line).items():
        field = fields.get(name)
        record[name] = value if field is None or value is None else field.to_python(value)
    return record


@functools.cache
def _record_fields() -> dict[str, models.Field[Any, Any]]:
    """UsageRecord's fields by name and by column attribute (``user`` and ``user_id``)."""
    from keys.models import UsageRecord

    fields: dict[str, models.Field[Any, Any]] = {}
    for field in UsageRecord._meta.concrete_fields:
        fields[field.name] = fields[field.attname] = field
    return fields


def recover(*, any_host: bool = False) -> int:
    """Replay the journals of dead processes into the database; return the records read.

    Called by each writer thread when it starts and every ``RECOVER_EVERY`` seconds
    (``start()`` starts it before the first request).  Synchronous ORM: not on the
    event loop.  A journal whose owner
    is alive is never touched (its lock says so).  On a database error the journal
    is kept for the next sweep.  ``any_host=True`` also takes other hosts' journals
    (an admin replaying a dead machine's data directory).
    """
    own = writer.own_paths()
    replayed = 0
    with writer.recovery_lock:
        journal.remove_stale_temporaries()
        for path in journal.orphan_candidates(any_host=any_host):
            if path in own:
                continue
            try:
                with journal.claim(path) as fd:
                    if fd is not None:
                        replayed += _replay(path, fd)
            except Exception as exc:
                logger.warning(
                    "cannot replay the usage journal %s yet (%s: %s); it is kept",
                    path,
                    type(exc).__name__,
                    exc,
                )
                break  # the database is likely down: the next sweep tries again
            finally:
                close_old_connections()
                connection.close()
    return replayed


def _replay(path: Path, fd: int) -> int:
    count = 0
    batch: list[dict[str, Any]] = []
    rejected: set[int] = set()
    for number, line, complete in journal.read_lines(fd):
        if not complete:
            logger.warning(
                "%s: skipped the torn last line %d (%d bytes; its process died writing it)",
                path,
                number,
                len(line),
            )
            continue
        try:
            record = decode(line)
        except (ValueError, TypeError, ValidationError, AttributeError) as exc:
            writer.set_aside(
                {"journal": str(path), "line_number": number, "line": line.decode("latin-1")},
                exc,
                request_id=None,
            )
            continue
        batch.append(record)
        count += 1
        if len(batch) >= BATCH_SIZE:
            writer.write_isolating(batch, rejected)
            batch = []
    writer.write_isolating(batch, rejected)
    if count:
        logger.warning("replayed %d usage records from %s (its process died)", count, path)
    return count


writer = LedgerWriter()
atexit.register(writer.close, 5.0)
os.register_at_fork(after_in_child=lambda: writer.after_fork())


def submit(record: dict[str, Any]) -> None:
    record.setdefault("created_at", timezone.now())
    writer.submit(record)


def flush(timeout: float = 10.0) -> bool:
    return writer.flush(timeout)


def start() -> None:
    """Start this process's writer now: it first replays dead processes' journals.

    Non-blocking, safe on the event loop; otherwise the first ``submit()`` starts it.
    """
    with writer.lock:
        writer.start()
