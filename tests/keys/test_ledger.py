"""The usage ledger: written off the response path, retried until it lands, never twice."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import OperationalError
from django.utils import timezone

from keys import ledger
from keys.models import UsageRecord

pytestmark = pytest.mark.django_db(transaction=True)


def record(request_id: str) -> dict[str, Any]:
    return {
        "created_at": timezone.now(),
        "request_id": request_id,
        "endpoint": "chat.completions",
        "dialect": "openai",
        "model": "m",
        "status": "ok",
        "input_tokens": 3,
        "output_tokens": 4,
    }


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


def test_a_batch_written_twice_keeps_one_record() -> None:
    ledger.write_batch([record("req_once")])
    ledger.write_batch([record("req_once"), record("req_other")])
    assert UsageRecord.objects.filter(request_id="req_once").count() == 1
    assert UsageRecord.objects.count() == 2
