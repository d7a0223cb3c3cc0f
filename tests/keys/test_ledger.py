"""The usage ledger: journaled before it is queued, written off the response path,
retried while the database is down, never blocked by one bad record, never twice."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import OperationalError, connection
from django.utils import timezone

from keys import journal, ledger
from keys.models import UsageRecord
from tests.services import USING_POSTGRES

pytestmark = pytest.mark.django_db(transaction=True)


def record(request_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "created_at": timezone.now(),
        "request_id": request_id,
        "endpoint": "chat.completions",
        "dialect": "openai",
        "model": "m",
        "status": "ok",
        "input_tokens": 3,
        "output_tokens": 4,
    } | fields


def rejected_entries() -> list[dict[str, Any]]:
    directory = ledger.journal_dir() / "rejected"
    return [
        json.loads(line)
        for path in sorted(directory.glob("rejected-*.jsonl"))
        for line in path.read_text(encoding="ascii").splitlines()
    ]


def rejected_ids() -> list[str]:
    return [entry["record"]["request_id"] for entry in rejected_entries() if "record" in entry]


def journals() -> list[Path]:
    return sorted(ledger.journal_dir().glob("journal-*.jsonl"))


def test_a_failed_write_is_retried_until_it_lands(monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = ledger.write_batch
    failures = {"left": 2}

    def flaky(batch: list[dict[str, Any]]) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("database is locked")
        real_write(batch)

    monkeypatch.setattr(ledger, "write_batch", flaky)
    ledger.submit(record("req_flaky"))
    assert ledger.flush(10)
    assert failures["left"] == 0
    assert UsageRecord.objects.get(request_id="req_flaky").output_tokens == 4
    assert "req_flaky" not in rejected_ids()  # an outage is waited out, never set aside


def test_a_batch_written_twice_keeps_one_record() -> None:
    ledger.write_batch([record("req_once")])
    ledger.write_batch([record("req_once"), record("req_other")])
    assert UsageRecord.objects.filter(request_id="req_once").count() == 1
    assert UsageRecord.objects.count() == 2


# --- one bad record never blocks the others ---

BAD_MODELS = [
    # (the model name, whether this database refuses it)
    pytest.param("x\ud800", True, id="lone-surrogate"),
    pytest.param("x\x00y", USING_POSTGRES, id="nul"),  # SQLite stores a NUL
]


@pytest.mark.parametrize(("model", "refused"), BAD_MODELS)
def test_a_record_the_database_refuses_is_set_aside_and_the_next_20_land(
    model: str, refused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="keys.ledger")

    # Given a record the database cannot store, submitted first, and 20 good ones
    bad_id = f"req_bad_{len(rejected_entries())}"
    ledger.submit(record(bad_id, model=model))
    for number in range(20):
        ledger.submit(record(f"req_good_{number}"))

    # When the writer has had its go
    assert ledger.flush(10), "the ledger is stuck"

    # Then the good ones landed and the bad one is set aside with its error, loudly
    assert UsageRecord.objects.filter(request_id__startswith="req_good_").count() == 20
    stored = UsageRecord.objects.filter(request_id=bad_id).exists()
    assert stored is not refused
    if refused:
        [entry] = [e for e in rejected_entries() if e.get("record", {}).get("request_id") == bad_id]
        assert entry["record"]["model"] == model  # exactly as submitted
        assert entry["error"]
        assert any(
            "set aside" in r.getMessage() and bad_id in r.getMessage() for r in caplog.records
        )

    # And metering goes on afterwards
    ledger.submit(record("req_after"))
    assert ledger.flush(10)
    assert UsageRecord.objects.filter(request_id="req_after").exists()


def test_bad_records_in_a_batch_are_found_and_only_they_are_set_aside() -> None:
    batch = [record(f"req_mixed_{n}") for n in range(50)]
    batch[7]["model"] = "x\ud800"
    batch[30]["cost"] = Decimal("1e30")  # more digits than the column takes
    batch[42]["output_tokens"] = -1  # a positive integer's CHECK constraint
    bad = {7, 30, 42}
    rejected: set[int] = set()
    ledger.writer.write_isolating(batch, rejected)
    assert rejected == {id(batch[n]) for n in bad}
    landed = set(UsageRecord.objects.values_list("request_id", flat=True))
    assert landed == {f"req_mixed_{n}" for n in range(50) if n not in bad}
    assert {f"req_mixed_{n}" for n in bad} <= set(rejected_ids())


def test_a_database_outage_during_the_search_sets_nothing_aside(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_write = ledger.write_batch
    calls = {"n": 0}

    def down_then_up(batch: list[dict[str, Any]]) -> None:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise OperationalError("server closed the connection unexpectedly")
        real_write(batch)

    monkeypatch.setattr(ledger, "write_batch", down_then_up)
    before = len(rejected_entries())
    for number in range(5):
        ledger.submit(record(f"req_outage_{number}"))
    assert ledger.flush(10)
    assert UsageRecord.objects.filter(request_id__startswith="req_outage_").count() == 5
    assert len(rejected_entries()) == before


# --- the journal ---


def test_a_record_is_journaled_before_it_is_written_and_the_journal_goes_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    real_write = ledger.write_batch

    def held(batch: list[dict[str, Any]]) -> None:
        release.wait(10)
        real_write(batch)

    monkeypatch.setattr(ledger, "write_batch", held)
    when = timezone.now()
    ledger.submit(record("req_journaled", created_at=when, cost=Decimal("0.000123456789")))
    try:
        # One journal for this process, holding the line while the database has nothing.
        [path] = ledger.writer.own_paths()
        assert path.parent == ledger.journal_dir()
        assert path.name.startswith(f"journal-{journal.host_name()}-{os.getpid()}-")
        [line] = path.read_bytes().splitlines()
        assert json.loads(line)["cost"] == "0.000123456789"
        assert ledger.decode(line) == record(
            "req_journaled", created_at=when, cost=Decimal("0.000123456789")
        )
        assert not UsageRecord.objects.filter(request_id="req_journaled").exists()
    finally:
        release.set()
    assert ledger.flush(10)
    assert UsageRecord.objects.get(request_id="req_journaled").cost == Decimal("0.000123456789")
    assert not path.exists()  # everything in it is committed
    assert all(p.stat().st_size == 0 for p in ledger.writer.own_paths())


def test_a_long_journal_is_replaced_and_removed_once_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ledger, "ROTATE_BYTES", 1)
    first = ledger.writer.own_paths()
    for number in range(30):
        ledger.submit(record(f"req_rotated_{number}"))
        if number % 10 == 9:
            assert ledger.flush(10)
    assert UsageRecord.objects.filter(request_id__startswith="req_rotated_").count() == 30
    assert len(ledger.writer.own_paths()) == 1
    assert not (first - ledger.writer.own_paths()) & set(journals())  # old ones are gone


@pytest.fixture
def _no_sweeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep this process's writer from recovering the test's journals on its own."""
    monkeypatch.setattr(ledger.writer, "next_sweep", float("inf"))
    with ledger.writer.recovery_lock:
        pass  # a sweep under way is over


def write_orphan(name: str, lines: list[bytes]) -> Path:
    """A journal as a dead process leaves it (nobody holds its lock)."""
    path = ledger.journal_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(lines))
    return path


@pytest.mark.usefixtures("_no_sweeps")
def test_a_torn_last_line_is_skipped_and_an_unreadable_one_set_aside(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = [journal.encode(record(f"req_orphan_{n}")) for n in range(3)]
    torn = journal.encode(record("req_torn"))[:25]
    path = write_orphan(
        f"journal-{journal.host_name()}-999999-0badf00d.jsonl",
        [good[0], b'{"request_id": "req_garbled", \n', good[1], good[2], torn],
    )
    caplog.set_level(logging.WARNING, logger="keys.ledger")
    assert ledger.recover() == 3
    assert UsageRecord.objects.filter(request_id__startswith="req_orphan_").count() == 3
    assert not UsageRecord.objects.filter(request_id="req_torn").exists()
    assert any("torn last line 5" in r.getMessage() for r in caplog.records)
    assert any(e.get("line_number") == 2 and "req_garbled" in e["line"] for e in rejected_entries())
    assert not path.exists()
    assert ledger.recover() == 0  # replayed once, removed


@pytest.mark.usefixtures("_no_sweeps")
def test_other_hosts_journals_are_theirs_to_recover() -> None:
    path = write_orphan(
        "journal-another-machine-4242-00c0ffee.jsonl", [journal.encode(record("req_remote"))]
    )
    assert ledger.recover() == 0
    assert path.exists()
    assert ledger.recover(any_host=True) == 1
    assert UsageRecord.objects.filter(request_id="req_remote").exists()
    assert not path.exists()


@pytest.mark.usefixtures("_no_sweeps")
def test_a_journal_is_kept_while_the_database_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_orphan(
        f"journal-{journal.host_name()}-999998-0000beef.jsonl",
        [journal.encode(record("req_waits"))],
    )

    def down(batch: list[dict[str, Any]]) -> None:
        raise OperationalError("connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(ledger, "write_batch", down)
        assert ledger.recover() == 0
    assert path.exists()
    assert "req_waits" not in rejected_ids()

    ledger.recover()
    assert UsageRecord.objects.filter(request_id="req_waits").exists()
    assert not path.exists()


# --- a process killed with SIGKILL ---

CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from decimal import Decimal

    from django.conf import settings

    settings.DATABASES["default"]["NAME"] = os.environ["LEDGER_TEST_DATABASE"]
    import django

    django.setup()
    from django.utils import timezone

    from keys import ledger

    stalled = sys.argv[1] == "stalled"
    if stalled:
        ledger.write_batch = lambda batch: threading.Event().wait()  # never commits
    count = int(sys.argv[2])
    for number in range(count):
        if not stalled and number == count // 2:
            ledger.flush()  # the first half is committed and out of the journal
        elif not stalled and number % 100 == 0:
            time.sleep(0.01)  # let the writer commit some, and not others
        ledger.submit(
            {
                "created_at": timezone.now(),
                "request_id": f"req_killed_{number}",
                "endpoint": "chat.completions",
                "dialect": "openai",
                "model": "m",
                "status": "ok",
                "output_tokens": number,
                "cost": Decimal("0.000000000001") * number,
            }
        )
    if not stalled:
        os.kill(os.getpid(), signal.SIGKILL)  # right after the last submit() returned
    print(*ledger.writer.own_paths(), flush=True)
    threading.Event().wait()
    """
)


def start_child(mode: str, count: int) -> subprocess.Popen[str]:
    env = os.environ | {
        "DJANGO_SETTINGS_MODULE": "chatapp.settings",
        # The test database, a file on SQLite (settings: DATABASES TEST NAME) or
        # PostgreSQL's test_…: the child writes where this test reads.
        "LEDGER_TEST_DATABASE": str(connection.settings_dict["NAME"]),
        "SWITCHBOARD_DATA_DIR": str(settings.DATA_DIR),
    }
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(count)],
        cwd=settings.BASE_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_all_recorded_once(count: int) -> None:
    records = UsageRecord.objects.filter(request_id__startswith="req_killed_")
    assert records.count() == count
    assert set(records.values_list("request_id", flat=True)) == {
        f"req_killed_{n}" for n in range(count)
    }
    last = records.get(request_id=f"req_killed_{count - 1}")
    assert last.output_tokens == count - 1
    assert last.cost == Decimal("0.000000000001") * (count - 1)


def test_records_of_a_process_killed_before_its_writer_commits_are_replayed_once() -> None:
    # Given a process that submitted 200 records whose writer never committed one
    child = start_child("stalled", 200)
    try:
        [path] = child.stdout.readline().split() or pytest.fail(child.stderr.read())
        assert Path(path).stat().st_size > 0

        # Its journal is never touched while it lives
        assert ledger.recover() == 0
        assert Path(path).exists()
        assert not UsageRecord.objects.filter(request_id__startswith="req_killed_").exists()
    finally:
        # When it is killed
        child.send_signal(signal.SIGKILL)
        child.wait(10)

    # Then recovery writes every record exactly once and removes the journal
    ledger.recover()
    assert_all_recorded_once(200)
    assert not Path(path).exists()
    ledger.recover()
    assert_all_recorded_once(200)


def test_records_of_a_process_killed_while_its_writer_runs_are_replayed_once() -> None:
    # Given a process that kills itself right after its last submit() returned,
    # while its writer thread may have committed some batches and not others
    child = start_child("running", 2000)
    assert child.wait(60) == -signal.SIGKILL, child.stderr.read()

    committed = UsageRecord.objects.filter(request_id__startswith="req_killed_").count()
    assert 1000 <= committed < 2000

    # When this process recovers
    ledger.recover()

    # Then every record is there exactly once
    assert_all_recorded_once(2000)
    assert not [p for p in journals() if p not in ledger.writer.own_paths()]


@pytest.mark.django_db
def test_the_ledger_keeps_no_index_another_one_covers() -> None:
    """Every relayed request writes a ledger row: each index is one more write of it."""
    import re

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's catalog")
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'keys_usagerecord'")
        definitions = [row[0] for row in cursor.fetchall()]
    assert not [d for d in definitions if "pattern_ops" in d]  # ids are looked up whole
    columns = [tuple(re.search(r"\((.*)\)", d)[1].split(", ")) for d in definitions]
    for one in columns:
        for other in columns:
            assert not (len(one) < len(other) and other[: len(one)] == one), (one, other)
    assert ("request_id",) in columns  # still unique (a batch written twice: above)
