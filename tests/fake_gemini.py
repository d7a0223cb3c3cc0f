"""A fake Gemini API: a real HTTP server on loopback speaking Google's Generative Language API.

The wire format of ``v1beta`` as the ``google-genai`` SDK and Google's REST docs show it:

- ``POST /v1beta/models/{model}:generateContent`` → a ``GenerateContentResponse``;
- ``POST /v1beta/models/{model}:streamGenerateContent?alt=sse`` → ``data:`` events, each a
  ``GenerateContentResponse`` with the text since the previous one, no terminator; without
  ``alt=sse`` the same chunks as one JSON array (as the real API streams them);
- ``POST /v1beta/models/{model}:countTokens`` → ``{"totalTokens": n}``;
- ``GET /v1beta/models`` (``pageSize`` / ``pageToken`` → ``nextPageToken``) and
  ``GET /v1beta/models/{model}``;
- the key in ``x-goog-api-key`` (or ``?key=``); errors as ``{"error": {"code", "message",
  "status"}}`` with Google's status names (an unknown key is a 400 ``INVALID_ARGUMENT``
  with the reason ``API_KEY_INVALID``, as Google answers it).

Like the real API it refuses (400) unknown field names, function calls in the history
without a ``thoughtSignature`` (Gemini 3), function responses that do not match the
calls of the turn before in number, and parts that are empty.

It is :class:`tests.fake_upstream.FakeUpstream` with another dispatcher: the same
behaviours are scripted (``Reply``, ``Fail``, ``DropMidStream``, ``Malformed``, ``Hang``),
and :class:`GeminiReply` adds what only Gemini says (thoughts, a blocked prompt).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fake_upstream import (
    DropMidStream,
    Fail,
    FakeUpstream,
    Hang,
    Malformed,
    Receive,
    RecordedRequest,
    Reply,
    Send,
    _AbortConnection,
    _arguments_object,
    _dumps,
    _new_id,
    _send_json,
    _send_raw,
    split_words,
)

#: (model id, supported generation methods) as GET /v1beta/models lists them
GEMINI_MODELS = [
    ("gemini-2.5-flash", ["generateContent", "countTokens", "createCachedContent"]),
    ("gemini-2.5-pro", ["generateContent", "countTokens", "createCachedContent"]),
    ("gemini-embedding-001", ["embedContent", "countTextTokens", "countTokens"]),
    ("gemini-3-flash-preview", ["generateContent", "countTokens"]),
]
DEFAULT_PAGE = 50
THOUGHT_SIGNATURE = "CiQBVKhc7tF4a2Vfc2lnbmF0dXJl"

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
FINISH = {
    "stop": "STOP",
    "stop_sequence": "STOP",
    "tool_calls": "STOP",
    "length": "MAX_TOKENS",
    "content_filter": "SAFETY",
}

# Field names the API knows (camelCase; proto JSON also takes snake_case).
REQUEST_FIELDS = {
    "contents",
    "systemInstruction",
    "tools",
    "toolConfig",
    "generationConfig",
    "safetySettings",
    "cachedContent",
    "labels",
}
GENERATION_FIELDS = {
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "thinkingConfig",
    "mediaResolution",
    "speechConfig",
}
PART_DATA = {
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
}
PART_FIELDS = PART_DATA | {"thought", "thoughtSignature", "videoMetadata", "mediaResolution"}
DECLARATION_FIELDS = {
    "name",
    "description",
    "parameters",
    "parametersJsonSchema",
    "response",
    "responseJsonSchema",
    "behavior",
}
_METHOD = re.compile(r"^/v1beta/(models|tunedModels)/([^/:]+):(\w+)$")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


@dataclass
class GeminiReply(Reply):
    """A ``Reply`` with what only Gemini says.

    ``thoughts``: a thought summary part sent before the answer (its tokens in
    ``thoughtsTokenCount``, default the words in it); ``block_reason``: the prompt is
    refused (``promptFeedback.blockReason``, no candidates); ``call_ids``: give function
    calls ids (Gemini leaves them out unless the call dict has one); ``finish`` may also
    be a Gemini finishReason (``RECITATION``, ``MALFORMED_FUNCTION_CALL``…).
    """

    thoughts: str = ""
    thoughts_tokens: int | None = None
    block_reason: str | None = None
    #: the tokens of the prompt's tools (toolUsePromptTokenCount)
    tool_use_prompt_tokens: int = 0
    #: streams: ``{"code", "message", "status"}`` sent as an event of its own in place of
    #: the finishing chunk (how Google reports a failure once the stream has begun)
    stream_error: dict[str, Any] | None = None


class _Refuse(Exception):
    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def error_body(status: int, message: str, reason: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": STATUS_NAMES.get(status, "UNKNOWN"),
    }
    if reason is not None:
        error["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"},
            }
        ]
    return {"error": error}


def _known(where: str, value: Mapping[str, Any], names: set[str]) -> None:
    for name in value:
        if _camel(name) not in names:
            raise _Refuse(
                400,
                f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': "
                "Cannot find field.",
            )


def _text_chars(value: Any) -> int:
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return len(value["text"])
        if "parts" in value:
            return _text_chars(value["parts"])
        response = value.get("functionResponse")
        if isinstance(response, dict):
            return len(_dumps(response.get("response", {})))
    return 0


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """Characters of the text in ``systemInstruction`` and ``contents`` // 4 + 1."""
    return (_text_chars(body.get("systemInstruction")) + _text_chars(body.get("contents"))) // 4 + 1


def _validate(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Refuse(400, "Invalid JSON payload received. Unexpected token.")
    _known("", body, REQUEST_FIELDS)
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _Refuse(400, "* GenerateContentRequest.contents: contents is not specified\n")
    previous_calls = 0
    for index, content in enumerate(contents):
        where = f"contents[{index}]"
        if not isinstance(content, dict):
            raise _Refuse(400, f"Invalid value at '{where}': expected an object")
        role = content.get("role", "user")
        if role not in ("user", "model"):
            raise _Refuse(400, f"Please use a valid role: user, model. (got {role!r})")
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            raise _Refuse(
                400, f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.\n"
            )
        calls = responses = 0
        for number, part in enumerate(parts):
            part_where = f"{where}.parts[{number}]"
            if not isinstance(part, dict):
                raise _Refuse(400, f"Invalid value at '{part_where}'")
            _known(part_where, part, PART_FIELDS)
            data = [_camel(name) for name in part if _camel(name) in PART_DATA]
            if len(data) != 1:
                raise _Refuse(
                    400,
                    f"* GenerateContentRequest.{part_where}.data: required oneof field 'data' "
                    "must have one initialized field\n",
                )
            if part.get("text") == "":
                raise _Refuse(400, f"* GenerateContentRequest.{part_where}.data: empty text\n")
            call = part.get("functionCall")
            if call is not None:
                calls += 1
                if not isinstance(call, dict) or not call.get("name"):
                    raise _Refuse(400, f"* {part_where}.function_call.name: name is not specified")
                if role != "model":
                    raise _Refuse(400, "Please ensure function calls come from the model role.")
                if not part.get("thoughtSignature"):
                    raise _Refuse(
                        400,
                        f"Function call `{call['name']}` in the {index + 1}. content block is "
                        "missing a `thought_signature`.",
                    )
            response = part.get("functionResponse")
            if response is not None:
                responses += 1
                if not isinstance(response, dict) or not response.get("name"):
                    raise _Refuse(
                        400, f"* {part_where}.function_response.name: name is not specified"
                    )
                if not isinstance(response.get("response"), dict):
                    raise _Refuse(
                        400, f"Invalid value at '{part_where}.function_response.response'"
                    )
        if responses and responses != previous_calls:
            raise _Refuse(
                400,
                "Please ensure that the number of function response parts is equal to the "
                "number of function call parts of the function call turn.",
            )
        previous_calls = calls
    config = body.get("generationConfig", {})
    if not isinstance(config, dict):
        raise _Refuse(400, "Invalid value at 'generation_config'")
    _known("generation_config", config, GENERATION_FIELDS)
    for number, tool in enumerate(body.get("tools") or []):
        for declaration in tool.get("functionDeclarations") or []:
            _known(f"tools[{number}].function_declarations", declaration, DECLARATION_FIELDS)
    return body


def _finish_reason(reply: Reply) -> str:
    finish = reply.finish or "stop"
    return FINISH.get(finish, finish)


def _function_calls(reply: Reply) -> list[dict[str, Any]]:
    parts = []
    for number, call in enumerate(reply.tool_calls or []):
        function: dict[str, Any] = {"name": call["name"], "args": _arguments_object(call)}
        if call.get("id"):
            function["id"] = call["id"]
        part: dict[str, Any] = {"functionCall": function}
        if number == 0:  # Gemini 3 signs the first call of a turn
            part["thoughtSignature"] = THOUGHT_SIGNATURE
        parts.append(part)
    return parts


def _usage(body: Mapping[str, Any], reply: Reply, *, final: bool) -> dict[str, Any]:
    prompt = reply.input_tokens if reply.input_tokens is not None else estimate_input_tokens(body)
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    thoughts = 0
    if isinstance(reply, GeminiReply) and reply.thoughts:
        thoughts = (
            reply.thoughts_tokens
            if reply.thoughts_tokens is not None
            else len(split_words(reply.thoughts))
        )
    tool_prompt = reply.tool_use_prompt_tokens if isinstance(reply, GeminiReply) else 0
    output = 0
    if final:
        output = (
            reply.output_tokens
            if reply.output_tokens is not None
            else len(split_words(reply.text)) + len(reply.tool_calls or [])
        )
        usage["candidatesTokenCount"] = output
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
    if reply.cached_tokens:
        usage["cachedContentTokenCount"] = reply.cached_tokens
    if tool_prompt:
        usage["toolUsePromptTokenCount"] = tool_prompt
    usage["totalTokenCount"] = prompt + tool_prompt + output + (thoughts if final else 0)
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    return usage


def _candidate_count(body: Mapping[str, Any]) -> int:
    count = (body.get("generationConfig") or {}).get("candidateCount")
    return count if isinstance(count, int) and count > 0 else 1


def _response(body: Mapping[str, Any], model: str, reply: Reply) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if isinstance(reply, GeminiReply) and reply.block_reason:
        payload["promptFeedback"] = {"blockReason": reply.block_reason}
    else:
        parts: list[dict[str, Any]] = []
        if isinstance(reply, GeminiReply) and reply.thoughts:
            parts.append({"text": reply.thoughts, "thought": True})
        if reply.text:
            parts.append({"text": reply.text})
        parts += _function_calls(reply)
        payload["candidates"] = [
            {
                "content": {"parts": parts, "role": "model"},
                "finishReason": _finish_reason(reply),
                "index": index,
            }
            for index in range(_candidate_count(body))
        ]
    if reply.include_usage:
        payload["usageMetadata"] = _usage(body, reply, final=True)
    payload["modelVersion"] = model
    payload["responseId"] = _new_id("")
    return payload


def _chunks(body: Mapping[str, Any], model: str, reply: Reply) -> list[dict[str, Any]]:
    """The chunks of a streamed answer: thoughts, words, calls; the last one finishes."""
    response_id = _new_id("")
    candidates = _candidate_count(body)

    def chunk(parts: list[dict[str, Any]], final: bool = False) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "candidates": [
                {"content": {"parts": parts, "role": "model"}}
                | ({"index": index} if index else {})
                | ({"finishReason": _finish_reason(reply)} if final else {})
                for index in range(candidates)
            ]
        }
        if reply.include_usage:
            payload["usageMetadata"] = _usage(body, reply, final=final)
        payload["modelVersion"] = model
        payload["responseId"] = response_id
        return {**payload, **reply.extra_fields}

    if isinstance(reply, GeminiReply) and reply.block_reason:
        blocked: dict[str, Any] = {"promptFeedback": {"blockReason": reply.block_reason}}
        if reply.include_usage:
            blocked["usageMetadata"] = _usage(body, reply, final=True)
        return [{**blocked, "modelVersion": model, "responseId": response_id}]
    pieces: list[list[dict[str, Any]]] = []
    if isinstance(reply, GeminiReply) and reply.thoughts:
        pieces.append([{"text": reply.thoughts, "thought": True}])
    pieces += [[{"text": word}] for word in split_words(reply.text)]
    pieces += [[part] for part in _function_calls(reply)]
    if not pieces:
        pieces = [[{"text": ""}]]
    out = [chunk(parts) for parts in pieces[:-1]]
    out.append(chunk(pieces[-1], final=True))
    return out


def _model_entry(model_id: str, methods: list[str]) -> dict[str, Any]:
    return {
        "name": f"models/{model_id}",
        "version": "001",
        "displayName": model_id.replace("-", " ").title(),
        "inputTokenLimit": 1048576,
        "outputTokenLimit": 65536,
        "supportedGenerationMethods": methods,
    }


class FakeGemini(FakeUpstream):
    """A scriptable fake Gemini API on ``127.0.0.1`` (``api_key``: the key it accepts)."""

    @property
    def base_url(self) -> str:
        return self.url

    async def _dispatch(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        try:
            self._authorise(request)
            if request.method == "GET":
                await self._models(request, send)
                return
            match = _METHOD.match(request.path)
            if request.method != "POST" or match is None:
                raise _Refuse(404, f"Invalid URL ({request.method} {request.path})")
            model, method = match.group(2), match.group(3)
            if method == "countTokens":
                contents = request.json.get("contents") if isinstance(request.json, dict) else None
                total = estimate_input_tokens({"contents": contents or []})
                await _send_json(send, 200, {"totalTokens": total}, [])
                return
            if method not in ("generateContent", "streamGenerateContent"):
                raise _Refuse(404, f"Method {method} is not found for the model {model}.")
            body = _validate(request.json)
        except _Refuse as refuse:
            await _send_json(
                send, refuse.status, error_body(refuse.status, refuse.message, refuse.reason), []
            )
            return
        behaviour = self._next_behaviour()
        if isinstance(behaviour, Hang):
            await self._hang(receive)
            return
        if isinstance(behaviour, Fail):
            await asyncio.sleep(behaviour.delay)
            headers = [
                (name.lower().encode("latin-1"), value.encode("latin-1"))
                for name, value in behaviour.headers.items()
            ]
            await _send_json(
                send, behaviour.status, error_body(behaviour.status, behaviour.message), headers
            )
            return
        if isinstance(behaviour, Reply):
            await asyncio.sleep(behaviour.delay)
        reply = (
            Reply(text=behaviour.text, chunk_delay=behaviour.chunk_delay)
            if isinstance(behaviour, DropMidStream)
            else behaviour
            if isinstance(behaviour, Reply)
            else Reply()
        )
        if method == "streamGenerateContent":
            await self._stream_chunks(send, request, body, model, reply, behaviour)
            return
        if isinstance(behaviour, Malformed):
            await _send_raw(send, 200, b"not json{", [])
            return
        data = _dumps(_response(body, model, reply)).encode()
        if isinstance(behaviour, DropMidStream):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(data)).encode()),
                    ],
                }
            )
            await send(
                {"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True}
            )
            raise _AbortConnection("DropMidStream")
        await _send_raw(send, 200, data, [])

    async def _stream_chunks(
        self,
        send: Send,
        request: RecordedRequest,
        body: dict[str, Any],
        model: str,
        reply: Reply,
        behaviour: Any,
    ) -> None:
        chunks = [_dumps(chunk) for chunk in _chunks(body, model, reply)]
        if isinstance(reply, GeminiReply) and reply.stream_error is not None:
            chunks[-1] = _dumps({"error": reply.stream_error})
        sse = request.query.get("alt") == "sse"
        if isinstance(behaviour, Malformed):
            chunks = [chunks[0], "{broken"]
        dropping = isinstance(behaviour, DropMidStream)
        if dropping:
            chunks = chunks[: min(behaviour.after_chunks, len(chunks) - 1)]
        if sse:
            events = [f"data: {chunk}\r\n\r\n" for chunk in chunks]
            content_type = b"text/event-stream"
        else:  # a JSON array, streamed element by element
            events = [
                ("[" if number == 0 else ",\r\n") + chunk for number, chunk in enumerate(chunks)
            ]
            events.append("]")
            content_type = b"application/json; charset=UTF-8"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type),
                    (b"x-gemini-service-tier", b"standard"),
                ],
            }
        )
        for position, event in enumerate(events):
            if position and reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        if dropping:
            await asyncio.sleep(reply.chunk_delay)
            raise _AbortConnection("DropMidStream")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _authorise(self, request: RecordedRequest) -> None:
        if self.api_key is None:
            return
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            raise _Refuse(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if key != self.api_key:
            raise _Refuse(
                400, "API key not valid. Please pass a valid API key.", reason="API_KEY_INVALID"
            )

    async def _models(self, request: RecordedRequest, send: Send) -> None:
        path = request.path.rstrip("/")
        if path.startswith("/v1beta/models/"):
            wanted = path.removeprefix("/v1beta/models/")
            for model_id, methods in GEMINI_MODELS:
                if model_id == wanted:
                    await _send_json(send, 200, _model_entry(model_id, methods), [])
                    return
            raise _Refuse(404, f"models/{wanted} is not found for API version v1beta")
        if path != "/v1beta/models":
            raise _Refuse(404, f"Invalid URL (GET {request.path})")
        size = int(request.query.get("pageSize") or DEFAULT_PAGE)
        offset = int(request.query.get("pageToken") or 0)
        page = GEMINI_MODELS[offset : offset + size]
        payload: dict[str, Any] = {"models": [_model_entry(*entry) for entry in page]}
        if offset + size < len(GEMINI_MODELS):
            payload["nextPageToken"] = str(offset + size)
        await _send_json(send, 200, payload, [])


def text_of(request: RecordedRequest) -> list[tuple[str, str]]:
    """(role, text) of each text part of a recorded generateContent request, in order."""
    body = request.json or {}
    return [
        (content.get("role", "user"), part["text"])
        for content in body.get("contents", [])
        for part in content.get("parts", [])
        if "text" in part
    ]


@pytest.fixture
def fake_gemini() -> Iterator[FakeGemini]:
    """A started :class:`FakeGemini` (no API key required), stopped after the test."""
    fake = FakeGemini().start()
    try:
        yield fake
    finally:
        fake.stop()


__all__ = [
    "GEMINI_MODELS",
    "THOUGHT_SIGNATURE",
    "DropMidStream",
    "Fail",
    "FakeGemini",
    "GeminiReply",
    "Hang",
    "Malformed",
    "Reply",
    "error_body",
    "fake_gemini",
    "text_of",
]
