"""Upstream adapters, one module per provider type.

Each adapter is pure: it builds the provider's HTTP request from a canonical
``ChatRequest`` and parses the provider's responses into canonical events.  The
pipeline does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatapp.relay.canonical import ChatRequest


@dataclass(slots=True)
class Target:
    """Everything needed to call one route: where, with what credentials, which model."""

    route_id: int
    provider: str
    provider_type: str
    base_url: str
    api_key: str
    upstream_model: str
    timeout: float
    extra_headers: dict[str, str] = field(default_factory=dict)
    max_output_tokens: int = 4096
    model_path: str = ""  # local providers: the GGUF file their server loads


@dataclass(slots=True)
class HttpCall:
    url: str
    headers: dict[str, str]
    body: dict[str, Any]


def check_translatable(request: ChatRequest, provider_type: str) -> None:
    """Refuse, naming it, what cannot cross from the client's dialect to this upstream's."""
    from chatapp.relay.canonical import OpaquePart
    from chatapp.relay.errors import RelayError

    label = "an Anthropic" if provider_type == "anthropic" else "an OpenAI-compatible"
    for message in request.messages:
        for part in message.parts:
            if isinstance(part, OpaquePart):
                raise RelayError(
                    400,
                    f"{part.where}: '{part.type}' content from a {part.dialect} client cannot be "
                    f"sent to {label} upstream; this model is served by one.",
                    param=part.where,
                    code="unsupported_content",
                )
    for index, tool in enumerate(request.tools):
        if tool.opaque_type is not None:
            raise RelayError(
                400,
                f"tools[{index}]: the '{tool.opaque_type}' tool '{tool.name}' cannot be sent to "
                f"{label} upstream; this model is served by one.",
                param=f"tools[{index}]",
                code="unsupported_tool",
            )
