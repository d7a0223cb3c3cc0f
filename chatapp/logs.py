"""Log lines: human-readable by default, one JSON object per line with ``LOG_FORMAT=json``.

Every line can say which request it belongs to.  The ``/v1`` views start a request's
context with the ``x-request-id`` its client gets (``begin``), and add the key's prefix
and its user once the key is known; the pipeline adds the model when it admits a call
(``bind_call``, also for the browser chat's replies).  The context lives in a
``ContextVar``: tasks and ``sync_to_async`` threads started from the request inherit
it, other requests never see it.  ``JsonFormatter`` writes it into every line.

Each relayed request leaves one line on the ``switchboard.requests`` logger when it
settles (``request_settled``), with its status and latency; ``LOG_LEVEL=WARNING`` turns
these off.  Uvicorn's own loggers are sent through the same handler (``adopt_server_loggers``);
Daphne's already propagate to it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatapp.relay.pipeline import Call

REQUESTS = logging.getLogger("switchboard.requests")

# Fields a line carries when they are known: from the context, or given with ``extra=``.
FIELDS = (
    "request_id",
    "key_prefix",
    "user_id",
    "model",
    "endpoint",
    "status",
    "http_status",
    "latency_ms",
    "ttft_ms",
    "provider",
    "input_tokens",
    "output_tokens",
    "cost",
    "error_type",
)

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: ContextVar[Mapping[str, Any]] = ContextVar("switchboard_log_context", default=_EMPTY)


def begin(request_id: str) -> None:
    """A new request in this task: its id, and nothing an earlier one bound."""
    _context.set({"request_id": request_id})


def bind(**fields: Any) -> None:
    """Add fields to this task's log context (None and empty values are left out)."""
    known = {name: value for name, value in fields.items() if value not in (None, "")}
    if known:
        _context.set({**_context.get(), **known})


def current() -> Mapping[str, Any]:
    """This task's log context."""
    return _context.get()


def _call_fields(call: Call) -> dict[str, Any]:
    principal = call.principal
    return {
        "request_id": call.request_id,
        "key_prefix": principal.prefix if principal else None,
        "user_id": call.user_id
        if call.user_id is not None
        else (principal.user_id if principal else None),
        "model": call.model,
    }


def bind_call(call: Call) -> None:
    """The context of a call being admitted: its request id, key, user and model."""
    bind(**_call_fields(call))


def request_settled(call: Call) -> None:
    """The one line of a settled call: who asked for what, how it ended, how long it took."""
    if not REQUESTS.isEnabledFor(logging.INFO):
        return
    usage = call.final_usage
    fields = _call_fields(call) | {
        "endpoint": call.endpoint,
        "status": call.status or "error",
        "http_status": call.http_status,
        "latency_ms": round((time.perf_counter() - call.started) * 1000),
        "ttft_ms": round((call.first_token_at - call.started) * 1000)
        if call.first_token_at
        else None,
        "provider": call.target.provider if call.target else None,
        "input_tokens": usage.input_tokens if usage else 0,
        "output_tokens": usage.output_tokens if usage else 0,
        "cost": str(call.cost),
        "error_type": call.error_type or None,
    }
    REQUESTS.info(
        "%s %s %s %s %s (%s) in %d ms: %d in, %d out, cost %s",
        fields["request_id"],
        call.endpoint,
        call.model or "-",
        fields["status"],
        call.http_status,
        call.principal.label if call.principal else "no key",
        fields["latency_ms"],
        fields["input_tokens"],
        fields["output_tokens"],
        fields["cost"],
        extra={name: value for name, value in fields.items() if value is not None},
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Formatting runs in the thread that logs, so this is the caller's context.
        entry.update(_context.get())
        attributes = record.__dict__
        for name in FIELDS:
            value = attributes.get(name)
            if value is not None:
                entry[name] = value
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and record.args:
            # uvicorn's access line: (client, method, path, HTTP version, status)
            entry.setdefault("http_status", record.args[-1])
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def adopt_server_loggers() -> None:
    """Send uvicorn's log lines through our handler and format (after Django set up logging).

    Uvicorn configures its loggers before it imports the app, with handlers and
    formatters of its own.  Those are dropped so that the lines propagate to the root
    logger's handler; levels stay as uvicorn's ``--log-level`` set them, and a logger
    ``--no-access-log`` silenced (no handler) stays silent.  Loggers given another
    formatter (uvicorn's ``--log-config``) are left alone.  Daphne needs nothing: it
    logs through the root logger, which Django's ``LOGGING`` configures.
    """
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        server_logger = logging.getLogger(name)
        own = [
            handler
            for handler in server_logger.handlers
            if type(handler.formatter).__module__ == "uvicorn.logging"
        ]
        if own and len(own) == len(server_logger.handlers):
            for handler in own:
                server_logger.removeHandler(handler)
            server_logger.propagate = True
