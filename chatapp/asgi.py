"""ASGI entry point: HTTP through Django, WebSockets through Channels.

Run with ``daphne chatapp.asgi:application`` (or uvicorn for the HTTP API).
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")

from chatapp.startup import load_settings_or_exit  # noqa: E402

load_settings_or_exit()

from django.core.asgi import get_asgi_application  # noqa: E402

# Django must be set up before anything imports models (the routing below does).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from chatapp.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
