"""ASGI entry point: ``/v1`` through the lean API app, other HTTP through Django, WebSockets through Channels.

Run with ``daphne chatapp.asgi:application`` (or uvicorn for the HTTP API; see the
README's benchmarks for which to use where).
"""

from __future__ import annotations

import gc
import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")

from chatapp.startup import load_settings_or_exit  # noqa: E402

load_settings_or_exit()

from django.core.asgi import get_asgi_application  # noqa: E402

from chatapp.staticfiles import StaticFilesHandler  # noqa: E402

# Django must be set up before anything imports models (the routing below does).
django_asgi_app = StaticFilesHandler(get_asgi_application())

from chatapp import logs, shutdown  # noqa: E402

# Django has configured logging: uvicorn's loggers now go through our handler too.
logs.adopt_server_loggers()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chatapp.chat.routing import websocket_urlpatterns  # noqa: E402
from chatapp.relay import http as relay_http  # noqa: E402
from chatapp.relay.asgi import api_app  # noqa: E402
from chatapp.security import SameOriginValidator  # noqa: E402
from keys import ledger  # noqa: E402

_ledger_started = False


async def http_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _ledger_started
    if not _ledger_started:
        # The first request of a worker starts its ledger writer, which first replays
        # the usage journals of processes that died on this host (at import it would
        # run before a test runner or a management command has chosen its database).
        _ledger_started = True
        ledger.start()
        # SIGTERM drains this worker (also without uvicorn's lifespan, and under Daphne).
        shutdown.install()
    if scope["path"].startswith("/v1/"):
        await api_app(scope, receive, send)
    else:
        await django_asgi_app(scope, receive, send)


application = ProtocolTypeRouter(
    {
        "http": http_app,
        # uvicorn: SIGTERM handling from startup; its shutdown waits for our drain.
        "lifespan": shutdown.lifespan,
        "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)

# The upstreams' TLS settings (the CA bundle) are loaded now, not on the event loop
# by the worker's first request to an upstream, in front of every other.
relay_http.ssl_context()

# Everything loaded so far (Django, Channels, our modules: over 100,000
# objects) lives as long as the process.  Frozen, the cyclic garbage collector stops
# walking it: each full collection took 50-75 ms with the GIL held (a pause for every
# socket of the worker), two or three of them in a burst of 200 chat sends; now
# 10-30 ms (measured with gc.callbacks; .ci/chat_load.py: first delta p50 -25 %).
gc.collect()
gc.freeze()
# What the traffic makes lives on too (the open sockets and their consumers, each
# reply's state while it streams), and a burst of chat sends still set off a full
# collection that walked all of it: 35-45 ms with the GIL held, in the middle of the
# burst.  A full collection is now considered after 100 collections of the middle
# generation instead of 10: ten times less often, still regularly.  (200 sends, runs
# in turns: first delta p50 0.40 -> 0.36 s embedded, 0.48 -> 0.41 s with Redis.)
FULL_COLLECTION_AFTER = 100
gc.set_threshold(*gc.get_threshold()[:2], FULL_COLLECTION_AFTER)
