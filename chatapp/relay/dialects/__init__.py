"""Client dialects: how a client's request is read and its answer written.

``openai`` and ``anthropic`` are the HTTP dialects of ``/v1``; ``browser`` is the
chat page's WebSocket (``chatapp.relay.dialects.browser``).  Each HTTP dialect
module provides the same functions (``error_body``, ``rate_headers``,
``render_reply``, a ``StreamRenderer`` with ``item``/``end``/``error``), gathered
here so transports never ask which dialect they speak.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import ModuleType
from typing import Any

from chatapp.relay.dialects import anthropic, openai
from chatapp.relay.errors import RelayError


@dataclass(frozen=True)
class HttpDialect:
    name: str
    module: ModuleType
    #: headers that carry the request id (Anthropic's SDK reads ``request-id``)
    request_id_headers: tuple[str, ...]

    def error_body(self, error: RelayError) -> dict[str, Any]:
        body: dict[str, Any] = self.module.error_body(error)
        return body

    def rate_headers(self, windows: tuple[Any, ...], now: datetime) -> dict[str, str]:
        headers: dict[str, str] = self.module.rate_headers(windows, now)
        return headers

    def render_reply(
        self, body: dict[str, Any], completion: Any, *, model: str, passthrough: bool
    ) -> dict[str, Any]:
        rendered: dict[str, Any] = self.module.render_reply(
            body, completion, model=model, passthrough=passthrough
        )
        return rendered

    def stream_renderer(self, *, model: str, request_id: str, include_usage: bool) -> Any:
        return self.module.StreamRenderer(
            model=model, request_id=request_id, include_usage=include_usage
        )


HTTP_DIALECTS: Mapping[str, HttpDialect] = {
    "openai": HttpDialect("openai", openai, ("x-request-id",)),
    "anthropic": HttpDialect("anthropic", anthropic, ("x-request-id", "request-id")),
}


def detect(path: str, headers: Mapping[str, str]) -> HttpDialect:
    """The dialect a ``/v1`` request speaks: Anthropic's paths or its version header, else OpenAI."""
    if path.startswith("/v1/messages") or "anthropic-version" in headers:
        return HTTP_DIALECTS["anthropic"]
    return HTTP_DIALECTS["openai"]
