"""Upstream types behind one protocol, found through one registry.

An upstream type (``openai``, ``anthropic``, ``gemini``, ``local``) is a class in a module of
its own: it builds its provider's HTTP requests from canonical types and decodes
its provider's answers into canonical events.  The pipeline does the I/O and never
asks which type it talks to.  Adding a type is one module and one line in
``UPSTREAMS``, as Django's session backends are added.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
from django.utils.module_loading import import_string

if TYPE_CHECKING:
    from chatapp.models import Provider
    from chatapp.relay.canonical import ChatRequest, Completion, Event

#: A model list is read at most this many pages deep.
MAX_MODEL_PAGES = 20

#: provider type → the class that serves it
UPSTREAMS = {
    "openai": "chatapp.relay.upstreams.openai.OpenAIUpstream",
    "anthropic": "chatapp.relay.upstreams.anthropic.AnthropicUpstream",
    "gemini": "chatapp.relay.upstreams.gemini.GeminiUpstream",
    "local": "chatapp.relay.upstreams.local.LocalUpstream",
}


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
    # The model's parameter rules (chatapp.relay.params), applied to every chat body.
    param_rules: tuple[Any, ...] = ()
    fold_system: bool = False

    @property
    def upstream(self) -> Upstream:
        return get(self.provider_type)


@dataclass(slots=True)
class HttpCall:
    url: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass(slots=True)
class UpstreamItem:
    """One element of an upstream stream: its raw form (for same-dialect relaying) and its events."""

    name: str
    raw: dict[str, Any]
    events: list[Event]


def stream_json(target: Target, data: str) -> dict[str, Any]:
    """One SSE data of an upstream stream as a JSON object, or an ``UpstreamError``."""
    from chatapp.relay.errors import UpstreamError

    try:
        raw = json.loads(data)
    except json.JSONDecodeError:
        raise UpstreamError(
            f"{target.provider} sent malformed stream data: {data[:120]!r}", retryable=True
        ) from None
    if not isinstance(raw, dict):
        raise UpstreamError(f"{target.provider} sent unexpected stream data: {data[:120]!r}")
    return raw


class StreamDecoder:
    """Server-sent events of one upstream stream → ``UpstreamItem``s.

    ``feed`` takes one SSE event (its name and data text) and returns the item to
    relay, or None for a terminator that carries nothing (OpenAI's ``[DONE]``);
    ``finished`` tells whether the stream ended as its protocol ends a stream.
    Malformed data raises ``UpstreamError``.
    """

    finished: bool = False

    def feed(self, name: str, data: str) -> UpstreamItem | None:
        raise NotImplementedError


class Upstream:
    """The protocol every upstream type implements (defaults: what most types share)."""

    type: ClassVar[str]
    #: how error messages name it: "an OpenAI-compatible upstream"
    label: ClassVar[str]
    #: the client dialect this type speaks natively: a client of that dialect gets
    #: the upstream's own body and stream, with only the model name swapped
    dialect: ClassVar[str | None] = None
    #: whether providers of this type are reached at a base URL
    needs_base_url: ClassVar[bool] = True

    def build_chat(self, target: Target, request: ChatRequest) -> HttpCall:
        raise NotImplementedError

    def parse_completion(self, body: dict[str, Any]) -> Completion:
        raise NotImplementedError

    def stream_decoder(self, target: Target) -> StreamDecoder:
        raise NotImplementedError

    def build_embeddings(self, target: Target, body: dict[str, Any]) -> HttpCall | None:
        """The embeddings request, or None when this type has no embeddings API."""
        return None

    def build_count_tokens(self, target: Target, request: ChatRequest) -> HttpCall | None:
        """A request that counts input tokens, or None when the type cannot count."""
        return None

    def error_message(self, text: str) -> str:
        """The upstream's own reason from its error body."""
        return error_message(text)

    def error_status(self, status: int, text: str) -> int:
        """The HTTP status an error answer means, for types whose status says less.

        (An upstream refusing the gateway's own credentials is the gateway's fault, never
        the client's: it must not read as the client's 400.)
        """
        return status

    def build_list_models(self, target: Target, after: str | None = None) -> HttpCall | None:
        """The GET request for (a page of) the provider's model list, or None when it has none.

        ``after``: the last id of the previous page, for types that page their list.
        """
        return None

    def parse_models(self, body: dict[str, Any]) -> tuple[list[str], str | None]:
        """Model ids of one page of the list, and the cursor of the next page (None at the end)."""
        data = body.get("data")
        if not isinstance(data, list):
            return [], None
        ids = [
            item["id"]
            for item in data
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        ]
        return ids, None

    async def list_models(self, target: Target) -> list[str]:
        """The upstream model ids the provider offers (``UpstreamError`` when it cannot say)."""
        from chatapp.relay import http as relay_http
        from chatapp.relay.errors import UpstreamError

        found: list[str] = []
        after: str | None = None
        for _page in range(MAX_MODEL_PAGES):
            http_call = self.build_list_models(target, after)
            if http_call is None:
                raise UpstreamError(
                    f"{target.provider}: {self.label} upstream cannot list its models"
                )
            try:
                response = await relay_http.client().get(
                    http_call.url, headers=http_call.headers, timeout=target.timeout
                )
            except httpx.HTTPError as exc:
                cause = exc.__cause__ or exc
                raise UpstreamError(
                    f"{target.provider}: cannot reach {http_call.url} ({type(cause).__name__}: {cause})"
                ) from None
            if response.status_code >= 400:
                raise UpstreamError(
                    f"{target.provider} answered {response.status_code} for its model list: "
                    + " ".join(self.error_message(response.text).split()),
                    status=response.status_code,
                )
            try:
                body = response.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise UpstreamError(
                    f"{target.provider} sent a model list that is not a JSON object"
                )
            ids, after = self.parse_models(body)
            found.extend(ids)
            if after is None:
                break
        return list(dict.fromkeys(found))

    @contextlib.asynccontextmanager
    async def connect(self, target: Target) -> AsyncIterator[Target]:
        """Hold whatever a call needs (a local server's queue slot) for its duration."""
        yield target

    def clean_provider(self, provider: Provider) -> None:
        """Type-specific validation of a provider row (``ValidationError`` by field)."""


@cache
def get(provider_type: str) -> Upstream:
    """The upstream of ``provider_type``; ``LookupError`` when no such type is registered."""
    try:
        path = UPSTREAMS[provider_type]
    except KeyError:
        raise LookupError(
            f"unknown provider type {provider_type!r}: expected one of {', '.join(UPSTREAMS)}"
        ) from None
    upstream: Upstream = import_string(path)()
    return upstream


def check_translatable(request: ChatRequest, upstream: Upstream) -> None:
    """Refuse, naming it, what cannot cross from the client's dialect to this upstream's."""
    from chatapp.relay.canonical import OpaquePart
    from chatapp.relay.errors import RelayError

    for message in request.messages:
        for part in message.parts:
            if isinstance(part, OpaquePart):
                raise RelayError(
                    400,
                    f"{part.where}: '{part.type}' content from a {part.dialect} client cannot be "
                    f"sent to {upstream.label} upstream; this model is served by one.",
                    param=part.where,
                    code="unsupported_content",
                )
    for index, tool in enumerate(request.tools):
        if tool.opaque_type is not None:
            raise RelayError(
                400,
                f"tools[{index}]: the '{tool.opaque_type}' tool '{tool.name}' cannot be sent to "
                f"{upstream.label} upstream; this model is served by one.",
                param=f"tools[{index}]",
                code="unsupported_tool",
            )


def error_message(text: str) -> str:
    """The upstream's own reason from its error body, whatever dialect it used."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return text[:300]
