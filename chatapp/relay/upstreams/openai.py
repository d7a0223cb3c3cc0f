"""OpenAI-compatible upstreams (OpenAI, DeepSeek, Qwen, Moonshot, GLM, vLLM, Ollama, llama.cpp)."""

from __future__ import annotations

from typing import Any, ClassVar

from chatapp.relay.canonical import (
    ChatRequest,
    Completion,
    CompletionChoice,
    Event,
    Finish,
    FinishReason,
    ImagePart,
    Message,
    ReasoningDelta,
    Start,
    TextDelta,
    TextPart,
    ToolCallDelta,
    ToolCallPart,
    ToolCallStart,
    ToolResultPart,
    Usage,
    UsageEvent,
)
from chatapp.relay.errors import UpstreamError
from chatapp.relay.upstreams import (
    HttpCall,
    StreamDecoder,
    Target,
    Upstream,
    UpstreamItem,
    check_translatable,
    error_message,
    stream_json,
)

FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def headers(target: Target) -> dict[str, str]:
    out = {"content-type": "application/json", "accept": "application/json"}
    if target.api_key:
        out["authorization"] = f"Bearer {target.api_key}"
    out.update(target.extra_headers)
    return out


def build_chat(target: Target, request: ChatRequest) -> HttpCall:
    if request.dialect == "openai" and request.raw is not None:
        # Same dialect: forward the client's body so unknown fields pass through.
        body = dict(request.raw)
        body["model"] = target.upstream_model
        if request.max_tokens is not None:
            # The limit may have been set or clamped by the key: write it where the client did.
            body["max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"] = (
                request.max_tokens
            )
    else:
        body = _body_from_canonical(target, request)
    if request.stream:
        body["stream"] = True
        # Always ask for usage: billing needs the upstream's own counts.
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    else:
        body.pop("stream_options", None)
    return HttpCall(f"{target.base_url}/chat/completions", headers(target), body)


def build_embeddings(target: Target, body: dict[str, Any]) -> HttpCall:
    return HttpCall(
        f"{target.base_url}/embeddings", headers(target), {**body, "model": target.upstream_model}
    )


def _content(parts: list[Any]) -> str | list[dict[str, Any]]:
    if len(parts) == 1 and isinstance(parts[0], TextPart):
        return parts[0].text
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            out.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            image: dict[str, Any] = {"url": part.data_url}
            if part.detail:
                image["detail"] = part.detail
            out.append({"type": "image_url", "image_url": image})
    return out


def _messages(request: ChatRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if request.system:
        out.append({"role": "system", "content": "\n\n".join(part.text for part in request.system)})
    for message in request.messages:
        out.extend(_message(message))
    return out


def _message(message: Message) -> list[dict[str, Any]]:
    if message.role == "tool":
        results = [part for part in message.parts if isinstance(part, ToolResultPart)]
        out: list[dict[str, Any]] = []
        for result in results:
            out.append(
                {"role": "tool", "tool_call_id": result.tool_call_id, "content": result.text}
            )
            images = [part for part in result.content if isinstance(part, ImagePart)]
            if images:  # OpenAI tool messages carry text only: images follow as a user turn
                out.append({"role": "user", "content": _content(images)})
        return out
    if message.role == "assistant":
        text = "".join(part.text for part in message.parts if isinstance(part, TextPart))
        calls = [part for part in message.parts if isinstance(part, ToolCallPart)]
        body: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            body["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in calls
            ]
        return [body]
    body = {"role": "user", "content": _content(message.parts)}
    if message.name:
        body["name"] = message.name
    return [body]


def _body_from_canonical(target: Target, request: ChatRequest) -> dict[str, Any]:
    check_translatable(request, target.upstream)
    body: dict[str, Any] = {"model": target.upstream_model, "messages": _messages(request)}
    optional = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "seed": request.seed,
        "user": request.user,
        "response_format": request.response_format,
        "reasoning_effort": request.reasoning_effort,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if request.stop:
        body["stop"] = request.stop
    if request.n > 1:
        body["n"] = request.n
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.name,
                    "description": tool.description,
                    "parameters": tool.parameters,
                },
            }
            for tool in request.tools
        ]
    choice = request.tool_choice
    if choice is not None:
        if choice.mode == "tool":
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            body["tool_choice"] = choice.mode
        if choice.disable_parallel and request.tools:
            body["parallel_tool_calls"] = False
    return body


# --- Responses ---


def usage_from(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details") or {}
    output_details = raw.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=int(raw.get("prompt_tokens") or 0),
        output_tokens=int(raw.get("completion_tokens") or 0),
        cached_tokens=int((details.get("cached_tokens") if isinstance(details, dict) else 0) or 0),
        reasoning_tokens=int(
            (output_details.get("reasoning_tokens") if isinstance(output_details, dict) else 0) or 0
        ),
    )


def reasoning_of(raw: dict[str, Any]) -> str:
    """A message's or delta's reasoning: ``reasoning_content`` (DeepSeek, vLLM, Qwen) or
    ``reasoning`` (OpenRouter, newer vLLM)."""
    for name in ("reasoning_content", "reasoning"):
        value = raw.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def parse_completion(body: dict[str, Any]) -> Completion:
    try:
        choices = []
        for raw in sorted(body["choices"], key=lambda item: item.get("index", 0)):
            message = raw.get("message") or {}
            calls = [
                ToolCallPart(
                    call.get("id", ""),
                    call["function"]["name"],
                    call["function"].get("arguments") or "",
                )
                for call in message.get("tool_calls") or []
            ]
            finish = FINISH.get(raw.get("finish_reason") or "stop", "stop")
            if calls and finish == "stop":
                finish = "tool_calls"  # OpenAI says "stop" when tool_choice named the function
            choices.append(
                CompletionChoice(
                    text=message.get("content") or "",
                    reasoning=reasoning_of(message),
                    tool_calls=calls,
                    finish=finish,
                )
            )
        return Completion(
            id=str(body.get("id", "")),
            model=str(body.get("model", "")),
            choices=choices,
            usage=usage_from(body.get("usage")),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise UpstreamError(
            f"malformed chat completion from upstream ({exc!r})", retryable=False
        ) from None


class StreamParser:
    """``chat.completion.chunk`` objects → canonical events."""

    def __init__(self) -> None:
        self.started = False
        self.with_tools: set[int] = set()  # choices that produced tool calls

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        if not self.started:
            self.started = True
            events.append(Start(id=str(chunk.get("id", "")), model=str(chunk.get("model", ""))))
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index") or 0)
            delta = choice.get("delta") or {}
            thought = reasoning_of(delta)
            if thought:
                events.append(ReasoningDelta(thought, index))
            if delta.get("content"):
                events.append(TextDelta(delta["content"], index))
            for call in delta.get("tool_calls") or ():
                position = int(call.get("index") or 0)
                function = call.get("function") or {}
                if call.get("id"):
                    self.with_tools.add(index)
                    events.append(
                        ToolCallStart(position, call["id"], function.get("name") or "", index)
                    )
                if function.get("arguments"):
                    events.append(ToolCallDelta(position, function["arguments"], index))
            if choice.get("finish_reason"):
                finish = FINISH.get(choice["finish_reason"], "stop")
                if finish == "stop" and index in self.with_tools:
                    finish = "tool_calls"  # OpenAI says "stop" when tool_choice named the function
                events.append(Finish(finish, choice=index))
        usage = usage_from(chunk.get("usage"))
        if usage is not None:
            events.append(UsageEvent(usage))
        return events


class Decoder(StreamDecoder):
    """``data: {chunk}`` lines up to ``data: [DONE]``; an error object mid-stream fails it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.parser = StreamParser()
        self.finished = False

    def feed(self, name: str, data: str) -> UpstreamItem | None:
        if data.strip() == "[DONE]":
            self.finished = True
            return None
        raw = stream_json(self.target, data)
        if "error" in raw and "choices" not in raw:
            raise UpstreamError(
                f"{self.target.provider} reported an error mid-stream: {error_message(data)}",
                retryable=False,
            )
        return UpstreamItem(name, raw, self.parser.feed(raw))


class OpenAIUpstream(Upstream):
    """Any server that speaks OpenAI's Chat Completions and Embeddings APIs."""

    type = "openai"
    label = "an OpenAI-compatible"
    dialect: ClassVar[str | None] = "openai"

    def build_chat(self, target: Target, request: ChatRequest) -> HttpCall:
        return build_chat(target, request)

    def parse_completion(self, body: dict[str, Any]) -> Completion:
        return parse_completion(body)

    def stream_decoder(self, target: Target) -> StreamDecoder:
        return Decoder(target)

    def build_embeddings(self, target: Target, body: dict[str, Any]) -> HttpCall | None:
        return build_embeddings(target, body)

    def build_list_models(self, target: Target, after: str | None = None) -> HttpCall | None:
        # GET /models: one page, no cursor.
        return HttpCall(f"{target.base_url}/models", headers(target), {})
