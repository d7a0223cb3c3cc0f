"""The one server-sent-events reader of the test suite.

``parse_sse(body)`` reads a whole SSE body the way a client does: events end at a
blank line, ``event:`` names them (``message`` when absent), several ``data:`` lines
join with newlines, comments (``:``) are skipped.  Each data that is JSON comes back
decoded; anything else (OpenAI's ``[DONE]``) as its text.  With ``strict=True`` it
also checks what our gateway promises: LF line ends, a blank line after every event,
and no field but ``event`` and ``data``.
"""

from __future__ import annotations

import json
from typing import Any


def parse_sse(body: bytes | str, *, strict: bool = False) -> list[tuple[str, Any]]:
    text = body.decode() if isinstance(body, bytes) else body
    if strict:
        assert "\r" not in text, "the gateway ends SSE lines with LF"
        assert text.endswith("\n\n"), f"the stream must end with a blank line: {text[-80:]!r}"
    else:
        text = text.replace("\r\n", "\n")
    events: list[tuple[str, Any]] = []
    for block in text.split("\n\n"):
        name = "message"
        data: list[str] = []
        named = False
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name, named = value, True
            elif field == "data":
                data.append(value)
            elif strict:
                raise AssertionError(f"unexpected SSE line {line!r}")
        if not data and not named:
            continue
        joined = "\n".join(data)
        try:
            events.append((name, json.loads(joined)))
        except ValueError:
            events.append((name, joined))
    return events


def has_event_names(body: bytes | str) -> bool:
    """Whether any event of the body is named (Anthropic streams name every event)."""
    text = body.decode() if isinstance(body, bytes) else body
    return any(line.startswith("event:") for line in text.splitlines())
