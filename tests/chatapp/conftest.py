from __future__ import annotations

from tests.gateway import fake_upstream, gateway, live_server_url  # noqa: F401 - fixtures
from tests.live import counting_upstream  # noqa: F401 - fixture
