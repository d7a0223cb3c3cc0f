"""The usage ledger's files: per-process journals and the set-aside (rejected) records.

A journal is ``DATA_DIR/ledger/journal-<host>-<pid>-<random>.jsonl``: one JSON line per
usage record (``Decimal`` as a string, datetimes in ISO 8601), appended by ``submit()``
with one ``write()`` before the record is queued.  That ``write()`` puts the line in the
kernel's page cache, which outlives the process whatever kills it, so no ``fsync``
(it would cost milliseconds per request; see ``keys.ledger`` for what that leaves out).

The owner holds an exclusive ``flock`` on its journal for its whole life.  The kernel
drops that lock when the process dies — exit, exception, OOM killer, ``kill -9`` — so
"the lock can be taken" is exactly "the owner is dead", and, unlike a pid check, it
cannot be fooled by a reused pid.  A journal is created under a hidden temporary name,
locked, then renamed, so a recoverer never sees a live journal unlocked.

Rejected records go to ``DATA_DIR/ledger/rejected/rejected-<UTC date>.jsonl``, one JSON
object a line: when, which process, the error, and the record itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings

PREFIX = "journal-"
SUFFIX = ".jsonl"


def journal_dir() -> Path:
    return Path(settings.DATA_DIR) / "ledger"


def rejected_dir() -> Path:
    return journal_dir() / "rejected"


def host_name() -> str:
    """This machine's name as it appears in journal names (no path separators)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"


def _to_json(value: object) -> object:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


# ensure_ascii (the default) escapes lone surrogates and NULs, so every record can be
# journaled: the database, not the journal, is where a bad record is caught.
_encoder = json.JSONEncoder(default=_to_json, separators=(",", ":"))


def encode(record: dict[str, Any]) -> bytes:
    """One journal line: ASCII JSON and a newline."""
    return _encoder.encode(record).encode("ascii") + b"\n"


class Journal:
    """This process's append-only journal, locked for as long as the process lives."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.end = 0  # end of the last complete line written
        self.committed = 0  # every line before this offset is in the database (or set aside)
        self.broken = False  # an append failed; the file may end with a torn line

    @classmethod
    def create(cls) -> Journal:
        directory = journal_dir()
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{host_name()}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        temporary = directory / f".{name}"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        try:
            # Lock before the name can be globbed: recovery takes an unlocked journal
            # for a dead process's.  The lock lives as long as this open file.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(temporary, directory / name)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise
        return cls(directory / name, fd)

    def append(self, line: bytes) -> int:
        """Write one line (one write() unless the disk is full); return its end offset."""
        view = memoryview(line)
        while view:
            view = view[os.write(self.fd, view) :]
        self.end += len(line)
        return self.end

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.close()

    def close(self) -> None:
        """Close without unlocking a copy shared with another process (after a fork)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


def orphan_candidates(*, any_host: bool = False) -> list[Path]:
    """Journals in the directory that may belong to dead processes (this host's by default)."""
    directory = journal_dir()
    if not directory.is_dir():
        return []
    host = host_name()
    found = []
    for path in sorted(directory.glob(f"{PREFIX}*{SUFFIX}")):
        owner = path.name[len(PREFIX) : -len(SUFFIX)].rsplit("-", 2)[0]
        if any_host or owner == host:
            found.append(path)
    return found


@contextlib.contextmanager
def claim(path: Path) -> Iterator[int | None]:
    """Lock a dead process's journal: yields its fd, or None if its owner is alive.

    The journal is removed when the block ends without an exception; on an exception
    it stays (unlocked) for the next attempt.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None  # its owner is alive (or another recoverer has it)
            return
        # Another recoverer may have replayed and removed it between our open and our
        # lock; then the name is gone or names a newer file.
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(fd).st_ino:
            yield None
            return
        yield fd
        path.unlink()  # still holding the lock: nobody can replay it a second time
    finally:
        os.close(fd)


def read_lines(fd: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, complete) for each line; the last one may be torn."""
    with os.fdopen(os.dup(fd), "rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, line, line.endswith(b"\n")


def remove_stale_temporaries(min_age: float = 60.0) -> None:
    """Drop journals whose creator died between creating and naming them (always empty).

    Only old ones: a creator holds no lock for the instant between its open() and its
    flock(), and its file must not vanish then.
    """
    directory = journal_dir()
    if not directory.is_dir():
        return
    for path in directory.glob(f".{PREFIX}*{SUFFIX}"):
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > min_age:
            with claim(path):
                pass  # removed unless its creator is alive


def set_aside(entry: dict[str, Any]) -> Path:
    """Append one rejected record to today's dead-letter file; return the file."""
    directory = rejected_dir()
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    path = directory / f"rejected-{now.date().isoformat()}{SUFFIX}"
    line = encode({"rejected_at": now, "host": host_name(), "pid": os.getpid()} | entry)
    # O_APPEND: several processes append whole lines to the same file safely.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path
