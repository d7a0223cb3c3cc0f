"""A server worker keeps the cyclic garbage collector off its long-lived objects."""

from __future__ import annotations

from pathlib import Path

from tests.live import fresh_python


def test_loading_the_asgi_application_freezes_what_it_loaded(tmp_path: Path) -> None:
    # A fresh process, as Daphne or uvicorn starts one: the framework and our modules
    # are frozen, so a full collection under load walks only what the traffic made;
    # and such a collection comes ten times less often than Python's default.
    found = fresh_python(
        "import gc, chatapp.asgi; print(gc.get_freeze_count(), *gc.get_threshold())", tmp_path
    )
    frozen, *thresholds = (int(value) for value in found.split())
    assert frozen > 50_000, found
    assert thresholds[2] == 100  # (the first two: Python's own)
