"""Early pytest plugin (``-p tests.services``): point the settings at the test services.

``TEST_DATABASE_URL`` / ``TEST_REDIS_URL`` are mapped onto ``DATABASE_URL`` /
``REDIS_URL`` before pytest-django imports the settings, so the same suite runs on
the embedded defaults or against PostgreSQL and Redis.  Each run gets its own data
directory so tests never touch a developer's ``./data``.
"""

from __future__ import annotations

import os
import tempfile

for _name in ("DATABASE_URL", "REDIS_URL"):
    os.environ.pop(_name, None)
    _value = os.environ.get(f"TEST_{_name}")
    if _value:
        os.environ[_name] = _value

os.environ["SWITCHBOARD_DATA_DIR"] = tempfile.mkdtemp(prefix="switchboard-test-")
os.environ.setdefault("DEBUG", "false")

USING_POSTGRES = bool(os.environ.get("DATABASE_URL"))
USING_REDIS = bool(os.environ.get("REDIS_URL"))
