"""The native Anthropic Messages API as an upstream."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from django.core.exceptions import ValidationError
from django.utils.translation import gettext as _

from chatapp.relay import reasoning
from chatapp.relay.canonical import (
    ChatRequest,
    Completion,
    CompletionChoice,
    Event,
    Finish,
    FinishReason,
    ImagePart,
    Part,
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
from chatapp.relay.errors import RelayError, UpstreamError
from chatapp.relay.upstreams import (
    HttpCall,
    StreamDecoder,
    Target,
    Upstream,
    UpstreamItem,
    check_translatable,
    stream_json,
)

if TYPE_CHECKING:
    from chatapp.models import Provider

API_VERSION = "2023-06-01"
MODELS_PAGE = 1000  # the most GET /v1/models returns at once
_INVALID_ID = re.compile(r"[^a-zA-Z0-9_-]")
FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop_sequence",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
    "model_context_window_exceeded": "length",
}


def headers(target: Target) -> dict[str, str]:
    out = {
        "content-type": "application/json",
        "accept": "application/json",
        "anthropic-version": API_VERSION,
    }
    if target.api_key:
        out["x-api-key"] = target.api_key
    out.update(target.extra_headers)
    return out


def build_chat(target: Target, request: ChatRequest) -> HttpCall:
    if request.dialect == "anthropic" and request.raw is not None:
        body = dict(request.raw)
        body["model"] = target.upstream_model
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
    else:
        body = _body_from_canonical(target, request)
    if request.stream:
        body["stream"] = True
    else:
        body.pop("stream", None)
    return HttpCall(f"{target.base_url}/v1/messages", headers(target), body)


def build_count_tokens(target: Target, request: ChatRequest) -> HttpCall:
    body = _body_from_canonical(target, request)
    body.pop("max_tokens", None)
    for name in ("temperature", "top_p", "top_k", "stop_sequences", "metadata", "stream"):
        body.pop(name, None)
    return HttpCall(f"{target.base_url}/v1/messages/count_tokens", headers(target), body)


def _image(part: ImagePart) -> dict[str, Any]:
    if part.url is not None:
        return {"type": "image", "source": {"type": "url", "url": part.url}}
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": part.media_type, "data": part.data},
    }


def tool_id(value: str) -> str:
    """Anthropic tool ids match ^[a-zA-Z0-9_-]+$; other providers' (e.g. "fn:0") are mapped."""
    return _INVALID_ID.sub("_", value) or "toolu_empty"


def _blocks(parts: list[Part]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            if part.text:
                out.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            out.append(_image(part))
        elif isinstance(part, ToolCallPart):
            try:
                arguments = json.loads(part.arguments or "{}")
            except json.JSONDecodeError:
                arguments = {}
            out.append(
                {
                    "type": "tool_use",
                    "id": tool_id(part.id),
                    "name": part.name,
                    "input": arguments if isinstance(arguments, dict) else {},
                }
            )
        elif isinstance(part, ToolResultPart):
            content: list[dict[str, Any]] = [
                {"type": "text", "text": item.text} if isinstance(item, TextPart) else _image(item)
                for item in part.content
                if not (isinstance(item, TextPart) and not item.text)  # no empty text blocks
            ]
            block: dict[str, Any] = {
                "type": "tool_result",
                "tool_use_id": tool_id(part.tool_call_id),
                "content": content,
            }
            if part.is_error:
                block["is_error"] = True
            out.append(block)
    return out


def _body_from_canonical(target: Target, request: ChatRequest) -> dict[str, Any]:
    check_translatable(request, target.upstream)
    if request.n > 1:
        raise RelayError(
            400,
            f"n: this model's upstream returns one choice per request, got n={request.n}",
            param="n",
        )
    messages: list[dict[str, Any]] = []
    for message in request.messages:
        role = (
            "assistant" if message.role == "assistant" else "user"
        )  # tool results ride in user turns
        blocks = _blocks(message.parts)
        if not blocks:
            continue
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)  # Anthropic wants strictly alternating roles
        else:
            messages.append({"role": role, "content": blocks})
    body: dict[str, Any] = {
        "model": target.upstream_model,
        "messages": messages,
        "max_tokens": request.max_tokens or target.max_output_tokens,
    }
    if request.system:
        body["system"] = "\n\n".join(part.text for part in request.system)
    if request.temperature is not None:
        body["temperature"] = min(
            request.temperature, 1.0
        )  # OpenAI's range is 0-2, Anthropic's 0-1
    if request.top_p is not None:
        body["top_p"] = request.top_p
    if request.top_k is not None:
        body["top_k"] = request.top_k
    if request.stop:
        body["stop_sequences"] = request.stop
    if request.user:
        body["metadata"] = {"user_id": request.user}
    if request.tools:
        body["tools"] = [
            {"name": tool.name, "description": tool.description, "input_schema": tool.parameters}
            for tool in request.tools
        ]
    choice = request.tool_choice
    if choice is not None and request.tools:
        mapped: dict[str, Any] = {
            "type": {"auto": "auto", "none": "none", "required": "any", "tool": "tool"}[choice.mode]
        }
        if choice.mode == "tool":
            mapped["name"] = choice.name
        if choice.disable_parallel and choice.mode != "none":
            mapped["disable_parallel_tool_use"] = True
        body["tool_choice"] = mapped
    _thinking(body, request, target)
    return body


def _thinking(body: dict[str, Any], request: ChatRequest, target: Target) -> None:
    """Reasoning asked for (an effort or a budget) as Anthropic's ``thinking``.

    Anthropic wants a budget of at least 1,024 tokens, below ``max_tokens``: a smaller
    ``max_tokens`` is kept for the answer on top of the budget, as far as the model's
    output limit allows (the budget shrinks to fit under it, or thinking stays off).  Thinking does not go with
    a forced tool (left without thinking) nor with a changed temperature (dropped), and
    top_p must be at least 0.95.
    """
    budget = request.reasoning_budget
    if not budget:
        return
    forced = body.get("tool_choice", {}).get("type") in ("any", "tool")
    if forced:
        return
    budget = max(budget, reasoning.ANTHROPIC_MIN_BUDGET)
    if body["max_tokens"] <= budget:
        body["max_tokens"] = min(body["max_tokens"] + budget, target.max_output_tokens)
        # The model's output limit comes first: the budget shrinks below it.
        budget = min(budget, body["max_tokens"] - 1)
        if budget < reasoning.ANTHROPIC_MIN_BUDGET:
            return
    body["thinking"] = {"type": "enabled", "budget_tokens": budget}
    body.pop("temperature", None)
    if body.get("top_p", 1) < 0.95:
        body["top_p"] = 0.95


# --- Responses ---


def usage_from(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    cached = int(raw.get("cache_read_input_tokens") or 0)
    created = int(raw.get("cache_creation_input_tokens") or 0)
    return Usage(
        input_tokens=int(raw.get("input_tokens") or 0) + cached + created,
        output_tokens=int(raw.get("output_tokens") or 0),
        cached_tokens=cached,
        cache_write_tokens=created,
    )


def parse_completion(body: dict[str, Any]) -> Completion:
    try:
        choice = CompletionChoice()
        for block in body["content"]:
            if block.get("type") == "text":
                choice.text += block["text"]
            elif block.get("type") == "thinking":
                choice.reasoning += block.get("thinking") or ""
            elif block.get("type") == "tool_use":
                choice.tool_calls.append(
                    ToolCallPart(
                        block["id"],
                        block["name"],
                        json.dumps(block.get("input") or {}, ensure_ascii=False),
                    )
                )
        choice.finish = FINISH.get(body.get("stop_reason") or "end_turn", "stop")
        choice.stop_sequence = body.get("stop_sequence")
        return Completion(
            id=str(body.get("id", "")),
            model=str(body.get("model", "")),
            choices=[choice],
            usage=usage_from(body.get("usage")),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise UpstreamError(f"malformed message from upstream ({exc!r})", retryable=False) from None


class StreamParser:
    """Anthropic SSE events → canonical events."""

    def __init__(self) -> None:
        self.tool_index: dict[int, int] = {}  # content block index → tool-call position
        self.usage = Usage()
        self.finish: Finish | None = None

    def feed(self, name: str, data: dict[str, Any]) -> list[Event]:
        kind = data.get("type", name)
        if kind == "message_start":
            message = data.get("message") or {}
            usage = usage_from(message.get("usage")) or Usage()
            self.usage = usage
            return [
                Start(
                    id=str(message.get("id", "")),
                    model=str(message.get("model", "")),
                    input_tokens=usage.input_tokens,
                )
            ]
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                position = len(self.tool_index)
                self.tool_index[int(data.get("index", 0))] = position
                return [ToolCallStart(position, block.get("id", ""), block.get("name", ""))]
            if block.get("type") == "text" and block.get("text"):
                return [TextDelta(block["text"])]
            if block.get("type") == "thinking" and block.get("thinking"):
                return [ReasoningDelta(block["thinking"])]
            return []
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta":
                return [TextDelta(delta.get("text", ""))]
            if delta.get("type") == "thinking_delta" and delta.get("thinking"):
                return [ReasoningDelta(delta["thinking"])]
            if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                position = self.tool_index.get(int(data.get("index", 0)), 0)
                return [ToolCallDelta(position, delta["partial_json"])]
            return []
        if kind == "message_delta":
            delta = data.get("delta") or {}
            reported = data.get("usage") or {}
            if "output_tokens" in reported:
                self.usage.output_tokens = int(reported["output_tokens"] or 0)
            if reported.get("input_tokens") is not None:
                refreshed = usage_from(reported)
                if refreshed is not None:
                    self.usage.input_tokens = refreshed.input_tokens
                    self.usage.cached_tokens = refreshed.cached_tokens
                    self.usage.cache_write_tokens = refreshed.cache_write_tokens
            if delta.get("stop_reason"):
                self.finish = Finish(
                    FINISH.get(delta["stop_reason"], "stop"), delta.get("stop_sequence")
                )
            return []
        if kind == "message_stop":
            return [self.finish or Finish("stop"), UsageEvent(self.usage)]
        if kind == "error":
            error = data.get("error") or {}
            raise UpstreamError(
                f"upstream error mid-stream: {error.get('type', 'error')}: {error.get('message', '')}",
                retryable=False,
            )
        return []


class Decoder(StreamDecoder):
    """Named SSE events up to ``message_stop``."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.parser = StreamParser()
        self.finished = False

    def feed(self, name: str, data: str) -> UpstreamItem | None:
        raw = stream_json(self.target, data)
        item = UpstreamItem(name, raw, self.parser.feed(name, raw))
        if raw.get("type") == "message_stop":
            self.finished = True
        return item


class AnthropicUpstream(Upstream):
    """Anthropic's Messages API."""

    type = "anthropic"
    label = "an Anthropic"
    dialect = "anthropic"

    def build_chat(self, target: Target, request: ChatRequest) -> HttpCall:
        return build_chat(target, request)

    def parse_completion(self, body: dict[str, Any]) -> Completion:
        return parse_completion(body)

    def stream_decoder(self, target: Target) -> StreamDecoder:
        return Decoder(target)

    def build_count_tokens(self, target: Target, request: ChatRequest) -> HttpCall | None:
        return build_count_tokens(target, request)

    def build_list_models(self, target: Target, after: str | None = None) -> HttpCall | None:
        # GET /v1/models pages with limit / after_id, answering has_more and last_id.
        query = f"?limit={MODELS_PAGE}" + (f"&after_id={quote(after)}" if after else "")
        return HttpCall(f"{target.base_url}/v1/models{query}", headers(target), {})

    def parse_models(self, body: dict[str, Any]) -> tuple[list[str], str | None]:
        ids, _cursor = super().parse_models(body)
        last = body.get("last_id")
        more = body.get("has_more") is True and isinstance(last, str) and bool(ids)
        return ids, last if more else None

    def clean_provider(self, provider: Provider) -> None:
        if provider.base_url.endswith("/v1"):
            raise ValidationError(
                {
                    "base_url": _(
                        "Anthropic base URLs stop before /v1, e.g. https://api.anthropic.com."
                    )
                }
            )
