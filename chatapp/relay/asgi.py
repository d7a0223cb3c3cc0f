"""A lean ASGI entry for ``/v1``: Django's views and URL resolver without its request cycle.

Django's ASGI handler wraps every request in a thread-sensitive context and runs
the synchronous ``request_started``/``request_finished`` receivers and any sync
middleware in worker threads: a new thread per request.  The API needs none of
that (no sessions, CSRF, locale or messages; its only database access goes
through ``database_sync_to_async``), so this app resolves the path, builds the
``HttpRequest`` and sends the view's response itself.  It measured about 2x the
throughput of the full handler on the same views (README, "Benchmarks").

Client disconnects are handled as Django does: a disconnect cancels the response
task, and a streaming body is closed so its ``finally`` (settlement) runs at once.

A server shutting down (``chatapp.shutdown``) waits for each request, and cuts the
ones still running when its drain time is over: a response not yet started becomes
a 503, a stream ends with the dialect's in-stream error event.  Either way the
client gets a clean end, and the pipeline records the call as interrupted.

A body over ``SWITCHBOARD_MAX_BODY_BYTES`` is refused with 413 (and
``Connection: close``) without reading it: at once when its ``Content-Length`` says
so, as soon as it passes the limit when it comes chunked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from io import BytesIO
from typing import Any

from django.conf import settings
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponseBase
from django.urls import Resolver404, resolve

from chatapp import logs, shutdown
from chatapp.relay.dialects import HttpDialect, detect
from chatapp.relay.errors import RelayError, body_too_large

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Any
Send = Any


class _Disconnected(Exception):
    pass


def _declared_length(scope: Scope) -> int | None:
    """The request's ``Content-Length``, when it has a usable one."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() else None
    return None


async def _read_body(receive: Receive, limit: int) -> BytesIO | None:
    """The request body, or None as soon as it goes over ``limit`` (the rest is not read)."""
    body = BytesIO()
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        body.write(chunk)
        if not message.get("more_body", False):
            break
    body.seek(0)
    return body


def _headers(response: HttpResponseBase) -> list[tuple[bytes, bytes]]:
    return [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()]


async def _send_plain(send: Send, response: HttpResponseBase) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": _headers(response),
        }
    )
    await send({"type": "http.response.body", "body": response.content})  # type: ignore[attr-defined]


async def _send_stream(send: Send, response: Any) -> None:
    async for chunk in response.streaming_content:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _close_source(response: Any) -> None:
    """Close the view's own async generator so its ``finally`` runs now, not at GC."""
    source = getattr(response, "source", None)
    if source is not None:
        with contextlib.suppress(Exception):
            await source.aclose()


def _dialect(scope: Scope) -> HttpDialect:
    """Whose error body to answer with, before the view (which knows for sure) runs."""
    headers = {
        name.decode("latin1").lower(): value.decode("latin1")
        for name, value in scope.get("headers", ())
    }
    return detect(scope["path"], headers)


async def _send_too_large(send: Send, scope: Scope, size: int | None) -> None:
    from chatapp.relay.pipeline import new_request_id
    from chatapp.relay.views import error_response

    error = body_too_large(settings.SWITCHBOARD_MAX_BODY_BYTES, size)
    response = error_response(error, _dialect(scope), new_request_id())
    response["Connection"] = "close"
    await _send_plain(send, response)


def _interrupted() -> RelayError:
    return RelayError(
        503,
        "The server is restarting: this request was interrupted (what was produced is billed). "
        "Try again.",
        type="overloaded_error",
        code="server_shutting_down",
    )


async def _send_interrupted(send: Send, dialect: HttpDialect) -> None:
    """The end of a stream cut by a shutdown: the dialect's in-stream error event."""
    renderer = dialect.stream_renderer(model="", request_id="", include_usage=False)
    for piece in renderer.error(_interrupted()):
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def api_app(scope: Scope, receive: Receive, send: Send) -> None:
    from chatapp.relay.pipeline import new_request_id
    from chatapp.relay.views import error_response, unknown_endpoint

    limit = settings.SWITCHBOARD_MAX_BODY_BYTES
    # A declared length over the limit is refused before a byte of the body is read;
    # a chunked body (no length) as soon as it passes the limit.  Either way the 413
    # asks the server to close the connection rather than drain the rest.
    declared = _declared_length(scope)
    if declared is not None and declared > limit:
        await _send_too_large(send, scope, declared)
        return
    try:
        body = await _read_body(receive, limit)
    except _Disconnected:
        return
    if body is None:
        await _send_too_large(send, scope, None)
        return
    request = ASGIRequest(scope, body)
    dialect = _dialect(scope)
    with shutdown.in_flight() as flight:
        try:
            match = resolve(request.path_info)
            response = await match.func(request, *match.args, **match.kwargs)
        except Resolver404:
            response = unknown_endpoint(request)
        except asyncio.CancelledError:
            if not flight.cut:
                raise
            # Cut by a shutdown before the response started (the pipeline settled
            # the call as interrupted): answer, rather than drop the connection.
            flight.task.uncancel()
            response = error_response(
                _interrupted(), dialect, logs.current().get("request_id") or new_request_id()
            )
            response["Connection"] = "close"
        except Exception:
            logger.exception("unhandled error in %s", request.path)
            response = error_response(
                RelayError(500, "Internal error in the gateway.", type="api_error"),
                dialect,
                logs.current().get("request_id") or new_request_id(),
            )

        if not getattr(response, "streaming", False):
            flight.target = None  # only sending is left: nothing to cut
            await _send_plain(send, response)
            return
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": _headers(response),
            }
        )
        # Stream while listening for a disconnect; whichever ends first cancels the other.
        sender = asyncio.ensure_future(_send_stream(send, response))
        flight.target = sender  # a shutdown's cut cancels the stream, not this task
        listener = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, listener):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await _close_source(response)
        if flight.cut and sender.cancelled() and listener.cancelled():
            # The drain time is over, the client is still there: end the stream cleanly.
            await _send_interrupted(send, dialect)
            return
    if sender.done() and not sender.cancelled() and sender.exception() is not None:
        logger.warning("stream for %s ended with %r", request.path, sender.exception())
