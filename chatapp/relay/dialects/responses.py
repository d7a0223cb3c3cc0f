"""The OpenAI Responses dialect: ``POST /v1/responses``.

A Responses request (``input`` as a string or items, ``instructions``, function
``tools``) is parsed into the canonical ``ChatRequest``; what any upstream type
produces is rendered back as a ``response`` object, or as the typed event sequence
with ``sequence_number`` when streamed.  No upstream speaks this dialect, so every
answer is a rendering of canonical events, never a passthrough.

We keep no server-side state: nothing is stored whatever ``store`` says, and the
rendered response says ``"store": false`` so a client knows not to refer back to it.
``previous_response_id``, ``conversation``, ``background``, ``prompt`` and
``item_reference`` items all need stored state and are refused with a 400 naming
them; a client sends the whole conversation in ``input`` instead (as it does with
``store: false`` anywhere).  ``reasoning`` items a client replays are dropped: their
(encrypted) content means nothing to another model.  The reasoning a model shows
(Claude's thinking, DeepSeek's ``reasoning_content``, Gemini's thoughts) comes first as a
``reasoning`` item whose summary is that text, streamed with the
``response.reasoning_summary_*`` events.  Errors use the OpenAI error body, as on the
other OpenAI endpoints.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
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
from chatapp.relay.dialects import HttpDialect
from chatapp.relay.dialects import openai as openai_dialect
from chatapp.relay.errors import RelayError
from chatapp.relay.upstreams import UpstreamItem
from chatapp.relay.validation import bad, field, image_from_url, integer, number
from keys.exceptions import RateWindow

#: fields that only make sense against stored responses: refused, naming the field
STATEFUL_FIELDS = {
    "previous_response_id": "a previous response",
    "conversation": "a stored conversation",
    "prompt": "a stored prompt",
}
#: why an answer stopped short, as ``incomplete_details.reason`` says it
INCOMPLETE: dict[FinishReason, str] = {
    "length": "max_output_tokens",
    "content_filter": "content_filter",
}
TEXT_KINDS = ("input_text", "output_text")


def _stateless(name: str, what: str) -> RelayError:
    return bad(
        name,
        f"this gateway keeps no responses and cannot continue from {what}; "
        "send the whole conversation in input instead.",
    )


# --- Requests ---


def parse_responses_request(body: dict[str, Any]) -> ChatRequest:
    model = field(body, "model", "", str, required=True)
    for name, what in STATEFUL_FIELDS.items():
        if body.get(name) is not None:
            raise _stateless(name, what)
    if field(body, "background", "", bool, default=False):
        raise bad(
            "background",
            "this gateway keeps no responses to poll later; "
            "send the request without background (stream it for long answers).",
        )
    field(body, "store", "", bool)  # accepted either way: nothing is ever stored
    system: list[TextPart] = []
    instructions = field(body, "instructions", "", str)
    if instructions:
        system.append(TextPart(instructions))
    raw_input = field(body, "input", "", (str, list), required=True)
    messages = (
        [Message("user", [TextPart(raw_input)])]
        if isinstance(raw_input, str)
        else _items(raw_input, system)
    )
    if not messages:
        raise bad("input", "at least one message or function call output is required")
    stream = bool(field(body, "stream", "", bool, default=False))
    user = field(body, "user", "", str)
    effort = _effort(body.get("reasoning"))
    return ChatRequest(
        model=model,
        messages=messages,
        system=system,
        tools=_tools(body.get("tools")),
        tool_choice=_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls")),
        max_tokens=integer(body, "max_output_tokens", "", 1),
        temperature=number(body, "temperature", "", 0, 2),
        top_p=number(body, "top_p", "", 0, 1),
        user=user if user is not None else field(body, "safety_identifier", "", str),
        response_format=_text_format(body.get("text")),
        reasoning_effort=effort,
        reasoning_budget=reasoning.budget_for(effort) if effort is not None else None,
        stream=stream,
        include_usage=True,  # response.completed always carries usage
        metadata=field(body, "metadata", "", dict),
        raw=body,
        dialect="responses",
    )


def _effort(raw: Any) -> str | None:
    """``reasoning.effort`` (its ``summary`` asks for what we show anyway, when there is any)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad("reasoning", 'expected an object such as {"effort": "low"}')
    effort = field(raw, "effort", "reasoning", str)
    if effort is not None and effort not in reasoning.EFFORTS:
        raise bad("reasoning.effort", f"expected one of {', '.join(reasoning.EFFORTS)}")
    return effort


def _items(items: list[Any], system: list[TextPart]) -> list[Message]:
    """Input items → canonical messages (system and developer text goes to ``system``)."""
    messages: list[Message] = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise bad(where, "expected an object")
        kind = item.get("type", "message")
        if kind == "message":
            role = field(item, "role", where, str, required=True)
            if role in ("system", "developer"):
                system.extend(_text_only(item.get("content"), f"{where}.content"))
            elif role == "user":
                messages.append(Message("user", _content(item.get("content"), f"{where}.content")))
            elif role == "assistant":
                parts: list[Part] = list(_text_only(item.get("content"), f"{where}.content"))
                messages.append(Message("assistant", parts))
            else:
                raise bad(
                    f"{where}.role",
                    f"unknown role {role!r}: expected user, assistant, system or developer",
                )
        elif kind == "function_call":
            call = ToolCallPart(
                id=field(item, "call_id", where, str, required=True),
                name=field(item, "name", where, str, required=True),
                arguments=field(item, "arguments", where, str, default="{}"),
            )
            if messages and messages[-1].role == "assistant":
                messages[-1].parts.append(call)  # one assistant turn: its text and its calls
            else:
                messages.append(Message("assistant", [call]))
        elif kind == "function_call_output":
            call_id = field(item, "call_id", where, str, required=True)
            output = item.get("output")
            content: list[TextPart | ImagePart] = (
                [TextPart(output)]
                if isinstance(output, str)
                else _result_content(output, f"{where}.output")
            )
            messages.append(Message("tool", [ToolResultPart(call_id, content)]))
        elif kind == "reasoning":
            continue  # a replayed reasoning item: its (encrypted) content is the model's own
        elif kind == "item_reference":
            raise _stateless(f"{where}.type", "a stored item")
        else:
            raise bad(
                f"{where}.type",
                f"unsupported input item type {kind!r}: expected message, function_call, "
                "function_call_output or reasoning",
            )
    return messages


def _content_list(content: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        raise bad(where, "expected a string or an array of content parts")
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            raise bad(f"{where}[{index}]", "expected an object")
    return content


def _text_only(content: Any, where: str) -> list[TextPart]:
    """Text of a system, developer or assistant message (refusals carry nothing to replay)."""
    if isinstance(content, str):
        return [TextPart(content)]
    parts = []
    for index, part in enumerate(_content_list(content, where)):
        here = f"{where}[{index}]"
        kind = part.get("type")
        if kind in TEXT_KINDS:
            parts.append(TextPart(field(part, "text", here, str, required=True)))
        elif kind != "refusal":
            raise bad(f"{here}.type", f"expected input_text or output_text, got {kind!r}")
    return parts


def _content(content: Any, where: str) -> list[Part]:
    """A user message's content: text and images."""
    if isinstance(content, str):
        return [TextPart(content)]
    parts: list[Part] = []
    for index, part in enumerate(_content_list(content, where)):
        parts.append(_text_or_image(part, f"{where}[{index}]"))
    if not parts:
        raise bad(where, "expected a string or a non-empty array of content parts")
    return parts


def _result_content(output: Any, where: str) -> list[TextPart | ImagePart]:
    """A function call's output given as content parts."""
    return [
        _text_or_image(part, f"{where}[{index}]")
        for index, part in enumerate(_content_list(output, where))
    ]


def _text_or_image(part: dict[str, Any], where: str) -> TextPart | ImagePart:
    kind = part.get("type")
    if kind in TEXT_KINDS:
        return TextPart(field(part, "text", where, str, required=True))
    if kind == "input_image":
        if part.get("file_id") is not None:
            raise bad(
                f"{where}.file_id",
                "this gateway has no files API: give the image as image_url (https or data: URL)",
            )
        detail = part.get("detail")
        if detail not in (None, "auto", "low", "high"):
            raise bad(f"{where}.detail", "expected auto, low or high")
        url = field(part, "image_url", where, str, required=True)
        return image_from_url(url, f"{where}.image_url", None if detail == "auto" else detail)
    if kind == "input_file":
        raise bad(
            f"{where}.type",
            "input_file is not supported here: send the file's text as input_text "
            "(or use /v1/chat/completions or /v1/messages, which pass files through)",
        )
    raise bad(
        f"{where}.type",
        f"unsupported content part type {kind!r}: expected input_text or input_image",
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
        if kind != "function":
            raise bad(
                f"{where}.type",
                f"unsupported tool type {kind!r}: only function tools reach the models here "
                "(built-in tools such as web_search run at OpenAI only)",
            )
        tools.append(
            Tool(
                name=field(item, "name", where, str, required=True),
                description=field(item, "description", where, str, default=""),
                parameters=field(
                    item, "parameters", where, dict, default={"type": "object", "properties": {}}
                ),
            )
        )
    return tools


def _tool_choice(raw: Any, parallel: Any) -> ToolChoice | None:
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("parallel_tool_calls", "expected a boolean")
    disable_parallel = parallel is False
    if raw is None:
        return ToolChoice("auto", disable_parallel=True) if disable_parallel else None
    if raw in ("auto", "none", "required"):
        return ToolChoice(raw, disable_parallel=disable_parallel)
    if isinstance(raw, dict) and raw.get("type") == "function" and isinstance(raw.get("name"), str):
        return ToolChoice("tool", raw["name"], disable_parallel=disable_parallel)
    raise bad("tool_choice", 'expected auto, none, required or {"type": "function", "name": ...}')


def _text_format(raw: Any) -> dict[str, Any] | None:
    """``text.format`` as the canonical (Chat Completions) ``response_format``."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad("text", "expected an object")
    text_format = field(raw, "format", "text", dict)
    if text_format is None or text_format.get("type") == "text":
        return None
    if text_format.get("type") == "json_object":
        return {"type": "json_object"}
    if text_format.get("type") == "json_schema":
        schema = {
            "name": field(text_format, "name", "text.format", str, required=True),
            "schema": field(text_format, "schema", "text.format", dict, required=True),
        }
        for name in ("description", "strict"):
            if text_format.get(name) is not None:
                schema[name] = text_format[name]
        return {"type": "json_schema", "json_schema": schema}
    raise bad("text.format.type", "expected text, json_object or json_schema")


# --- Responses ---


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.input_tokens,
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": usage.cache_write_tokens,
        },
        "output_tokens": usage.output_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def _response(
    request: ChatRequest | None,
    *,
    id: str,
    model: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: Usage | None = None,
    finish: FinishReason | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``response`` object; the request's own settings are echoed as OpenAI does."""
    raw = request.raw if request is not None and request.raw is not None else {}
    incomplete = INCOMPLETE.get(finish) if finish is not None else None
    if incomplete is not None and status == "completed":
        status = "incomplete"
    return {
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": incomplete} if status == "incomplete" else None,
        "instructions": raw.get("instructions"),
        "max_output_tokens": request.max_tokens if request is not None else None,
        "metadata": raw.get("metadata") or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": raw.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "reasoning": raw.get("reasoning"),
        "store": False,  # nothing is stored, whatever the request said
        "temperature": request.temperature if request is not None else None,
        "text": raw.get("text") or {"format": {"type": "text"}},
        "tool_choice": raw.get("tool_choice") or "auto",
        "tools": raw.get("tools") or [],
        "top_p": request.top_p if request is not None else None,
        "truncation": "disabled",
        "usage": usage_body(usage) if usage is not None else None,
        "user": raw.get("user"),
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(id: str, text: str | None, status: str) -> dict[str, Any]:
    return {
        "id": id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [_text_part(text)],
    }


def _summary_part(text: str) -> dict[str, Any]:
    return {"type": "summary_text", "text": text}


def _reasoning_item(id: str, text: str | None, status: str) -> dict[str, Any]:
    """The model's reasoning as a reasoning item's summary (no encrypted content: not replayable)."""
    return {
        "id": id,
        "type": "reasoning",
        "status": status,
        "summary": [] if text is None else [_summary_part(text)],
    }


def _call_item(id: str, call: ToolCallPart, status: str) -> dict[str, Any]:
    return {
        "id": id,
        "type": "function_call",
        "status": status,
        "arguments": call.arguments,
        "call_id": call.id,
        "name": call.name,
    }


def render_response(
    completion: Completion, *, model: str, request: ChatRequest | None, request_id: str
) -> dict[str, Any]:
    """A whole (non-streamed) reply as a ``response`` object."""
    choice = completion.choices[0] if completion.choices else None
    finish = choice.finish if choice is not None else "stop"
    status = "incomplete" if finish in INCOMPLETE else "completed"
    output: list[dict[str, Any]] = []
    # Item ids as the stream names them: the response's id and the item's position.
    if choice is not None and choice.reasoning:
        output.append(_reasoning_item(f"rs_{request_id}_0", choice.reasoning, "completed"))
    if choice is not None and (choice.text or not choice.tool_calls):
        output.append(_message_item(f"msg_{request_id}_{len(output)}", choice.text, status))
    for call in choice.tool_calls if choice is not None else ():
        output.append(_call_item(f"fc_{request_id}_{len(output)}", call, "completed"))
    return _response(
        request,
        id=f"resp_{request_id}",
        model=model,
        created_at=int(time.time()),
        status="completed",
        output=output,
        usage=completion.usage,
        finish=finish,
    )


def _sse(data: dict[str, Any]) -> bytes:
    return (
        f"event: {data['type']}\n"
        f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"
    ).encode()


ERROR_CODES = {429: "rate_limit_exceeded"}


class StreamRenderer:
    """Canonical events → the Responses API's typed SSE events.

    Items open as content arrives (a message for text, a function_call per tool
    call) and each is done before the next is added; ``response.completed`` (or
    ``response.incomplete``) waits for the end of the stream, because OpenAI-style
    upstreams send their usage after the finish reason.
    """

    def __init__(self, *, model: str, request_id: str, request: ChatRequest | None = None) -> None:
        self.model = model
        self.request = request
        self.request_id = request_id
        self.id = f"resp_{request_id}"
        self.created_at = int(time.time())
        self.sequence = 0
        self.started = False
        self.output: list[dict[str, Any]] = []  # every item so far, as its done event had it
        self.open: dict[str, Any] | None = None  # the item still receiving deltas
        self.calls: dict[int, dict[str, Any]] = {}  # tool-call index → its item
        self.finish: FinishReason | None = None
        self.usage: Usage | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return _sse(data)

    def _snapshot(self, status: str, **more: Any) -> dict[str, Any]:
        return _response(
            self.request,
            id=self.id,
            model=self.model,
            created_at=self.created_at,
            status=status,
            output=[item for item in self.output if item is not self.open],
            **more,
        )

    def _start(self) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        return [
            self._event("response.created", response=self._snapshot("in_progress")),
            self._event("response.in_progress", response=self._snapshot("in_progress")),
        ]

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self.output.append(item)
        self.open = item
        out.append(
            self._event(
                "response.output_item.added", output_index=len(self.output) - 1, item=dict(item)
            )
        )
        return out

    def _close(self) -> list[bytes]:
        """The open item's closing events."""
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.output.index(item)
        status = "incomplete" if self.finish in INCOMPLETE else "completed"
        out = []
        if item["type"] == "reasoning":
            part = item["summary"][0]
            where = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            out.append(
                self._event("response.reasoning_summary_text.done", **where, text=part["text"])
            )
            out.append(
                self._event("response.reasoning_summary_part.done", **where, part=dict(part))
            )
            item["status"] = "completed"  # the reasoning ended, whatever the answer does
            out.append(self._event("response.output_item.done", output_index=index, item=item))
            return out
        if item["type"] == "message":
            part = item["content"][0]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(
                self._event("response.output_text.done", **where, text=part["text"], logprobs=[])
            )
            out.append(self._event("response.content_part.done", **where, part=dict(part)))
        else:
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        item["status"] = status
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def _text(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        item = self.open
        if item is None or item["type"] != "message":
            item = _message_item(f"msg_{self.request_id}_{len(self.output)}", None, "in_progress")
            out += self._add(item)
            part = _text_part("")
            item["content"].append(part)
            out.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=len(self.output) - 1,
                    content_index=0,
                    part=dict(part),
                )
            )
        if text:
            item["content"][0]["text"] += text
            out.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=len(self.output) - 1,
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        return out

    def _reasoning(self, text: str) -> list[bytes]:
        out: list[bytes] = []
        item = self.open
        index = len(self.output) - 1
        if item is None or item["type"] != "reasoning":
            item = _reasoning_item(f"rs_{self.request_id}_{len(self.output)}", None, "in_progress")
            out += self._add(item)
            index = len(self.output) - 1
            part = _summary_part("")
            item["summary"].append(part)
            out.append(
                self._event(
                    "response.reasoning_summary_part.added",
                    item_id=item["id"],
                    output_index=index,
                    summary_index=0,
                    part=dict(part),
                )
            )
        item["summary"][0]["text"] += text
        out.append(
            self._event(
                "response.reasoning_summary_text.delta",
                item_id=item["id"],
                output_index=index,
                summary_index=0,
                delta=text,
            )
        )
        return out

    def render(self, event: Event) -> list[bytes]:
        if event.__class__ is not UsageEvent and getattr(event, "choice", 0) != 0:
            return []  # one output per response
        out = self._start()
        if isinstance(event, Start):
            return out
        if isinstance(event, TextDelta):
            out += self._text(event.text)
        elif isinstance(event, ReasoningDelta) and event.text:
            out += self._reasoning(event.text)
        elif isinstance(event, ToolCallStart):
            item = _call_item(
                f"fc_{self.request_id}_{len(self.output)}",
                ToolCallPart(event.id, event.name, ""),
                "in_progress",
            )
            self.calls[event.index] = item
            out += self._add(item)
        elif isinstance(event, ToolCallDelta):
            known = self.calls.get(event.index)
            if known is not None and event.arguments:
                known["arguments"] += event.arguments
                if known is self.open:
                    out.append(
                        self._event(
                            "response.function_call_arguments.delta",
                            item_id=known["id"],
                            output_index=self.output.index(known),
                            delta=event.arguments,
                        )
                    )
        elif isinstance(event, Finish):
            self.finish = event.reason
            out += self._close()
        elif isinstance(event, UsageEvent):
            self.usage = event.usage
        return out

    def item(self, item: UpstreamItem, *, passthrough: bool) -> list[bytes]:
        # No upstream speaks this dialect: every item is rendered from its events.
        return [piece for event in item.events for piece in self.render(event)]

    def end(self, *, passthrough: bool) -> list[bytes]:
        out = self._start()
        if all(item["type"] == "reasoning" for item in self.output):
            out += self._text("")  # an empty answer is still one (empty) message
        out += self._close()
        incomplete = self.finish in INCOMPLETE
        kind = "response.incomplete" if incomplete else "response.completed"
        status = "incomplete" if incomplete else "completed"
        snapshot = self._snapshot(status, usage=self.usage, finish=self.finish)
        out.append(self._event(kind, response=snapshot))
        return out

    def error(self, error: RelayError) -> list[bytes]:
        """The upstream failed mid-stream: ``response.failed`` (an ``error`` event before it started)."""
        code = ERROR_CODES.get(error.status, "server_error")
        if not self.started:
            return [self._event("error", code=code, message=error.message, param=error.param)]
        self.open = None  # left unfinished: reported as it stands
        failed = self._snapshot(
            "failed", usage=self.usage, error={"code": code, "message": error.message}
        )
        return [self._event("response.failed", response=failed)]


# --- The dialect, as the /v1 views use it ---


def error_body(error: RelayError) -> dict[str, Any]:
    return openai_dialect.error_body(error)


def rate_headers(windows: tuple[RateWindow, ...], now: datetime) -> dict[str, str]:
    return openai_dialect.rate_headers(windows, now)


@dataclass(frozen=True)
class ResponsesDialect(HttpDialect):
    """The dialect bound to one request: its renderings echo the request's settings."""

    request: ChatRequest | None = None
    request_id: str = ""

    def bind(self, request: ChatRequest | None, request_id: str) -> ResponsesDialect:
        return replace(self, request=request, request_id=request_id.removeprefix("req_"))

    def render_reply(
        self, body: dict[str, Any], completion: Any, *, model: str, passthrough: bool
    ) -> dict[str, Any]:
        return render_response(
            completion, model=model, request=self.request, request_id=self.request_id
        )

    def stream_renderer(self, *, model: str, request_id: str, include_usage: bool) -> Any:
        return StreamRenderer(model=model, request_id=request_id, request=self.request)


DIALECT = ResponsesDialect("responses", sys.modules[__name__], ("x-request-id",))
