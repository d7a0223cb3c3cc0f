"""A fake LLM upstream: a real HTTP server on loopback that tests can script to misbehave.

It speaks two wire formats, chosen by the path that is hit:

- OpenAI: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models``;
- Anthropic: ``POST /v1/messages``, ``POST /v1/messages/count_tokens`` (and ``GET /v1/models``
  when the request carries an ``anthropic-version`` header).

Both non-streaming JSON and streaming (SSE, sent chunk by chunk) answers follow the real APIs,
so the official ``openai`` and ``anthropic`` SDKs can be pointed straight at it.

Every chat, messages or embeddings request consumes one scripted behaviour (FIFO); an empty
queue answers with ``Reply()``::

    fake.script(Fail(429, headers={"retry-after": "1"}), Reply(text="ok"))

The server is a raw ASGI application run by uvicorn in a background thread
(:class:`tests.live.ThreadedServer`); the queue and the recorded requests are guarded by a lock.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

import pytest

from tests.live import ThreadedServer

Scope = MutableMapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Dialect = Literal["openai", "anthropic"]

#: How long a :class:`Hang` keeps a request open at most.
HANG_LIMIT = 60.0
#: Dimension of the embeddings when the request does not ask for ``dimensions``.
EMBEDDING_DIMENSIONS = 8
#: Length of the pieces a tool call's JSON arguments are streamed in.
ARGUMENT_FRAGMENT = 6
SYSTEM_FINGERPRINT = "fp_fake"

OPENAI_MODELS = ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
ANTHROPIC_MODELS = [
    ("claude-sonnet-4-6", "Claude Sonnet 4.6"),
    ("claude-haiku-4-5", "Claude Haiku 4.5"),
]


# -- behaviours -----------------------------------------------------------------------------


@dataclass
class Reply:
    """A normal answer in the dialect of the path hit."""

    text: str = "Hello from the fake upstream."
    #: each ``{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}``;
    #: ``arguments`` may also be a JSON string.
    tool_calls: list[dict[str, Any]] | None = None
    #: canonical: stop | length | tool_calls | content_filter | stop_sequence (others pass through)
    finish: str | None = None
    #: default: :func:`estimate_input_tokens` of the request
    input_tokens: int | None = None
    #: default: streamed text pieces + tool-argument fragments (times ``n`` for OpenAI)
    output_tokens: int | None = None
    cached_tokens: int = 0
    #: input tokens written to the prompt cache (Anthropic's cache_creation_input_tokens)
    cache_write_tokens: int = 0
    #: False: no usage at all, neither in JSON nor in the stream
    include_usage: bool = True
    #: seconds before the response headers
    delay: float = 0.0
    #: seconds between stream chunks
    chunk_delay: float = 0.0
    #: fields a newer API version might add: merged into every stream chunk/event
    extra_fields: dict[str, Any] = field(default_factory=dict)
    #: (name, data) events a newer API version might add, sent after the first content
    #: event (Anthropic; an OpenAI stream gets each data as a chunk of its own)
    extra_events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: the model's reasoning before its answer: Anthropic a signed ``thinking`` block
    #: (streamed as thinking_delta words, then a signature_delta), OpenAI
    #: ``reasoning_content`` on the message and on stream deltas (as DeepSeek sends it)
    reasoning: str = ""
    #: Anthropic: a ``redacted_thinking`` block with this (encrypted) data, before the text
    redacted_thinking: str = ""
    #: OpenAI: ``completion_tokens_details.reasoning_tokens`` (a part of completion_tokens)
    reasoning_tokens: int = 0


#: what the fake signs its Anthropic thinking blocks with
THINKING_SIGNATURE = "EqQBCkYIBxgCKkBfakesignature"


@dataclass
class Fail:
    """An error response, in the dialect's own error body, before any byte of body."""

    status: int
    message: str = "fake upstream failure"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class DropMidStream:
    """Stream ``after_chunks`` content chunks after the opening events, then abort the connection.

    A non-streaming request gets its headers and half of its JSON body before the abort.
    """

    after_chunks: int = 2
    text: str = "Hello from the fake upstream."
    chunk_delay: float = 0.0  # seconds between chunks, and before the abort


@dataclass
class Malformed:
    """Status 200 but garbage.

    Non-stream: the body ``not json{``. Stream: the first valid event, then ``data: {broken``
    (for Anthropic under ``event: content_block_delta``, since its SDK skips unnamed events),
    then a clean end of the body.
    """


@dataclass
class Hang:
    """Accept the request and never answer (until the client leaves, the fake stops or 60 s)."""


Behaviour = Reply | Fail | DropMidStream | Malformed | Hang


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    #: lower-case names; repeated headers are joined with ", "
    headers: dict[str, str]
    #: the parsed JSON body, or None when the body is empty or not JSON
    json: Any
    #: the query string parsed (last value wins)
    query: dict[str, str]
    body: bytes = b""


# -- helpers --------------------------------------------------------------------------------


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        if "content" in value:  # a message, or an Anthropic tool_result block
            return _text_chars(value["content"])
        text = value.get("text")
        if isinstance(text, str):  # a text part / block
            return len(text)
    return 0


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """The default input token count: characters of all text in ``system`` and ``messages`` // 4 + 1.

    Text is a message's string content, or the ``text`` of its content parts (tool_result
    contents included); roles, tool calls and tool definitions do not count.
    """
    return (_text_chars(body.get("system")) + _text_chars(body.get("messages"))) // 4 + 1


def split_words(text: str) -> list[str]:
    """The pieces text is streamed in: words with their leading spaces; ``"".join`` gives it back."""
    return re.findall(r"\s*\S+|\s+", text)


def _arguments_json(call: Mapping[str, Any]) -> str:
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)


def _arguments_object(call: Mapping[str, Any]) -> Any:
    arguments = call.get("arguments", {})
    return json.loads(arguments) if isinstance(arguments, str) else arguments


def _fragments(text: str) -> list[str]:
    return [text[i : i + ARGUMENT_FRAGMENT] for i in range(0, len(text), ARGUMENT_FRAGMENT)] or [""]


def _output_tokens(reply: Reply) -> int:
    if reply.output_tokens is not None:
        return reply.output_tokens
    calls = reply.tool_calls or []
    return (
        len(split_words(reply.reasoning))
        + len(split_words(reply.text))
        + sum(len(_fragments(_arguments_json(c))) for c in calls)
    )


def _finish(reply: Reply) -> str:
    return reply.finish or ("tool_calls" if reply.tool_calls else "stop")


_OPENAI_FINISH = {"stop_sequence": "stop"}
_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def _embedding(value: Any, dimensions: int) -> list[float]:
    """A deterministic vector; every component is exactly representable as a float32."""
    if isinstance(value, str):
        seed = b"s:" + value.encode()
    else:
        seed = b"t:" + ",".join(str(token) for token in value).encode()
    raw = hashlib.shake_256(seed).digest(2 * dimensions)
    return [(v - 32768) / 32768 for v in struct.unpack(f"<{dimensions}H", raw)]


def openai_error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    if status == 429:
        kind, code = "requests", code or "rate_limit_exceeded"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    default = "api_error" if status >= 500 else "invalid_request_error"
    return {
        "type": "error",
        "error": {"type": _ANTHROPIC_ERROR_TYPES.get(status, default), "message": message},
        "request_id": _new_id("req_"),
    }


class _AbortConnection(Exception):
    """Raised inside the ASGI app so that uvicorn closes the connection abruptly."""


class _QuietAbort(logging.Filter):
    """Keeps uvicorn from logging the aborts we make on purpose as application errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _AbortConnection))


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietAbort) for f in logger.filters):
        logger.addFilter(_QuietAbort())


@dataclass
class _Reject(Exception):
    """An error response decided before any body is sent."""

    status: int
    message: str
    code: str | None = None


_ROUTES: dict[tuple[str, str], tuple[str, Dialect]] = {
    ("POST", "/v1/chat/completions"): ("chat", "openai"),
    ("POST", "/v1/embeddings"): ("embeddings", "openai"),
    ("POST", "/v1/messages"): ("messages", "anthropic"),
    ("POST", "/v1/messages/count_tokens"): ("count_tokens", "anthropic"),
    ("GET", "/v1/models"): ("models", "openai"),
}


# -- the server -----------------------------------------------------------------------------


class FakeUpstream:
    """A scriptable fake OpenAI/Anthropic upstream on ``127.0.0.1``."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._queue: deque[Behaviour] = deque()
        self._requests: list[RecordedRequest] = []
        self._stopping = threading.Event()
        self._server: ThreadedServer | None = None

    # lifecycle and scripting (called from the test thread)

    def start(self) -> FakeUpstream:
        self._server = ThreadedServer(self)
        _install_log_filter()
        self._server.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake upstream is not started")
        return self._server.url

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, in order."""
        with self._lock:
            return list(self._requests)

    def script(self, *behaviours: Behaviour) -> None:
        for behaviour in behaviours:
            if not isinstance(behaviour, Reply | Fail | DropMidStream | Malformed | Hang):
                raise TypeError(f"not a behaviour: {behaviour!r}")
        with self._lock:
            self._queue.extend(behaviours)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
            self._requests.clear()

    @property
    def pending(self) -> int:
        """How many scripted behaviours are still queued."""
        with self._lock:
            return len(self._queue)

    def _next_behaviour(self) -> Behaviour:
        with self._lock:
            return self._queue.popleft() if self._queue else Reply()

    # ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        try:
            parsed: Any = json.loads(body) if body else None
        except ValueError:
            parsed = None
        request = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            headers=headers,
            json=parsed,
            query=dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))),
            body=body,
        )
        with self._lock:
            self._requests.append(request)
        await self._dispatch(request, receive, send)

    async def _dispatch(self, request: RecordedRequest, receive: Receive, send: Send) -> None:
        route = _ROUTES.get((request.method, request.path.rstrip("/")))
        if route is None:
            message = f"Invalid URL ({request.method} {request.path})"
            await _send_json(send, 404, openai_error_body(404, message), _request_id("openai"))
            return
        kind, dialect = route
        if kind == "models" and "anthropic-version" in request.headers:
            dialect = "anthropic"

        try:
            self._check_auth(request, dialect)
            body = _validate(request, kind, dialect)
        except _Reject as reject:
            await self._send_error(send, dialect, reject.status, reject.message, code=reject.code)
            return

        if kind == "models":
            await _send_json(send, 200, _models_body(dialect), _request_id(dialect))
            return
        if kind == "count_tokens":
            payload = {"input_tokens": estimate_input_tokens(body)}
            await _send_json(send, 200, payload, _request_id(dialect))
            return

        behaviour = self._next_behaviour()
        if isinstance(behaviour, Hang):
            await self._hang(receive)
            return
        if isinstance(behaviour, Fail):
            await asyncio.sleep(behaviour.delay)
            await self._send_error(
                send, dialect, behaviour.status, behaviour.message, extra=behaviour.headers
            )
            return
        if isinstance(behaviour, Reply):
            await asyncio.sleep(behaviour.delay)
        reply = (
            Reply(text=behaviour.text, chunk_delay=behaviour.chunk_delay)
            if isinstance(behaviour, DropMidStream)
            else behaviour
        )
        if isinstance(reply, Malformed):
            reply = Reply()

        streaming = kind != "embeddings" and body.get("stream") is True
        if kind == "embeddings":
            payload = _embeddings_body(body, reply)
        elif streaming:
            events, opening = (
                _openai_stream(body, reply) if kind == "chat" else _anthropic_stream(body, reply)
            )
            if isinstance(behaviour, Malformed):
                broken = "data: {broken\n\n"
                if dialect == "anthropic":
                    broken = "event: content_block_delta\n" + broken
                events = [events[0], broken]
            elif isinstance(behaviour, DropMidStream):  # never as far as the closing events
                words = len(split_words(reply.text)) * (_choices(body) if kind == "chat" else 1)
                events = events[: opening + min(behaviour.after_chunks, words)]
            dropping = isinstance(behaviour, DropMidStream)
            await self._stream(send, dialect, events, reply.chunk_delay, finish=not dropping)
            if dropping:
                await asyncio.sleep(reply.chunk_delay)
                raise _AbortConnection("DropMidStream")
            return
        elif kind == "chat":
            payload = _openai_completion(body, reply)
        else:
            payload = _anthropic_message(body, reply)

        if isinstance(behaviour, Malformed):
            await _send_raw(send, 200, b"not json{", _request_id(dialect))
        elif isinstance(behaviour, DropMidStream):
            data = _dumps(payload).encode()
            await _start(send, 200, _request_id(dialect), len(data))
            await send(
                {"type": "http.response.body", "body": data[: len(data) // 2], "more_body": True}
            )
            raise _AbortConnection("DropMidStream")
        else:
            await _send_json(send, 200, payload, _request_id(dialect))

    def _check_auth(self, request: RecordedRequest, dialect: Dialect) -> None:
        if self.api_key is None:
            return
        authorization = request.headers.get("authorization", "")
        if dialect == "anthropic":
            # x-api-key, or (what the anthropic SDK sends since 2.x) Authorization: Bearer
            scheme, _, bearer = authorization.partition(" ")
            key = request.headers.get("x-api-key")
            if key is None and scheme.lower() == "bearer":
                key = bearer.strip()
            if key is None:
                raise _Reject(401, "x-api-key header is required")
            if key != self.api_key:
                raise _Reject(401, "invalid x-api-key")
            return
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _Reject(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code=None,
            )
        if key.strip() != self.api_key:
            shown = key.strip()[:3] + "*" * 8 + key.strip()[-4:]
            raise _Reject(
                401,
                f"Incorrect API key provided: {shown}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )

    async def _send_error(
        self,
        send: Send,
        dialect: Dialect,
        status: int,
        message: str,
        *,
        code: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        if dialect == "anthropic":
            payload = anthropic_error_body(status, message)
        else:
            payload = openai_error_body(status, message, code)
        headers = _request_id(dialect) + [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in (extra or {}).items()
        ]
        await _send_json(send, status, payload, headers)

    async def _stream(
        self, send: Send, dialect: Dialect, events: list[str], delay: float, *, finish: bool
    ) -> None:
        headers = _request_id(dialect) + [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for position, event in enumerate(events):
            if position and delay:
                await asyncio.sleep(delay)
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        if finish:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _hang(self, receive: Receive) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANG_LIMIT
        disconnect = asyncio.ensure_future(receive())
        try:
            while not self._stopping.is_set() and loop.time() < deadline:
                done, _ = await asyncio.wait({disconnect}, timeout=0.05)
                if done:  # the client gave up
                    return
        finally:
            disconnect.cancel()
        raise _AbortConnection("Hang is over")


# -- request validation ---------------------------------------------------------------------


def _validate(request: RecordedRequest, kind: str, dialect: Dialect) -> dict[str, Any]:
    if kind == "models":
        return {}
    if dialect == "anthropic" and "anthropic-version" not in request.headers:
        raise _Reject(400, "anthropic-version: header is required")
    body = request.json
    if not isinstance(body, dict):
        if dialect == "anthropic":
            raise _Reject(400, "There was an error parsing the body of your request as JSON.")
        raise _Reject(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.",
        )
    required = {
        "chat": ["model", "messages"],
        "embeddings": ["model", "input"],
        "messages": ["model", "messages", "max_tokens"],
        "count_tokens": ["model", "messages"],
    }[kind]
    for name in required:
        if name not in body:
            if dialect == "anthropic":
                raise _Reject(400, f"{name}: Field required")
            raise _Reject(
                400, f"Missing required parameter: '{name}'.", code="missing_required_parameter"
            )
    return body


def _request_id(dialect: Dialect) -> list[tuple[bytes, bytes]]:
    name = b"request-id" if dialect == "anthropic" else b"x-request-id"
    return [(name, _new_id("req_").encode())]


# -- OpenAI bodies --------------------------------------------------------------------------


def _openai_usage(body: Mapping[str, Any], reply: Reply, choices: int) -> dict[str, Any]:
    prompt = reply.input_tokens if reply.input_tokens is not None else estimate_input_tokens(body)
    completion = (
        reply.output_tokens if reply.output_tokens is not None else _output_tokens(reply) * choices
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": reply.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reply.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _choices(body: Mapping[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and n > 0 else 1


def _tool_call_ids(reply: Reply, prefix: str) -> list[str]:
    return [str(call.get("id") or _new_id(prefix)) for call in reply.tool_calls or []]


def _openai_completion(body: Mapping[str, Any], reply: Reply) -> dict[str, Any]:
    n = _choices(body)
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
    if reply.reasoning:
        message["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call_id,
                "type": "function",
                "function": {"name": call["name"], "arguments": _arguments_json(call)},
            }
            for call, call_id in zip(reply.tool_calls, _tool_call_ids(reply, "call_"), strict=True)
        ]
    message["refusal"] = None
    message["annotations"] = []
    finish = _finish(reply)
    payload: dict[str, Any] = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": index,
                "message": message,
                "logprobs": None,
                "finish_reason": _OPENAI_FINISH.get(finish, finish),
            }
            for index in range(n)
        ],
    }
    if reply.include_usage:
        payload["usage"] = _openai_usage(body, reply, n)
    payload["service_tier"] = "default"
    payload["system_fingerprint"] = SYSTEM_FINGERPRINT
    return payload


def _openai_stream(body: Mapping[str, Any], reply: Reply) -> tuple[list[str], int]:
    """The SSE events of a streamed completion, and how many of them open it (role chunks)."""
    n = _choices(body)
    options = body.get("stream_options")
    usage_requested = isinstance(options, dict) and options.get("include_usage") is True
    with_usage = usage_requested and reply.include_usage
    base: dict[str, Any] = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model"),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": "" if reply.text else None, "refusal": None}, None)
    ]
    deltas += [({"reasoning_content": word}, None) for word in split_words(reply.reasoning)]
    deltas += [({"content": word}, None) for word in split_words(reply.text)]
    calls = zip(reply.tool_calls or [], _tool_call_ids(reply, "call_"), strict=True)
    for index, (call, call_id) in enumerate(calls):
        header = {"name": call["name"], "arguments": ""}
        start = {"index": index, "id": call_id, "type": "function", "function": header}
        deltas.append(({"tool_calls": [start]}, None))
        for fragment in _fragments(_arguments_json(call)):
            piece = {"index": index, "function": {"arguments": fragment}}
            deltas.append(({"tool_calls": [piece]}, None))
    finish = _finish(reply)
    deltas.append(({}, _OPENAI_FINISH.get(finish, finish)))

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload = {**base, "choices": choices, **reply.extra_fields}
        if with_usage:
            payload["usage"] = usage
        return f"data: {_dumps(payload)}\n\n"

    events = [
        chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])
        for delta, finish_reason in deltas
        for i in range(n)
    ]
    for _name, data in reply.extra_events:
        events.insert(n + 1, f"data: {_dumps({**base, **data})}\n\n")
    if with_usage:
        events.append(chunk([], _openai_usage(body, reply, n)))
    events.append("data: [DONE]\n\n")
    return events, n


def _embeddings_body(body: Mapping[str, Any], reply: Reply) -> dict[str, Any]:
    raw = body["input"]
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs: list[Any] = [raw]
    else:
        inputs = list(raw)
    dimensions = body.get("dimensions")
    if not isinstance(dimensions, int) or dimensions <= 0:
        dimensions = EMBEDDING_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, value in enumerate(inputs):
        vector = _embedding(value, dimensions)
        embedding: Any = vector
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    payload: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
    if reply.include_usage:
        tokens = reply.input_tokens
        if tokens is None:
            tokens = sum(len(v) // 4 + 1 if isinstance(v, str) else len(v) for v in inputs)
        payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return payload


def embedding_for(value: str | list[int], dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """The vector the fake answers for one input (to compare against in tests)."""
    return _embedding(value, dimensions)


def _models_body(dialect: Dialect) -> dict[str, Any]:
    if dialect == "anthropic":
        data = [
            {
                "type": "model",
                "id": model_id,
                "display_name": name,
                "created_at": "2025-09-29T00:00:00Z",
            }
            for model_id, name in ANTHROPIC_MODELS
        ]
        return {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"],
            "last_id": data[-1]["id"],
        }
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": 1721172741, "owned_by": "system"}
            for model_id in OPENAI_MODELS
        ],
    }


# -- Anthropic bodies -----------------------------------------------------------------------


def _anthropic_stop(body: Mapping[str, Any], reply: Reply) -> tuple[str, str | None]:
    finish = _finish(reply)
    if finish == "stop_sequence":
        sequences = body.get("stop_sequences")
        first = sequences[0] if isinstance(sequences, list) and sequences else None
        return "stop_sequence", first
    return _ANTHROPIC_STOP.get(finish, finish), None


def _anthropic_usage(body: Mapping[str, Any], reply: Reply, output: int) -> dict[str, Any]:
    prompt = reply.input_tokens if reply.input_tokens is not None else estimate_input_tokens(body)
    return {
        "input_tokens": prompt,
        "output_tokens": output,
        "cache_read_input_tokens": reply.cached_tokens,
        "cache_creation_input_tokens": reply.cache_write_tokens,
    }


def _tool_uses(reply: Reply) -> Iterator[tuple[str, Mapping[str, Any]]]:
    yield from zip(_tool_call_ids(reply, "toolu_"), reply.tool_calls or [], strict=True)


def _anthropic_message(body: Mapping[str, Any], reply: Reply) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if reply.reasoning:
        thinking = {
            "type": "thinking",
            "thinking": reply.reasoning,
            "signature": THINKING_SIGNATURE,
        }
        content.append(thinking)
    if reply.redacted_thinking:
        content.append({"type": "redacted_thinking", "data": reply.redacted_thinking})
    if reply.text:
        content.append({"type": "text", "text": reply.text})
    for call_id, call in _tool_uses(reply):
        content.append(
            {
                "type": "tool_use",
                "id": call_id,
                "name": call["name"],
                "input": _arguments_object(call),
            }
        )
    stop_reason, stop_sequence = _anthropic_stop(body, reply)
    payload: dict[str, Any] = {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
    }
    if reply.include_usage:
        payload["usage"] = _anthropic_usage(body, reply, _output_tokens(reply))
    return payload


def _sse(payload: dict[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {_dumps(payload)}\n\n"


def _anthropic_stream(body: Mapping[str, Any], reply: Reply) -> tuple[list[str], int]:
    """The SSE events of a streamed message, and how many of them open it."""
    message: dict[str, Any] = {
        "id": _new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    if reply.include_usage:
        message["usage"] = _anthropic_usage(body, reply, 1)
    events = [_sse({"type": "message_start", "message": message})]
    index = 0
    if reply.reasoning:
        block: dict[str, Any] = {"type": "thinking", "thinking": "", "signature": ""}
        events.append(_sse({"type": "content_block_start", "index": index, "content_block": block}))
        for word in split_words(reply.reasoning):
            delta = {"type": "thinking_delta", "thinking": word}
            events.append(_sse({"type": "content_block_delta", "index": index, "delta": delta}))
        delta = {"type": "signature_delta", "signature": THINKING_SIGNATURE}
        events.append(_sse({"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(_sse({"type": "content_block_stop", "index": index}))
        index += 1
    if reply.redacted_thinking:
        block = {"type": "redacted_thinking", "data": reply.redacted_thinking}
        events.append(_sse({"type": "content_block_start", "index": index, "content_block": block}))
        events.append(_sse({"type": "content_block_stop", "index": index}))
        index += 1
    if reply.text:
        text_block = {"type": "text", "text": ""}
        events.append(
            _sse({"type": "content_block_start", "index": index, "content_block": text_block})
        )
    events.append(_sse({"type": "ping"}))
    opening = len(events)
    if reply.text:
        for word in split_words(reply.text):
            delta = {"type": "text_delta", "text": word}
            events.append(_sse({"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(_sse({"type": "content_block_stop", "index": index}))
        index += 1
    for call_id, call in _tool_uses(reply):
        block = {
            "type": "tool_use",
            "id": call_id,
            "name": call["name"],
            "input": {},
        }
        events.append(_sse({"type": "content_block_start", "index": index, "content_block": block}))
        for fragment in _fragments(_arguments_json(call)):
            delta = {"type": "input_json_delta", "partial_json": fragment}
            events.append(_sse({"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(_sse({"type": "content_block_stop", "index": index}))
        index += 1
    stop_reason, stop_sequence = _anthropic_stop(body, reply)
    final: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
    }
    if reply.include_usage:
        final["usage"] = {"output_tokens": _output_tokens(reply)}
    events.append(_sse(final))
    events.append(_sse({"type": "message_stop"}))
    events = [
        event.replace("\ndata: {", "\ndata: {" + _dumps(reply.extra_fields)[1:-1] + ",", 1)
        if reply.extra_fields
        else event
        for event in events
    ]
    for name, data in reply.extra_events:
        events.insert(opening + 1, f"event: {name}\ndata: {_dumps(data)}\n\n")
    return events, opening


# -- ASGI sending ---------------------------------------------------------------------------


async def _start(send: Send, status: int, headers: list[tuple[bytes, bytes]], length: int) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(length).encode()),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _send_raw(
    send: Send, status: int, data: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    await _start(send, status, headers, len(data))
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _send_json(
    send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]]
) -> None:
    await _send_raw(send, status, _dumps(payload).encode(), headers)


# -- pytest ---------------------------------------------------------------------------------


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    """A started :class:`FakeUpstream` (no API key required), stopped after the test."""
    fake = FakeUpstream().start()
    try:
        yield fake
    finally:
        fake.stop()
