"""The usage ledger writer: records are written off the response's critical path.

Requests hand their usage record to ``submit()`` (no I/O, never blocks the event
loop).  One writer thread per process drains the queue in batches with
``bulk_create``; a failed batch is retried with backoff until it lands, never
dropped.  ``request_id`` is unique and inserts ignore conflicts, so a batch
retried after a partial failure cannot write a record twice.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from typing import Any

from django.db import close_old_connections, connection, transaction
from django.utils import timezone

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
BATCH_WAIT = 0.02  # seconds to gather a batch once the first record arrived


class LedgerWriter:
    def __init__(self) -> None:
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.pending = 0  # submitted but not yet committed
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None

    def submit(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.pending += 1
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
                self.thread.start()
        self.queue.put(record)

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

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + BATCH_WAIT
            while len(batch) < BATCH_SIZE:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            self._write_until_done(batch)
            with self.lock:
                self.pending -= len(batch)
                self.lock.notify_all()

    def _write_until_done(self, batch: list[dict[str, Any]]) -> None:
        delay = 0.1
        while True:
            try:
                write_batch(batch)
                return
            except Exception:
                logger.exception(
                    "writing %d usage records failed; retrying in %.1fs", len(batch), delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            finally:
                # Return the connection (to the pool on PostgreSQL) between batches.
                close_old_connections()
                connection.close()


def write_batch(batch: list[dict[str, Any]]) -> None:
    from keys.models import ApiKey, UsageRecord

    with transaction.atomic():
        UsageRecord.objects.bulk_create(
            [UsageRecord(**record) for record in batch], ignore_conflicts=True
        )
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


writer = LedgerWriter()
atexit.register(writer.flush, 5.0)


def submit(record: dict[str, Any]) -> None:
    record.setdefault("created_at", timezone.now())
    writer.submit(record)


def flush(timeout: float = 10.0) -> bool:
    return writer.flush(timeout)
