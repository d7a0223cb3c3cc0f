"""Browser-facing defences Django does not give us as we need them.

A strict Content-Security-Policy on every page (Django 5.2 has none built in).
No inline scripts or styles anywhere: scripts and styles come from our own static
files, images from our own attachment URLs (and data:/blob: for previews), and
connections only to our own origin (the chat's WebSocket included).

A same-origin check for WebSockets.  A browser sends the session cookie with a
WebSocket handshake from any page, and no CSRF token comes with it, so the
``Origin`` header is the only thing that tells our own page from someone else's.
Channels' ``AllowedHostsOriginValidator`` compares only the host name (a page on
another port of the same host passes); ``SameOriginValidator`` compares the whole
origin the way Django's CSRF check does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from asgiref.sync import iscoroutinefunction
from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.decorators import sync_and_async_middleware
from django.utils.http import is_same_domain

POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self' ws: wss:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


@sync_and_async_middleware
def content_security_policy(get_response: Callable[[Any], Any]) -> Callable[[Any], Any]:
    if iscoroutinefunction(get_response):

        async def async_middleware(request: Any) -> Any:
            response = await get_response(request)
            response.headers.setdefault("Content-Security-Policy", POLICY)
            return response

        return async_middleware

    def middleware(request: Any) -> Any:
        response = get_response(request)
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response

    return middleware


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return bytes(value).decode("latin1")
    return None


def is_same_origin(scope: dict[str, Any]) -> bool:
    """Whether a WebSocket handshake comes from a page of this site (or a trusted origin).

    As Django's CSRF check for a POST: the ``Host`` must be one of ``ALLOWED_HOSTS``
    (else Django answers 400), and ``Origin`` must equal the site's own origin —
    scheme (``ws`` → ``http``, ``wss`` → ``https``), host and port — or match
    ``CSRF_TRUSTED_ORIGINS`` (``https://*.example.com`` covers subdomains).

    A handshake without ``Origin`` is refused: browsers always send it on
    WebSockets, and unlike a form POST there is no CSRF token to fall back on, so
    a missing one cannot be told from a forged one.  A script that opens the socket
    itself (``.ci/chat_load.py``) sets the header.
    """
    host = _header(scope, b"host")
    origin = _header(scope, b"origin")
    if not host or not origin:
        return False
    allowed_hosts = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed_hosts:  # as HttpRequest.get_host()
        allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]
    domain, _port = split_domain_port(host)
    if not domain or not validate_host(domain, allowed_hosts):
        return False
    scheme = "https" if scope.get("scheme") == "wss" else "http"
    if origin == f"{scheme}://{host}" or origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    return any(
        parsed.scheme == trusted.scheme and is_same_domain(parsed.netloc, trusted.netloc[1:])
        for trusted in map(urlsplit, settings.CSRF_TRUSTED_ORIGINS)
        if trusted.netloc.startswith("*")
    )


class SameOriginValidator:
    """ASGI middleware: WebSocket handshakes from other origins are closed (403)."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            raise ValueError("SameOriginValidator guards WebSocket connections only")
        if is_same_origin(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)
