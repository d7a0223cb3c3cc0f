"""Canonical request and event types that every dialect parses into and renders from.

A client dialect (OpenAI, Anthropic, browser) turns its request into a
``ChatRequest``; an upstream adapter turns that into its provider's request and its
provider's response back into ``Event``s; the client dialect renders those events.
Translation between any client dialect and any upstream type falls out of this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "stop_sequence", "error"]


@dataclass(slots=True)
class TextPart:
    text: str


@dataclass(slots=True)
class ImagePart:
    """An image as a remote URL (passed on, never fetched) or inline base64 data."""

    url: str | None = None
    data: str | None = None  # base64, no data: prefix
    media_type: str | None = None
    detail: str | None = None

    @property
    def data_url(self) -> str:
        if self.url is not None:
            return self.url
        return f"data:{self.media_type};base64,{self.data}"


@dataclass(slots=True)
class ToolCallPart:
    id: str
    name: str
    arguments: str  # JSON text, as produced by the model


@dataclass(slots=True)
class ToolResultPart:
    tool_call_id: str
    content: list[TextPart | ImagePart]
    is_error: bool = False

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


@dataclass(slots=True)
class OpaquePart:
    """A content part we do not model (a PDF document, audio, a server tool's result).

    It travels untouched when the upstream speaks the client's dialect; translating
    it to another dialect is refused with a 400 naming it.
    """

    dialect: str
    type: str
    where: str


Part = TextPart | ImagePart | ToolCallPart | ToolResultPart | OpaquePart


@dataclass(slots=True)
class Message:
    role: Role
    parts: list[Part]
    name: str | None = None

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts if isinstance(part, TextPart))


@dataclass(slots=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    # A provider-specific tool (Anthropic server tools, OpenAI custom tools): passed
    # through to an upstream of the same dialect, refused elsewhere.
    opaque_type: str | None = None


@dataclass(slots=True)
class ToolChoice:
    mode: Literal["auto", "none", "required", "tool"]
    name: str | None = None
    disable_parallel: bool = False


@dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[Message]
    system: list[TextPart] = field(default_factory=list)
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # Reasoning asked for: OpenAI's effort or Anthropic's thinking budget, each read into
    # both (``chatapp.relay.reasoning``) so every upstream type gets it in its own terms.
    reasoning_effort: str | None = None
    reasoning_budget: int | None = None  # thinking tokens; 0: thinking off
    stream: bool = False
    include_usage: bool = False  # the client asked for usage in the stream (OpenAI)
    metadata: dict[str, Any] | None = None
    # The client's own JSON body; forwarded (with the model swapped) when the upstream
    # speaks the client's dialect, so fields we do not model pass through untouched.
    raw: dict[str, Any] | None = None
    dialect: str = ""
    body_size: int = 0  # bytes of the client's JSON body, when it came as one (token bound)

    @property
    def has_images(self) -> bool:
        return any(
            isinstance(part, ImagePart)
            or (
                isinstance(part, ToolResultPart)
                and any(isinstance(p, ImagePart) for p in part.content)
            )
            for message in self.messages
            for part in message.parts
        )


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0  # every input token: cache reads and cache writes included
    output_tokens: int = 0
    cached_tokens: int = 0  # input tokens read from the provider's prompt cache
    cache_write_tokens: int = 0  # input tokens written to it (Anthropic bills them apart)
    reasoning_tokens: int = 0  # the part of output_tokens the model spent thinking


# --- Events: what an upstream call produces, in order. ---


@dataclass(slots=True)
class Start:
    id: str
    model: str
    input_tokens: int | None = None  # Anthropic reports these up front


@dataclass(slots=True)
class TextDelta:
    text: str
    choice: int = 0


@dataclass(slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning (thinking), shown apart from the answer."""

    text: str
    choice: int = 0


@dataclass(slots=True)
class ToolCallStart:
    index: int  # position among this reply's tool calls
    id: str
    name: str
    choice: int = 0


@dataclass(slots=True)
class ToolCallDelta:
    index: int
    arguments: str  # a fragment of the JSON arguments
    choice: int = 0


@dataclass(slots=True)
class UsageEvent:
    usage: Usage


@dataclass(slots=True)
class Finish:
    reason: FinishReason
    stop_sequence: str | None = None
    choice: int = 0


Event = Start | TextDelta | ReasoningDelta | ToolCallStart | ToolCallDelta | UsageEvent | Finish


@dataclass(slots=True)
class Completion:
    """A whole (non-streamed) reply, as events collapse into it."""

    id: str
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


@dataclass(slots=True)
class CompletionChoice:
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallPart] = field(default_factory=list)
    finish: FinishReason = "stop"
    stop_sequence: str | None = None
