"""One shared ``httpx.AsyncClient`` per process (per event loop), with a connection pool.

httpx's own async transport is the bottleneck at high concurrency; the aiohttp
transport (``httpx-aiohttp``) keeps the httpx API at about three times the
throughput.

The client closes with its event loop: an aiohttp session left open when its loop
ends is reported by aiohttp as "Unclosed client session" / "Unclosed connector"
when it is collected.  A loop run by ``asyncio.run`` or an ``asyncio.Runner``
(uvicorn, ``asgiref``'s ``async_to_sync``, pytest-asyncio, our commands and
tasks) cancels the tasks still pending before it closes: a task waiting for that
cancellation closes the client.  Daphne's Twisted reactor cancels nothing, so
there the reactor's shutdown closes it.

The relay's own calls (``send``) go straight to the client's transport: the
client's layers (cookies, authentication, redirects, hooks, the URL merged with a
base) do nothing for them and cost CPU on every request.  No layer keeps cookies:
an upstream's ``Set-Cookie`` is never sent back with another user's request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.cookiejar
import ssl
import sys
import weakref
from collections.abc import Iterator
from typing import Any, cast

import aiohttp
import httpx
import yarl
from httpx_aiohttp import AiohttpTransport

LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30)

# What the relay's requests say they are (httpx's client would say python-httpx).
USER_AGENT = "Switchboard"

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)
_transports: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AiohttpTransport] = (
    weakref.WeakKeyDictionary()
)
_closers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """The clients' TLS settings, as httpx's defaults (``SSL_CERT_FILE``, certifi's CAs).

    One per process, shared by every event loop's client: loading the CA bundle takes
    tens of milliseconds, which a client built on the fly spent on its event loop at
    the worker's first upstream request (``chatapp.asgi`` builds it at startup).
    """
    return httpx.create_ssl_context()


def _session() -> aiohttp.ClientSession:
    """The transport's connection pool: our limits and TLS settings, and no cookie jar."""
    connector = aiohttp.TCPConnector(
        limit=LIMITS.max_connections or 0,
        keepalive_timeout=LIMITS.keepalive_expiry,
        ssl=ssl_context(),
    )
    # (Not ``trust_env``: it reads the environment, and ~/.netrc, on every request.)
    return aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), headers={"User-Agent": USER_AGENT}
    )


def client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    existing = _clients.get(loop)
    if existing is None or existing.is_closed:
        # The pool and its limits are ``_session``'s; ``verify`` only spares the
        # transport loading the CA bundle again for a context it would not use.
        transport = AiohttpTransport(verify=ssl_context(), client=_session)
        existing = httpx.AsyncClient(
            transport=transport,
            limits=LIMITS,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            cookies=_NoCookies(),
        )
        _clients[loop] = existing
        _transports[loop] = transport
        _close_with_loop(loop, existing)
    return existing


async def send(request: httpx.Request) -> httpx.Response:
    """``request`` sent through this loop's pool, streamed: read it, then ``aclose()`` it.

    Its ``timeout`` extension (``Timeout.as_dict()``) gives its timeouts.
    """
    client()
    return await _transports[asyncio.get_running_loop()].handle_async_request(request)


# Idle connections ``preconnect`` keeps ready per upstream at most: the pool's own limit
# (more would only wait for one another).
PRECONNECT_MOST = LIMITS.max_connections or 0
# Per event loop, per origin (aiohttp's connection key): connections ``preconnect`` is opening.
_opening: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, int]] = (
    weakref.WeakKeyDictionary()
)


async def preconnect(url: str, *, wanted: int, connect_timeout: float) -> bool:
    """Open a connection to ``url``'s origin and leave it idle in the pool, for a request to come.

    Only while the pool holds fewer than ``wanted`` idle connections to that origin
    (counting those being opened; at most ``PRECONNECT_MOST``).  A chat tab that opens
    calls it (``chatapp.chat.consumers``): its first message then finds the TCP and TLS
    handshakes done.  Under a burst of first messages the connect calls were the largest
    single item of the worker's profile, and several turns of its event loop per reply.
    An idle connection is closed after ``LIMITS.keepalive_expiry`` seconds, or by the
    upstream.

    Returns whether it opened one; a connection that fails raises as a request's would.
    """
    loop = asyncio.get_running_loop()
    client()
    transport = _transports[loop]
    if not isinstance(transport.client, aiohttp.ClientSession):
        transport.client = transport.get_client()  # (as its first request would)
    session = transport.client
    connector = session.connector
    if connector is None or session.closed:
        return False
    # The key a request to this origin takes its connection by (``ClientSession.request``
    # makes the same: no proxy, the connector's TLS settings).
    request = aiohttp.ClientRequest("POST", yarl.URL(url), loop=loop, session=session)
    key = request.connection_key
    opening = _opening.setdefault(loop, {})
    idle = len(getattr(connector, "_conns", {}).get(key, ()))
    if idle + opening.get(key, 0) >= min(wanted, PRECONNECT_MOST):
        return False
    opening[key] = opening.get(key, 0) + 1
    try:
        # A new connection, made as the pool makes one for a request (``connect`` would
        # hand back an idle one first), then put with the idle ones as a finished
        # request's is.  (aiohttp's own methods: the tests count the connections made.)
        protocol = await connector._create_connection(
            request,
            [],
            aiohttp.ClientTimeout(connect=connect_timeout, sock_connect=connect_timeout),
        )
    finally:
        opening[key] -= 1
        if not opening[key]:
            del opening[key]
    if connector.closed:  # closed meanwhile (the loop's end)
        protocol.close()
        return False
    connector._release(key, protocol)
    return True


class _NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing: the shared client serves every user alike."""

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


def socket_of(response: httpx.Response) -> asyncio.Transport | None:
    """The connection a streamed response of our client reads from, while it is open.

    None for any other response (another transport, a test's), or once the body is
    read: aiohttp lets go of the connection then.  On uvloop (the workers' loop) the
    transport is uvloop's, which has asyncio's methods without deriving from its class.
    """
    stream = getattr(response.stream, "_stream", response.stream)  # (the client wraps it)
    aiohttp_response = getattr(stream, "_aiohttp_response", None)
    connection = getattr(aiohttp_response, "connection", None)
    transport = getattr(connection, "transport", None)
    if transport is None or not all(callable(getattr(transport, name, None)) for name in _READING):
        return None
    if transport.is_closing():
        return None
    return cast(asyncio.Transport, transport)


@contextlib.contextmanager
def unread(response: httpx.Response) -> Iterator[None]:
    """While the block runs, the event loop does not read ``response``'s socket (``socket_of``).

    What the upstream sends meanwhile waits in the kernel's buffer and comes in one read
    afterwards, not one wake-up of the loop and of the HTTP client's parser per piece.
    (Nothing for a response not read from a socket of our client.)
    """
    transport = socket_of(response)
    if transport is None:
        yield
        return
    transport.pause_reading()
    try:
        yield
    finally:
        if not transport.is_closing():
            transport.resume_reading()


# What ``socket_of`` needs of a transport (asyncio's or uvloop's).
_READING = ("pause_reading", "resume_reading", "is_closing", "get_protocol")


async def aclose() -> None:
    """Close this event loop's client now (server shutdown, tests)."""
    loop = asyncio.get_running_loop()
    closer = _closers.pop(loop, None)
    if closer is not None:
        closer.cancel()
    _transports.pop(loop, None)
    existing = _clients.pop(loop, None)
    if existing is not None:
        await existing.aclose()


async def _close_when_cancelled(client: httpx.AsyncClient) -> None:
    loop = asyncio.get_running_loop()
    try:
        await loop.create_future()  # never set: waits for the cancel
    finally:
        # The client refers to its loop: left in the map, neither would ever be freed.
        if _clients.get(loop) is client:
            del _clients[loop]
            _transports.pop(loop, None)
        await client.aclose()  # a no-op when aclose() closed it first


def _close_with_loop(loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> None:
    previous = _closers.pop(loop, None)
    if previous is not None:
        previous.cancel()
    _closers[loop] = loop.create_task(_close_when_cancelled(client), name="relay-http-closer")
    reactor: Any = sys.modules.get("twisted.internet.reactor")
    if reactor is not None and getattr(reactor, "_asyncioEventloop", None) is loop:
        from twisted.internet.defer import Deferred

        def close() -> Deferred[None]:
            # The reactor waits for the returned Deferred before it stops the loop.
            return Deferred.fromFuture(asyncio.ensure_future(_end_closer(loop)))

        reactor.addSystemEventTrigger("before", "shutdown", close)


async def _end_closer(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the loop's closer and wait until it has closed the client."""
    closer = _closers.pop(loop, None)
    if closer is not None:
        closer.cancel()
        await asyncio.gather(closer, return_exceptions=True)


def is_timeout(exc: httpx.HTTPError) -> bool:
    """Whether ``exc`` is a real timeout.

    httpx-aiohttp maps every aiohttp connection error, a refused connection included,
    to ``httpx.ConnectTimeout``; the underlying cause tells them apart.
    """
    cause = exc.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
        return False
    return isinstance(exc, httpx.TimeoutException)
