"""The OpenAI client dialect: /v1/chat/completions, /v1/embeddings, /v1/models."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from chatapp.relay import reasoning
from chatapp.relay.canonical import (
    ChatRequest,
    Completion,
    Event,
    Finish,
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
from chatapp.relay.errors import RelayError
from chatapp.relay.upstreams import UpstreamItem
from chatapp.relay.validation import bad, field, image_from_url, integer, number, stop_list
from keys.exceptions import RateWindow

FINISH_REASONS = {
    "stop": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "error": "stop",
}


# --- Requests ---


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    model = field(body, "model", "", str, required=True)
    raw_messages = field(body, "messages", "", list, required=True)
    if not raw_messages:
        raise bad("messages", "at least one message is required")
    system: list[TextPart] = []
    messages: list[Message] = []
    for index, raw in enumerate(raw_messages):
        where = f"messages[{index}]"
        if not isinstance(raw, dict):
            raise bad(where, "expected an object")
        role = field(raw, "role", where, str, required=True)
        if role in ("system", "developer"):
            system.extend(_text_parts(raw.get("content"), f"{where}.content"))
        elif role == "user":
            messages.append(
                Message(
                    "user", _user_parts(raw.get("content"), f"{where}.content"), raw.get("name")
                )
            )
        elif role == "assistant":
            messages.append(Message("assistant", _assistant_parts(raw, where)))
        elif role in ("tool", "function"):
            call_id = field(raw, "tool_call_id", where, str, required=role == "tool") or raw.get(
                "name", ""
            )
            content: list[TextPart | ImagePart] = list(
                _text_parts(raw.get("content"), f"{where}.content")
            )
            messages.append(Message("tool", [ToolResultPart(call_id, content)]))
        else:
            raise bad(
                f"{where}.role",
                f"unknown role {role!r}: expected system, developer, user, assistant or tool",
            )
    if not messages:
        raise bad("messages", "at least one user message is required besides system messages")

    max_tokens = integer(body, "max_completion_tokens", "", 1)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", "", 1)
    n = integer(body, "n", "", 1, 128) or 1
    stream = bool(field(body, "stream", "", bool, default=False))
    stream_options = field(body, "stream_options", "", dict, default={})
    response_format = field(body, "response_format", "", dict)
    if response_format is not None and response_format.get("type") not in (
        "text",
        "json_object",
        "json_schema",
    ):
        raise bad("response_format.type", "expected text, json_object or json_schema")
    effort = field(body, "reasoning_effort", "", str)
    if effort is not None and effort not in reasoning.EFFORTS:
        raise bad("reasoning_effort", f"expected one of {', '.join(reasoning.EFFORTS)}")
    return ChatRequest(
        model=model,
        messages=messages,
        system=system,
        tools=_tools(body.get("tools")),
        tool_choice=_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls")),
        max_tokens=max_tokens,
        temperature=number(body, "temperature", "", 0, 2),
        top_p=number(body, "top_p", "", 0, 1),
        stop=stop_list(body.get("stop"), "stop"),
        n=n,
        presence_penalty=number(body, "presence_penalty", "", -2, 2),
        frequency_penalty=number(body, "frequency_penalty", "", -2, 2),
        seed=integer(body, "seed", "", -(2**63)),
        user=field(body, "user", "", str),
        response_format=response_format,
        reasoning_effort=effort,
        reasoning_budget=reasoning.budget_for(effort) if effort is not None else None,
        stream=stream,
        include_usage=bool(stream_options.get("include_usage")),
        metadata=field(body, "metadata", "", dict),
        raw=body,
        dialect="openai",
    )


def _text_parts(content: Any, where: str) -> list[TextPart]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextPart(content)]
    if isinstance(content, list):
        parts = []
        for index, item in enumerate(content):
            if isinstance(item, dict) and item.get("type") == "refusal":
                continue  # an earlier turn's refusal carries no content to replay
            if (
                not isinstance(item, dict)
                or item.get("type") != "text"
                or not isinstance(item.get("text"), str)
            ):
                raise bad(f"{where}[{index}]", 'expected a text part {"type": "text", "text": ...}')
            parts.append(TextPart(item["text"]))
        return parts
    raise bad(where, "expected a string or an array of content parts")


def _user_parts(content: Any, where: str) -> list[Part]:
    if isinstance(content, str):
        return [TextPart(content)]
    if not isinstance(content, list) or not content:
        raise bad(where, "expected a string or a non-empty array of content parts")
    parts: list[Part] = []
    for index, item in enumerate(content):
        here = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise bad(here, "expected an object")
        kind = item.get("type")
        if kind == "text":
            parts.append(TextPart(field(item, "text", here, str, required=True)))
        elif kind == "image_url":
            image = item.get("image_url")
            if isinstance(image, str):
                image = {"url": image}
            if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                raise bad(f"{here}.image_url", "expected an object with a url")
            detail = image.get("detail")
            if detail not in (None, "auto", "low", "high"):
                raise bad(f"{here}.image_url.detail", "expected auto, low or high")
            parts.append(image_from_url(image["url"], f"{here}.image_url.url", detail))
        elif isinstance(kind, str) and kind in ("file", "input_audio"):
            parts.append(OpaquePart("openai", kind, here))
        else:
            raise bad(
                f"{here}.type",
                f"unsupported content part type {kind!r}: expected text, image_url, file or input_audio",
            )
    return parts


def _assistant_parts(raw: dict[str, Any], where: str) -> list[Part]:
    parts: list[Part] = (
        list(_text_parts(raw.get("content"), f"{where}.content"))
        if raw.get("content") is not None
        else []
    )
    legacy = field(raw, "function_call", where, dict)
    if legacy is not None:
        # The deprecated single-function form; its result comes back as a "function"
        # role message whose name stands in for the call id.
        name = field(legacy, "name", f"{where}.function_call", str, required=True)
        arguments = field(legacy, "arguments", f"{where}.function_call", str, default="{}")
        parts.append(ToolCallPart(id=name, name=name, arguments=arguments))
    tool_calls = field(raw, "tool_calls", where, list, default=[])
    for index, call in enumerate(tool_calls):
        here = f"{where}.tool_calls[{index}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise bad(
                here, 'expected {"id", "type": "function", "function": {"name", "arguments"}}'
            )
        function = call["function"]
        parts.append(
            ToolCallPart(
                id=field(call, "id", here, str, required=True),
                name=field(function, "name", f"{here}.function", str, required=True),
                arguments=field(function, "arguments", f"{here}.function", str, default="{}"),
            )
        )
    return parts


def _tools(raw: Any) -> list[Tool]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad("tools", "expected an array")
    tools = []
    for index, item in enumerate(raw):
        where = f"tools[{index}]"
        if (
            isinstance(item, dict)
            and item.get("type") == "custom"
            and isinstance(item.get("custom"), dict)
        ):
            custom = item["custom"]
            name = field(custom, "name", f"{where}.custom", str, required=True)
            tools.append(Tool(name, custom.get("description") or "", {}, opaque_type="custom"))
            continue
        if (
            not isinstance(item, dict)
            or item.get("type") != "function"
            or not isinstance(item.get("function"), dict)
        ):
            raise bad(where, 'expected {"type": "function", "function": {...}}')
        function = item["function"]
        tools.append(
            Tool(
                name=field(function, "name", f"{where}.function", str, required=True),
                description=field(function, "description", f"{where}.function", str, default=""),
                parameters=field(
                    function,
                    "parameters",
                    f"{where}.function",
                    dict,
                    default={"type": "object", "properties": {}},
                ),
            )
        )
    return tools


def _tool_choice(raw: Any, parallel: Any) -> ToolChoice | None:
    disable_parallel = parallel is False
    if raw is None:
        return ToolChoice("auto", disable_parallel=True) if disable_parallel else None
    if raw in ("auto", "none", "required"):
        return ToolChoice(raw, disable_parallel=disable_parallel)
    if (
        isinstance(raw, dict)
        and raw.get("type") == "function"
        and isinstance(raw.get("function"), dict)
    ):
        name = raw["function"].get("name")
        if isinstance(name, str):
            return ToolChoice("tool", name, disable_parallel=disable_parallel)
    raise bad(
        "tool_choice",
        'expected auto, none, required or {"type": "function", "function": {"name": ...}}',
    )


# --- Responses ---


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def render_completion(completion: Completion, model: str) -> dict[str, Any]:
    choices = []
    for index, choice in enumerate(completion.choices):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": choice.text or (None if choice.tool_calls else ""),
            "refusal": None,
        }
        if choice.reasoning:
            message["reasoning_content"] = choice.reasoning  # as DeepSeek names it
        if choice.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in choice.tool_calls
            ]
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASONS[choice.finish],
            }
        )
    return {
        "id": completion.id
        if completion.id.startswith("chatcmpl")
        else f"chatcmpl-{completion.id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage_body(completion.usage or Usage()),
        "system_fingerprint": None,
    }


class StreamRenderer:
    """Canonical events → ``chat.completion.chunk`` SSE lines, as OpenAI shapes them."""

    def __init__(self, *, model: str, request_id: str, include_usage: bool) -> None:
        self.model = model
        self.id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.include_usage = include_usage
        self.started: set[int] = set()

    def _chunk(
        self, choices: list[dict[str, Any]], usage: Usage | None = None, *, final: bool = False
    ) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_body(usage) if final and usage is not None else None
        return (
            b"data: "
            + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
            + b"\n\n"
        )

    def _opening(self, choice: int) -> list[bytes]:
        if choice in self.started:
            return []
        self.started.add(choice)
        return [
            self._chunk(
                [
                    {
                        "index": choice,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        ]

    def render(self, event: Event) -> list[bytes]:
        if isinstance(event, Start):
            return self._opening(0)
        if isinstance(event, TextDelta):
            return self._opening(event.choice) + [
                self._chunk(
                    [
                        {
                            "index": event.choice,
                            "delta": {"content": event.text},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            ]
        if isinstance(event, ReasoningDelta):
            return self._opening(event.choice) + [
                self._chunk(
                    [
                        {
                            "index": event.choice,
                            "delta": {"reasoning_content": event.text},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            ]
        if isinstance(event, ToolCallStart):
            call = {
                "index": event.index,
                "id": event.id,
                "type": "function",
                "function": {"name": event.name, "arguments": ""},
            }
            return self._opening(event.choice) + [
                self._chunk(
                    [
                        {
                            "index": event.choice,
                            "delta": {"tool_calls": [call]},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            ]
        if isinstance(event, ToolCallDelta):
            call = {"index": event.index, "function": {"arguments": event.arguments}}
            return [
                self._chunk(
                    [
                        {
                            "index": event.choice,
                            "delta": {"tool_calls": [call]},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            ]
        if isinstance(event, Finish):
            return self._opening(event.choice) + [
                self._chunk(
                    [
                        {
                            "index": event.choice,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": FINISH_REASONS[event.reason],
                        }
                    ]
                )
            ]
        if isinstance(event, UsageEvent):
            return [self._chunk([], event.usage, final=True)] if self.include_usage else []
        return []

    def error(self, error: RelayError) -> list[bytes]:
        return [b"data: " + json.dumps(error_body(error)).encode() + b"\n\n"]

    def item(self, item: UpstreamItem, *, passthrough: bool) -> list[bytes]:
        """One upstream item: relayed as it is (same dialect) or rendered from its events."""
        if passthrough:
            chunk = passthrough_chunk(item.raw, model=self.model, include_usage=self.include_usage)
            return [chunk] if chunk is not None else []
        return [piece for event in item.events for piece in self.render(event)]

    def end(self, *, passthrough: bool) -> list[bytes]:
        return [b"data: [DONE]\n\n"]


def render_reply(
    body: dict[str, Any], completion: Completion, *, model: str, passthrough: bool
) -> dict[str, Any]:
    """A whole reply: the upstream's own body (same dialect) or one rendered from the completion."""
    if not passthrough:
        return render_completion(completion, model)
    body["model"] = model
    if isinstance(body.get("usage"), dict) and completion.usage is not None:
        body["usage"].setdefault(
            "total_tokens", completion.usage.input_tokens + completion.usage.output_tokens
        )
    return body


def rate_headers(windows: tuple[RateWindow, ...], now: datetime) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers."""
    out: dict[str, str] = {}
    for window in windows:
        out[f"x-ratelimit-limit-{window.kind}"] = str(window.limit)
        out[f"x-ratelimit-remaining-{window.kind}"] = str(window.remaining)
        out[f"x-ratelimit-reset-{window.kind}"] = _reset_text(
            (window.resets_at - now).total_seconds()
        )
    return out


def _reset_text(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 20ms."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = int(seconds + 0.999)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def error_body(error: RelayError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


# --- Embeddings ---


def parse_embeddings_request(
    body: dict[str, Any],
) -> tuple[str, list[str] | list[list[int]] | str | list[int]]:
    model = field(body, "model", "", str, required=True)
    value = body.get("input")
    if value is None:
        raise RelayError(
            400, "input: this field is required", param="input", code="missing_required_parameter"
        )
    valid = (
        (isinstance(value, str) and value != "")
        or (
            isinstance(value, list)
            and value
            and all(isinstance(item, str) and item for item in value)
        )
        or (
            isinstance(value, list)
            and value
            and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
        )
        or (
            isinstance(value, list)
            and value
            and all(
                isinstance(item, list) and item and all(isinstance(token, int) for token in item)
                for item in value
            )
        )
    )
    if not valid:
        raise bad(
            "input", "expected a non-empty string, an array of non-empty strings, or token arrays"
        )
    if isinstance(value, list) and len(value) > 2048:
        raise bad("input", f"at most 2048 inputs per request, got {len(value)}")
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise bad("encoding_format", "expected float or base64")
    return model, value


def model_object(name: str, created: int, owner: str = "switchboard") -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


def passthrough_chunk(chunk: dict[str, Any], *, model: str, include_usage: bool) -> bytes | None:
    """An upstream chunk relayed as-is but for the model name (and usage the client did not ask for)."""
    if not include_usage:
        if not chunk.get("choices") and chunk.get("usage") is not None:
            return None
        chunk.pop("usage", None)
    chunk["model"] = model
    return (
        b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )
