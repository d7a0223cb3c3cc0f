"""A server worker keeps the cyclic garbage collector off its long-lived objects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]


def test_loading_the_asgi_application_freezes_what_it_loaded(tmp_path: Path) -> None:
    # A fresh process, as Daphne or uvicorn starts one: the framework and our modules
    # are frozen, so a full collection under load walks only what the traffic made;
    # and such a collection comes ten times less often than Python's default.
    env = {
        **os.environ,
        "SECRET_KEY": settings.SECRET_KEY,
        "SWITCHBOARD_DATA_DIR": str(tmp_path),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    found = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gc, chatapp.asgi; print(gc.get_freeze_count(), *gc.get_threshold())",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    frozen, *thresholds = (int(value) for value in found.stdout.split())
    assert frozen > 50_000, found.stdout
    assert thresholds[2] == 100  # (the first two: Python's own)
