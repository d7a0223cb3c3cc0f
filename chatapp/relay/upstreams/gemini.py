"""Google's Gemini API (the Generative Language API, v1beta) as an upstream.

A provider of type ``gemini`` has the base URL https://generativelanguage.googleapis.com
(no ``/v1beta``: the SDK's own form) and its API key goes in ``x-goog-api-key``.  A chat is
``POST /v1beta/models/{model}:generateContent``, streamed as
``:streamGenerateContent?alt=sse``: server-sent events each carrying a whole
``GenerateContentResponse`` (the text since the last one), with no terminator, so the
stream is complete once every candidate has a ``finishReason``.

How canonical requests cross over:

- the system prompt is ``systemInstruction``; assistant turns have the role ``model``;
  tool results are ``functionResponse`` parts of a user turn, named after the call they
  answer (Gemini matches them by name), their text under ``output`` (``error`` when the
  client marked the result as an error), their images as parts beside them;
- a tool's JSON Schema goes as it is in ``parametersJsonSchema``, and a ``json_schema``
  response format in ``responseJsonSchema``: no translation to Gemini's OpenAPI subset;
- images with data are ``inlineData``; an image URL is passed on as ``fileData`` (Gemini
  fetches it, never we: it must be a URL Gemini accepts, such as its Files API's);
- Gemini rarely gives function calls ids: those without one get ``call_…`` ids here.
  Gemini 3 wants each function call in the history sent back with the
  ``thoughtSignature`` it came with; canonical tool calls do not carry it, so every
  one is sent with the value Google documents for calls from elsewhere
  (``skip_thought_signature_validator``);
- thought parts (``thought: true``, thought summaries) are the reasoning, not the
  answer; their tokens (``thoughtsTokenCount``) are reasoning tokens, billed as output,
  and ``cachedContentTokenCount`` is the cached part of the input;
- a reasoning effort or budget is ``thinkingConfig.thinkingBudget`` (0 turns thinking
  off), with ``includeThoughts`` so the summaries come back.

Gemini speaks no client dialect of ours, so every client gets a rendering of the
events.  It has no embeddings or token count in a shape the pipeline reads: those fall
back (no embeddings; an estimated count).
"""

from __future__ import annotations

import json
import mimetypes
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from django.core.exceptions import ValidationError
from django.utils.translation import gettext as _

from chatapp.relay.canonical import (
    ChatRequest,
    Completion,
    CompletionChoice,
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

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
API_VERSION = "v1beta"
MODELS_PAGE = 1000  # the most GET /v1beta/models returns at once
#: what Google documents to send as the thought signature of a call it did not sign
SKIP_SIGNATURE = "skip_thought_signature_validator"
FINISH: dict[str, FinishReason] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "LANGUAGE": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
    # The model broke off or misused a tool: the reply is cut short.
    "MALFORMED_FUNCTION_CALL": "error",
    "UNEXPECTED_TOOL_CALL": "error",
    "TOO_MANY_TOOL_CALLS": "error",
    "MISSING_THOUGHT_SIGNATURE": "error",
    "MALFORMED_RESPONSE": "error",
    "OTHER": "error",
}


def headers(target: Target) -> dict[str, str]:
    out = {"content-type": "application/json", "accept": "application/json"}
    if target.api_key:
        out["x-goog-api-key"] = target.api_key
    out.update(target.extra_headers)
    return out


def model_path(name: str) -> str:
    """``models/{name}``; a full resource name (``tunedModels/…``) is kept as it is."""
    path = name if "/" in name else f"models/{name}"
    return quote(path, safe="/")


def build_chat(target: Target, request: ChatRequest) -> HttpCall:
    body = _body(target, request)
    method = "streamGenerateContent?alt=sse" if request.stream else "generateContent"
    url = f"{target.base_url}/{API_VERSION}/{model_path(target.upstream_model)}:{method}"
    return HttpCall(url, headers(target), body)


def _image(part: ImagePart) -> dict[str, Any]:
    if part.url is None:
        return {"inlineData": {"mimeType": part.media_type, "data": part.data}}
    guessed, _encoding = mimetypes.guess_type(urlsplit(part.url).path)
    media_type = guessed if guessed and guessed.startswith("image/") else "image/jpeg"
    return {"fileData": {"mimeType": media_type, "fileUri": part.url}}


def _arguments(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _parts(parts: list[Part], names: dict[str, str], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            if part.text:  # Gemini refuses empty parts
                out.append({"text": part.text})
        elif isinstance(part, ImagePart):
            out.append(_image(part))
        elif isinstance(part, ToolCallPart):
            out.append(
                {
                    "functionCall": {
                        "id": part.id,
                        "name": part.name,
                        "args": _arguments(part.arguments),
                    },
                    "thoughtSignature": SKIP_SIGNATURE,
                }
            )
        elif isinstance(part, ToolResultPart):
            name = names.get(part.tool_call_id)
            if name is None:
                raise RelayError(
                    400,
                    f"{where}: the tool result for '{part.tool_call_id}' answers no tool call "
                    "earlier in the conversation; a Gemini upstream needs the function's name.",
                    param=where,
                )
            key = "error" if part.is_error else "output"
            out.append(
                {
                    "functionResponse": {
                        "id": part.tool_call_id,
                        "name": name,
                        "response": {key: part.text},
                    }
                }
            )
            # Images a tool returned ride beside its response, in the same user turn.
            out.extend(_image(item) for item in part.content if isinstance(item, ImagePart))
    return out


def _contents(messages: list[Message]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool call id → function name, for the results that follow
    contents: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        for part in message.parts:
            if isinstance(part, ToolCallPart):
                names[part.id] = part.name
        role = "model" if message.role == "assistant" else "user"  # tool results: user turns
        parts = _parts(message.parts, names, f"messages[{index}]")
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            # One turn per role change: the responses to parallel calls go back together.
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return contents


def _response_format(config: dict[str, Any], response_format: dict[str, Any]) -> None:
    kind = response_format.get("type")
    if kind == "json_object":
        config["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        config["responseMimeType"] = "application/json"
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            config["responseJsonSchema"] = schema


def _body(target: Target, request: ChatRequest) -> dict[str, Any]:
    check_translatable(request, target.upstream)
    body: dict[str, Any] = {"contents": _contents(request.messages)}
    system = [{"text": part.text} for part in request.system if part.text]
    if system:
        body["systemInstruction"] = {"parts": system}
    if request.tools:
        declarations = []
        for tool in request.tools:
            declaration: dict[str, Any] = {"name": tool.name}
            if tool.description:
                declaration["description"] = tool.description
            if tool.parameters:
                declaration["parametersJsonSchema"] = tool.parameters
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
        choice = request.tool_choice
        if choice is not None:
            mode = {"auto": "AUTO", "none": "NONE", "required": "ANY", "tool": "ANY"}[choice.mode]
            calling: dict[str, Any] = {"mode": mode}
            if choice.mode == "tool" and choice.name:
                calling["allowedFunctionNames"] = [choice.name]
            body["toolConfig"] = {"functionCallingConfig": calling}
    config: dict[str, Any] = {}
    optional = {
        "maxOutputTokens": request.max_tokens,
        "temperature": request.temperature,
        "topP": request.top_p,
        "topK": request.top_k,
        "seed": request.seed,
        "presencePenalty": request.presence_penalty,
        "frequencyPenalty": request.frequency_penalty,
    }
    config.update({name: value for name, value in optional.items() if value is not None})
    if request.stop:
        config["stopSequences"] = request.stop
    if request.n > 1:
        config["candidateCount"] = request.n
    if request.response_format:
        _response_format(config, request.response_format)
    if request.reasoning_budget is not None:
        # includeThoughts: the thought summaries come back, shown as the reasoning.
        thinking: dict[str, Any] = {"thinkingBudget": request.reasoning_budget}
        if request.reasoning_budget:
            thinking["includeThoughts"] = True
        config["thinkingConfig"] = thinking
    if config:
        body["generationConfig"] = config
    return body


# --- Responses ---


def usage_from(raw: Any) -> Usage | None:
    """``usageMetadata``: cached tokens are part of the prompt's; thinking is output."""
    if not isinstance(raw, dict):
        return None
    return Usage(
        input_tokens=int(raw.get("promptTokenCount") or 0)
        + int(raw.get("toolUsePromptTokenCount") or 0),
        output_tokens=int(raw.get("candidatesTokenCount") or 0)
        + int(raw.get("thoughtsTokenCount") or 0),
        cached_tokens=int(raw.get("cachedContentTokenCount") or 0),
        reasoning_tokens=int(raw.get("thoughtsTokenCount") or 0),
    )


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(raw: dict[str, Any]) -> ToolCallPart:
    call = raw["functionCall"]
    return ToolCallPart(
        str(call.get("id") or new_call_id()),
        str(call["name"]),
        json.dumps(call.get("args") or {}, ensure_ascii=False),
    )


def _finish(candidate: dict[str, Any], with_calls: bool) -> FinishReason:
    finish = FINISH.get(str(candidate.get("finishReason") or "STOP"), "stop")
    # Gemini says STOP when the model called functions.
    return "tool_calls" if with_calls and finish == "stop" else finish


def _candidates(body: dict[str, Any]) -> list[dict[str, Any]]:
    candidates = body.get("candidates")
    if candidates is None:
        return []
    if not isinstance(candidates, list):
        raise TypeError("candidates is not a list")
    # proto3 JSON leaves out an index of 0
    return sorted(candidates, key=lambda candidate: int(candidate.get("index") or 0))


def _parts_of(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    content = candidate.get("content") or {}
    return [part for part in content.get("parts") or () if isinstance(part, dict)]


def blocked(body: dict[str, Any]) -> bool:
    """Whether Gemini refused the prompt itself (``promptFeedback.blockReason``)."""
    feedback = body.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def parse_completion(body: dict[str, Any]) -> Completion:
    try:
        choices = []
        for candidate in _candidates(body):
            choice = CompletionChoice()
            for part in _parts_of(candidate):
                if "functionCall" in part:
                    choice.tool_calls.append(_call(part))
                elif isinstance(part.get("text"), str) and part.get("thought"):
                    choice.reasoning += part["text"]
                elif isinstance(part.get("text"), str):
                    choice.text += part["text"]
            choice.finish = _finish(candidate, bool(choice.tool_calls))
            choices.append(choice)
        if not choices:
            if not blocked(body):
                raise KeyError("candidates")
            choices.append(CompletionChoice(finish="content_filter"))
        return Completion(
            id=str(body.get("responseId", "")),
            model=str(body.get("modelVersion", "")),
            choices=choices,
            usage=usage_from(body.get("usageMetadata")),
        )
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise UpstreamError(
            f"malformed generateContent answer from upstream ({exc!r})", retryable=False
        ) from None


class StreamParser:
    """``GenerateContentResponse`` chunks → canonical events.

    Usage comes in every chunk, counted so far; the last one's is the reply's, sent
    once every candidate has finished.
    """

    def __init__(self) -> None:
        self.started = False
        self.calls: dict[int, int] = {}  # candidate → tool calls so far
        self.open: set[int] = set()  # candidates that have not finished
        self.closed: set[int] = set()
        self.usage: Usage | None = None
        self.done = False

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        usage = usage_from(chunk.get("usageMetadata"))
        if usage is not None:
            self.usage = usage
        if not self.started:
            self.started = True
            events.append(
                Start(
                    id=str(chunk.get("responseId", "")),
                    model=str(chunk.get("modelVersion", "")),
                    input_tokens=usage.input_tokens if usage else None,
                )
            )
        for candidate in _candidates(chunk):
            index = int(candidate.get("index") or 0)
            if index not in self.closed:
                self.open.add(index)
            for part in _parts_of(candidate):
                if "functionCall" in part:
                    call = _call(part)
                    position = self.calls.get(index, 0)
                    self.calls[index] = position + 1
                    events.append(ToolCallStart(position, call.id, call.name, index))
                    events.append(ToolCallDelta(position, call.arguments, index))
                elif isinstance(part.get("text"), str) and part["text"]:
                    kind = ReasoningDelta if part.get("thought") else TextDelta
                    events.append(kind(part["text"], index))
            if candidate.get("finishReason") and index in self.open:
                self.open.discard(index)
                self.closed.add(index)
                events.append(Finish(_finish(candidate, index in self.calls), choice=index))
        if not self.closed and not self.open and blocked(chunk):
            self.closed.add(0)
            events.append(Finish("content_filter"))
        if self.closed and not self.open:
            self.done = True
            events.append(UsageEvent(self.usage or Usage()))
        return events


class Decoder(StreamDecoder):
    """``data: {GenerateContentResponse}`` events, complete once every candidate has finished."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.parser = StreamParser()
        self.finished = False

    def feed(self, name: str, data: str) -> UpstreamItem | None:
        raw = stream_json(self.target, data)
        if "error" in raw and "candidates" not in raw:
            error = raw["error"] if isinstance(raw["error"], dict) else {}
            raise UpstreamError(
                f"{self.target.provider} reported an error mid-stream: "
                f"{error.get('status', 'error')}: {error.get('message', '')}",
                retryable=False,
            )
        try:
            events = self.parser.feed(raw)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise UpstreamError(
                f"{self.target.provider} sent a malformed stream chunk ({exc!r})", retryable=False
            ) from None
        self.finished = self.parser.done
        return UpstreamItem(name, raw, events)


def error_message(text: str) -> str:
    """``{"error": {"code", "message", "status"}}`` → "message (STATUS)"."""
    try:
        body = json.loads(text)
    except ValueError:
        return text[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(body, list) and body and isinstance(body[0], dict):
        error = body[0].get("error")  # a stream refused at once comes as a JSON array
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return text[:300]
    status = error.get("status")
    return f"{error['message']} ({status})" if isinstance(status, str) else error["message"]


def error_reasons(text: str) -> list[str]:
    """The ``reason`` of each ``ErrorInfo`` in ``error.details`` of an error body."""
    try:
        body = json.loads(text)
    except ValueError:
        return []
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return (
        [
            detail["reason"]
            for detail in details or ()
            if isinstance(detail, dict) and isinstance(detail.get("reason"), str)
        ]
        if isinstance(details, list)
        else []
    )


class GeminiUpstream(Upstream):
    """Google's Gemini API (``generativelanguage.googleapis.com``)."""

    type = "gemini"
    label = "a Gemini"

    def build_chat(self, target: Target, request: ChatRequest) -> HttpCall:
        return build_chat(target, request)

    def parse_completion(self, body: dict[str, Any]) -> Completion:
        return parse_completion(body)

    def stream_decoder(self, target: Target) -> StreamDecoder:
        return Decoder(target)

    def error_message(self, text: str) -> str:
        return error_message(text)

    def error_status(self, status: int, text: str) -> int:
        # Google answers an API key it does not know with a 400 INVALID_ARGUMENT whose
        # reason is API_KEY_INVALID: our credentials, so a 401 (the client gets a 502).
        return 401 if status == 400 and "API_KEY_INVALID" in error_reasons(text) else status

    def build_list_models(self, target: Target, after: str | None = None) -> HttpCall | None:
        # GET /v1beta/models pages with pageSize / pageToken, answering nextPageToken.
        query = f"?pageSize={MODELS_PAGE}" + (f"&pageToken={quote(after)}" if after else "")
        return HttpCall(f"{target.base_url}/{API_VERSION}/models{query}", headers(target), {})

    def parse_models(self, body: dict[str, Any]) -> tuple[list[str], str | None]:
        models = body.get("models")
        ids: list[str] = []
        for item in models if isinstance(models, list) else ():
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            methods = item.get("supportedGenerationMethods")
            if isinstance(methods, list) and "generateContent" not in methods:
                continue  # embedding and other models that cannot chat
            ids.append(item["name"].removeprefix("models/"))
        token = body.get("nextPageToken")
        return ids, token if isinstance(token, str) and token and models else None

    def clean_provider(self, provider: Provider) -> None:
        if provider.base_url.endswith(("/v1beta", "/v1")):
            raise ValidationError(
                {
                    "base_url": _(
                        "Gemini base URLs stop before /v1beta, e.g. "
                        "https://generativelanguage.googleapis.com."
                    )
                }
            )
