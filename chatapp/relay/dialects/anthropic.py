"""The Anthropic client dialect: /v1/messages and /v1/messages/count_tokens."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from chatapp.relay import reasoning
from chatapp.relay.canonical import (
    ChatRequest,
    Completion,
    Event,
    Finish,
    FinishReason,
    ImagePart,
    Message,
    OpaquePart,
    Part,
    ReasoningDelta,
    Start,
    TextDelta,
    TextPart,
    Tool,
    ToolCallDelta,
    ToolCallPart,
    ToolCallStart,
    ToolChoice,
    ToolResultPart,
    Usage,
    UsageEvent,
)
from chatapp.relay.errors import ERROR_TYPES, RelayError
from chatapp.relay.upstreams import UpstreamItem
from chatapp.relay.validation import (
    bad,
    field,
    image_from_base64,
    image_from_url,
    integer,
    number,
    stop_list,
)
from keys.exceptions import RateWindow

STOP_REASONS: dict[FinishReason, str] = {
    "stop": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
    "error": "end_turn",
}


# --- Requests ---


def parse_messages_request(body: dict[str, Any], *, count_only: bool = False) -> ChatRequest:
    model = field(body, "model", "", str, required=True)
    max_tokens = integer(body, "max_tokens", "", 1) if count_only else None
    if not count_only:
        field(body, "max_tokens", "", int, required=True)
        max_tokens = integer(body, "max_tokens", "", 1)
    raw_messages = field(body, "messages", "", list, required=True)
    if not raw_messages:
        raise bad("messages", "at least one message is required")
    messages: list[Message] = []
    for index, raw in enumerate(raw_messages):
        where = f"messages[{index}]"
        if not isinstance(raw, dict):
            raise bad(where, "expected an object")
        role = field(raw, "role", where, str, required=True)
        if role not in ("user", "assistant"):
            raise bad(
                f"{where}.role",
                f"unknown role {role!r}: expected user or assistant (system goes in the top-level system field)",
            )
        content = raw.get("content")
        if isinstance(content, str):
            messages.append(Message(role, [TextPart(content)]))
            continue
        if not isinstance(content, list):
            raise bad(f"{where}.content", "expected a string or an array of content blocks")
        parts: list[Part] = []
        for block_index, block in enumerate(content):
            here = f"{where}.content[{block_index}]"
            part = _block(block, here, role)
            if part is None:
                continue
            if isinstance(part, ToolResultPart):
                # Tool results become their own canonical "tool" messages, in order.
                if parts:
                    messages.append(Message("user", parts))
                    parts = []
                messages.append(Message("tool", [part]))
            else:
                parts.append(part)
        if parts:
            messages.append(Message(role, parts))
    stream = bool(field(body, "stream", "", bool, default=False))
    metadata = field(body, "metadata", "", dict)
    budget = _thinking_budget(body.get("thinking"))
    return ChatRequest(
        model=model,
        messages=messages,
        system=_system(body.get("system")),
        tools=_tools(body.get("tools")),
        tool_choice=_tool_choice(body.get("tool_choice")),
        max_tokens=max_tokens,
        temperature=number(body, "temperature", "", 0, 1),
        top_p=number(body, "top_p", "", 0, 1),
        top_k=integer(body, "top_k", "", 0),
        stop=stop_list(body.get("stop_sequences"), "stop_sequences"),
        reasoning_budget=budget,
        # Thinking turned off asks nothing of an effort-speaking upstream: no effort.
        reasoning_effort=reasoning.effort_for(budget) if budget else None,
        stream=stream,
        include_usage=True,
        metadata=metadata,
        user=(metadata or {}).get("user_id")
        if isinstance((metadata or {}).get("user_id"), str)
        else None,
        raw=body,
        dialect="anthropic",
    )


def _thinking_budget(raw: Any) -> int | None:
    """``thinking``: ``{"type": "enabled", "budget_tokens": n}`` → n; disabled → 0."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad(
            "thinking", 'expected an object such as {"type": "enabled", "budget_tokens": 2048}'
        )
    kind = raw.get("type")
    if kind == "disabled":
        return 0
    if kind != "enabled":
        return None  # a newer kind: passed on to an Anthropic upstream, not translated
    budget = integer(raw, "budget_tokens", "thinking", 1)
    if budget is None:
        raise bad("thinking.budget_tokens", "this field is required when thinking is enabled")
    return budget


def _system(raw: Any) -> list[TextPart]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [TextPart(raw)] if raw else []
    if isinstance(raw, list):
        parts = []
        for index, block in enumerate(raw):
            if (
                not isinstance(block, dict)
                or block.get("type") != "text"
                or not isinstance(block.get("text"), str)
            ):
                raise bad(f"system[{index}]", 'expected a text block {"type": "text", "text": ...}')
            parts.append(TextPart(block["text"]))
        return parts
    raise bad("system", "expected a string or an array of text blocks")


def _image(block: dict[str, Any], where: str) -> ImagePart:
    source = block.get("source")
    if not isinstance(source, dict):
        raise bad(f"{where}.source", "expected an object")
    kind = source.get("type")
    if kind == "base64":
        media_type = field(source, "media_type", f"{where}.source", str, required=True)
        data = field(source, "data", f"{where}.source", str, required=True)
        return image_from_base64(media_type, data, f"{where}.source")
    if kind == "url":
        return image_from_url(
            field(source, "url", f"{where}.source", str, required=True), f"{where}.source.url"
        )
    raise bad(f"{where}.source.type", "expected base64 or url")


def _block(block: Any, where: str, role: str) -> Part | None:
    if not isinstance(block, dict):
        raise bad(where, "expected an object")
    kind = block.get("type")
    if kind == "text":
        return TextPart(field(block, "text", where, str, required=True))
    if kind == "image":
        return _image(block, where)
    if kind == "tool_use":
        if role != "assistant":
            raise bad(f"{where}.type", "tool_use blocks belong in assistant messages")
        arguments = block.get("input", {})
        if not isinstance(arguments, dict):
            raise bad(f"{where}.input", "expected an object")
        return ToolCallPart(
            id=field(block, "id", where, str, required=True),
            name=field(block, "name", where, str, required=True),
            arguments=json.dumps(arguments, ensure_ascii=False),
        )
    if kind == "tool_result":
        if role != "user":
            raise bad(f"{where}.type", "tool_result blocks belong in user messages")
        content = block.get("content")
        results: list[TextPart | ImagePart] = []
        if isinstance(content, str):
            results.append(TextPart(content))
        elif isinstance(content, list):
            for index, item in enumerate(content):
                here = f"{where}.content[{index}]"
                if isinstance(item, dict) and item.get("type") == "text":
                    results.append(TextPart(field(item, "text", here, str, required=True)))
                elif isinstance(item, dict) and item.get("type") == "image":
                    results.append(_image(item, here))
                else:
                    raise bad(here, "expected a text or image block")
        elif content is not None:
            raise bad(f"{where}.content", "expected a string or an array of blocks")
        return ToolResultPart(
            tool_call_id=field(block, "tool_use_id", where, str, required=True),
            content=results,
            is_error=bool(block.get("is_error", False)),
        )
    if kind in ("thinking", "redacted_thinking"):
        # Kept for an Anthropic upstream (the raw body goes through); other
        # providers cannot replay Claude's signed reasoning, so it is left out.
        return None
    if isinstance(kind, str) and kind:
        return OpaquePart("anthropic", kind, where)
    raise bad(
        f"{where}.type",
        f"unsupported content block type {kind!r}: expected text, image, tool_use or tool_result",
    )


def _tools(raw: Any) -> list[Tool]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad("tools", "expected an array")
    tools = []
    for index, item in enumerate(raw):
        where = f"tools[{index}]"
        if not isinstance(item, dict):
            raise bad(where, "expected an object")
        kind = item.get("type")
        if isinstance(kind, str) and kind != "custom" and "input_schema" not in item:
            # A server tool (web_search_20250305, code_execution_..., bash_...).
            tools.append(
                Tool(field(item, "name", where, str, required=True), "", {}, opaque_type=kind)
            )
            continue
        tools.append(
            Tool(
                name=field(item, "name", where, str, required=True),
                description=field(item, "description", where, str, default=""),
                parameters=field(item, "input_schema", where, dict, required=True),
            )
        )
    return tools


def _tool_choice(raw: Any) -> ToolChoice | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad("tool_choice", 'expected an object such as {"type": "auto"}')
    kind = raw.get("type")
    disable = bool(raw.get("disable_parallel_tool_use", False))
    if kind == "auto":
        return ToolChoice("auto", disable_parallel=disable)
    if kind == "any":
        return ToolChoice("required", disable_parallel=disable)
    if kind == "none":
        return ToolChoice("none")
    if kind == "tool":
        return ToolChoice(
            "tool", field(raw, "name", "tool_choice", str, required=True), disable_parallel=disable
        )
    raise bad("tool_choice.type", "expected auto, any, tool or none")


# --- Responses ---


def _usage(usage: Usage, *, with_input: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"output_tokens": usage.output_tokens}
    if with_input:
        body = {
            # Anthropic counts cache reads and writes apart from input_tokens; canonical
            # input is the total.
            "input_tokens": max(
                0, usage.input_tokens - usage.cached_tokens - usage.cache_write_tokens
            ),
            "cache_creation_input_tokens": usage.cache_write_tokens,
            "cache_read_input_tokens": usage.cached_tokens,
            **body,
        }
    return body


def render_message(completion: Completion, model: str) -> dict[str, Any]:
    choice = completion.choices[0]
    content: list[dict[str, Any]] = []
    if choice.reasoning:
        # Another provider's reasoning: unsigned, so an Anthropic upstream would not take it back.
        content.append({"type": "thinking", "thinking": choice.reasoning, "signature": ""})
    if choice.text:
        content.append({"type": "text", "text": choice.text})
    for call in choice.tool_calls:
        content.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.name,
                "input": _arguments(call.arguments),
            }
        )
    return {
        "id": completion.id if completion.id.startswith("msg_") else f"msg_{completion.id}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": STOP_REASONS[choice.finish],
        "stop_sequence": choice.stop_sequence,
        "usage": _usage(completion.usage or Usage()),
    }


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"value": value}


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class StreamRenderer:
    """Canonical events → Anthropic's SSE event sequence.

    ``message_delta`` waits for the end of the stream because OpenAI-style upstreams
    send their usage after the finish reason.
    """

    def __init__(self, *, model: str, request_id: str, include_usage: bool = True) -> None:
        # include_usage: Anthropic streams always carry usage; accepted for a common signature.
        self.model = model
        self.id = f"msg_{request_id}"
        self.started = False
        self.block: int = -1  # index of the open content block, -1 when none
        self.block_kind: str | None = None
        self.tool_blocks: dict[int, int] = {}  # tool-call index → block index
        self.finish: Finish | None = None
        self.usage = Usage()
        self.input_tokens: int | None = None

    def _start(self, input_tokens: int | None = None) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens or 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        }
        self.input_tokens = input_tokens
        return [_sse("message_start", {"type": "message_start", "message": message})]

    def _close_block(self) -> list[bytes]:
        if self.block < 0 or self.block_kind is None:
            return []
        self.block_kind = None
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": self.block})]

    def _open_block(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._close_block()
        self.block += 1
        self.block_kind = kind
        out.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": self.block, "content_block": block},
            )
        )
        if self.block == 0:
            out.append(_sse("ping", {"type": "ping"}))
        return out

    def render(self, event: Event) -> list[bytes]:
        if isinstance(event, Start):
            return self._start(event.input_tokens)
        if event.__class__ is not UsageEvent and getattr(event, "choice", 0) != 0:
            return []  # Anthropic has a single choice
        out = self._start()
        if isinstance(event, TextDelta):
            if self.block_kind != "text":
                out += self._open_block("text", {"type": "text", "text": ""})
            out.append(
                _sse(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": self.block,
                        "delta": {"type": "text_delta", "text": event.text},
                    },
                )
            )
        elif isinstance(event, ReasoningDelta):
            if self.block_kind != "thinking":
                out += self._open_block(
                    "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                )
            out.append(
                _sse(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": self.block,
                        "delta": {"type": "thinking_delta", "thinking": event.text},
                    },
                )
            )
        elif isinstance(event, ToolCallStart):
            out += self._open_block(
                "tool_use", {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
            )
            self.tool_blocks[event.index] = self.block
        elif isinstance(event, ToolCallDelta):
            index = self.tool_blocks.get(event.index, self.block)
            out.append(
                _sse(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": event.arguments},
                    },
                )
            )
        elif isinstance(event, Finish):
            self.finish = event
        elif isinstance(event, UsageEvent):
            self.usage = event.usage
        return out

    def error(self, error: RelayError) -> list[bytes]:
        return [_sse("error", error_body(error))]

    def item(self, item: UpstreamItem, *, passthrough: bool) -> list[bytes]:
        """One upstream item: relayed as it is (same dialect) or rendered from its events."""
        if passthrough:
            return [passthrough_event(item.name, item.raw, model=self.model)]
        return [piece for event in item.events for piece in self.render(event)]

    def end(self, *, passthrough: bool) -> list[bytes]:
        """The closing events; an Anthropic upstream already sent its own."""
        return [] if passthrough else self.done()

    def done(self) -> list[bytes]:
        out = self._start() + self._close_block()
        finish = self.finish or Finish("stop")
        usage: dict[str, Any] = {"output_tokens": self.usage.output_tokens}
        if self.usage.input_tokens:
            usage["input_tokens"] = max(
                0,
                self.usage.input_tokens - self.usage.cached_tokens - self.usage.cache_write_tokens,
            )
            if self.usage.cache_write_tokens:
                usage["cache_creation_input_tokens"] = self.usage.cache_write_tokens
            usage["cache_read_input_tokens"] = self.usage.cached_tokens
        out.append(
            _sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": STOP_REASONS[finish.reason],
                        "stop_sequence": finish.stop_sequence,
                    },
                    "usage": usage,
                },
            )
        )
        out.append(_sse("message_stop", {"type": "message_stop"}))
        return out


def render_reply(
    body: dict[str, Any], completion: Completion, *, model: str, passthrough: bool
) -> dict[str, Any]:
    """A whole reply: the upstream's own body (same dialect) or one rendered from the completion."""
    if not passthrough:
        return render_message(completion, model)
    body["model"] = model
    return body


def rate_headers(windows: tuple[RateWindow, ...], now: datetime) -> dict[str, str]:
    """Anthropic's ``anthropic-ratelimit-*`` headers."""
    out: dict[str, str] = {}
    for window in windows:
        out[f"anthropic-ratelimit-{window.kind}-limit"] = str(window.limit)
        out[f"anthropic-ratelimit-{window.kind}-remaining"] = str(window.remaining)
        out[f"anthropic-ratelimit-{window.kind}-reset"] = window.resets_at.astimezone(UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
    return out


def error_body(error: RelayError) -> dict[str, Any]:
    known = set(ERROR_TYPES.values()) | {"api_error"}
    kind = error.type if error.type in known else ERROR_TYPES.get(error.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def model_object(name: str, display_name: str, created_at: str) -> dict[str, Any]:
    return {"type": "model", "id": name, "display_name": display_name, "created_at": created_at}


def passthrough_event(name: str, data: dict[str, Any], *, model: str) -> bytes:
    """An upstream event relayed as-is but for the model name."""
    if data.get("type") == "message_start" and isinstance(data.get("message"), dict):
        data["message"]["model"] = model
    return _sse(name, data)
