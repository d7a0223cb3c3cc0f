"""Server-sent events: reading an upstream's stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx

from chatapp.relay import http as relay_http


class _Parser:
    """Lines in, (event name, data) pairs out, as the format says."""

    def __init__(self) -> None:
        self.name = "message"
        self.data: list[str] = []

    def feed(self, lines: list[bytes]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for raw in lines:
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if not line:
                if self.data:
                    out.append((self.name, "\n".join(self.data)))
                self.name, self.data = "message", []
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "data":
                self.data.append(value)
            elif field == "event":
                self.name = value
        return out

    def end(self, rest: bytes) -> list[tuple[str, str]]:
        """The stream ended (after ``rest``, an unterminated last line): the last event."""
        self.feed([rest] if rest else [])
        return [(self.name, "\n".join(self.data))] if self.data else []


async def _rest(response: httpx.Response, delay: float) -> None:
    """Let ``delay`` seconds pass without reading the response's socket (``http.unread``)."""
    with relay_http.unread(response):
        await asyncio.sleep(delay)


async def events(
    response: httpx.Response, pace: Callable[[], float] | None = None
) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) pairs; the name is "message" when the stream gives none.

    Lines end with CRLF, LF or CR, as the format allows.  ``pace``: seconds to let
    pass before reading on, asked after each read whose events were all handed out.
    What the upstream sends meanwhile waits in the connection's buffer and comes in
    one read: a reader with no use for every piece the moment it arrives (the
    browser chat publishes a reply's text a few times a second) then pays one
    wake-up for several pieces, not one each.
    """
    parser = _Parser()
    pending = b""
    async for chunk in response.aiter_bytes():
        lines = (pending + chunk).splitlines(keepends=True)
        # An unfinished last line waits for the rest; so does one ending in CR, whose
        # LF may be the next read's first byte.
        pending = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        for event in parser.feed(lines):
            yield event
        if pace is not None:
            delay = pace()
            if delay > 0:
                await _rest(response, delay)
    for event in parser.end(pending):
        yield event
