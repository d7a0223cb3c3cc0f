"""The one server-sent-events reader of the test suite.

``parse_sse(body)`` reads a whole SSE body the way a client does: events end at a
blank line, ``event:`` names them (``message`` when absent), several ``data:`` lines
join with newlines, comments (``:``) are skipped.  Each data that is JSON comes back
decoded; anything else (OpenAI's ``[DONE]``) as its text.  With ``strict=True`` it
also checks what our gateway promises: LF line ends, a blank line after every event,
no field but ``event`` and ``data``, and one space after each field's colon (the
``data: {...}`` of every guide, which clients that slice ``line[6:]`` rely on).

``iter_sse(lines)`` is the same reader fed line by line (``response.iter_lines()``):
it yields each event at the blank line that ends it, so a test can stop mid-stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def parse_sse(body: bytes | str, *, strict: bool = False) -> list[tuple[str, Any]]:
    text = body.decode() if isinstance(body, bytes) else body
    if strict:
        assert "\r" not in text, "the gateway ends SSE lines with LF"
        assert text.endswith("\n\n"), f"the stream must end with a blank line: {text[-80:]!r}"
    else:
        text = text.replace("\r\n", "\n")
    return list(iter_sse(text.split("\n"), strict=strict))


def iter_sse(lines: Iterable[str], *, strict: bool = False) -> Iterator[tuple[str, Any]]:
    """``(event name, data)`` for each event of ``lines`` (without their line ends).

    An event the lines leave unfinished (no blank line after it) still comes last.
    """
    name, named = "message", False
    data: list[str] = []
    for line in lines:
        if not line:
            if data or named:
                yield _event(name, data)
            name, data, named = "message", [], False
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if strict:
            assert field in ("event", "data"), f"unexpected SSE line {line!r}"
            assert value.startswith(" "), f"no space after the colon: {line!r}"
        value = value.removeprefix(" ")
        if field == "event":
            name, named = value, True
        elif field == "data":
            data.append(value)
    if data or named:
        yield _event(name, data)


def _event(name: str, data: list[str]) -> tuple[str, Any]:
    joined = "\n".join(data)
    try:
        return name, json.loads(joined)
    except ValueError:
        return name, joined


def has_event_names(body: bytes | str) -> bool:
    """Whether any event of the body is named (Anthropic streams name every event)."""
    text = body.decode() if isinstance(body, bytes) else body
    return any(line.startswith("event:") for line in text.splitlines())
