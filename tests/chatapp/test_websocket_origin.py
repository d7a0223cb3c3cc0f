"""The chat WebSocket answers pages of this site only: scheme, host and port must match.

A browser sends alice's session cookie with a WebSocket handshake from any page;
only the ``Origin`` header tells her chat page from another page, e.g. one served
on another port of the same machine.
"""

from __future__ import annotations

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from chatapp.asgi import application
from tests.conftest import make_user

pytestmark = pytest.mark.django_db(transaction=True)

SITE = "127.0.0.1:8000"


@pytest.fixture
async def cookie() -> str:
    """Alice's session cookie."""

    def sign_in() -> str:
        client = Client()
        client.force_login(make_user("alice@example.com"))
        return f"sessionid={client.cookies['sessionid'].value}"

    return await database_sync_to_async(sign_in)()


async def connects(
    cookie: str, origin: str | None, *, host: str = SITE, scheme: str = "ws"
) -> bool:
    """Whether alice's browser, on a page of ``origin``, gets the chat socket."""
    headers = [(b"host", host.encode()), (b"cookie", cookie.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=headers)
    communicator.scope["scheme"] = scheme
    connected, _code = await communicator.connect()
    if connected:
        await communicator.disconnect()
    return connected


async def test_a_page_of_the_site_itself_connects(cookie: str) -> None:
    assert await connects(cookie, f"http://{SITE}")


@pytest.mark.parametrize(
    ("origin", "why"),
    [
        ("http://127.0.0.1:9999", "another port on the same host"),
        ("https://127.0.0.1:8000", "another scheme"),
        ("http://localhost:8000", "another host, though an allowed one"),
        ("http://evil.example", "another site"),
        ("null", "a sandboxed frame or a local file"),
        (None, "no Origin: no browser does that, and there is no CSRF token to check instead"),
    ],
)
async def test_other_origins_are_refused(cookie: str, origin: str | None, why: str) -> None:
    assert not await connects(cookie, origin), why


async def test_a_site_on_tls_takes_its_https_page_only(cookie: str, settings) -> None:
    settings.ALLOWED_HOSTS = ["chat.example.com"]
    assert await connects(cookie, "https://chat.example.com", host="chat.example.com", scheme="wss")
    assert not await connects(
        cookie, "http://chat.example.com", host="chat.example.com", scheme="wss"
    )


async def test_a_host_outside_allowed_hosts_is_refused_even_from_its_own_page(
    cookie: str,
) -> None:
    assert not await connects(cookie, "http://evil.example", host="evil.example")


async def test_a_trusted_origin_connects(cookie: str, settings) -> None:
    # Behind a proxy that terminates TLS the page is https://… while the socket
    # reaches us as ws://…: CSRF_TRUSTED_ORIGINS vouches for it, as it does for forms.
    settings.ALLOWED_HOSTS = ["chat.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = ["https://chat.example.com", "https://*.corp.example"]
    assert await connects(cookie, "https://chat.example.com", host="chat.example.com")
    assert await connects(cookie, "https://chat.corp.example", host="chat.example.com")
    assert not await connects(cookie, "http://chat.corp.example", host="chat.example.com")
    assert not await connects(cookie, "https://chat.example.com:8443", host="chat.example.com")
