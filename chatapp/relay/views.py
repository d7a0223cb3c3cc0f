"""The public ``/v1`` API: OpenAI- and Anthropic-compatible, async end to end.

Each view parses its dialect into a ``Call``, hands it to one pipeline entry point
(``pipeline.chat``, ``complete``, ``embed``, ``count_tokens``) and renders what
comes back in the same dialect.  The pipeline admits, routes, calls, records the
outcome and settles; errors are rendered in the dialect's own body with the
matching status; every response carries ``x-request-id``.
"""

from __future__ import annotations

import base64
import logging
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError

from chatapp import logs
from chatapp.relay import catalog, pipeline
from chatapp.relay.bodies import load_json
from chatapp.relay.canonical import ChatRequest
from chatapp.relay.dialects import HTTP_DIALECTS, HttpDialect, detect
from chatapp.relay.dialects import anthropic as anthropic_dialect
from chatapp.relay.dialects import openai as openai_dialect
from chatapp.relay.dialects import responses as responses_dialect
from chatapp.relay.errors import RelayError, body_too_large, from_domain
from chatapp.relay.pipeline import Call
from chatapp.relay.validation import acheck_image_hosts
from keys.auth import Principal, aauthenticate, raw_key_from_headers
from keys.exceptions import KeyRefused

logger = logging.getLogger(__name__)
View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _stamp(response: HttpResponseBase, dialect: HttpDialect, request_id: str) -> None:
    for name in dialect.request_id_headers:
        response[name] = request_id


def error_response(error: RelayError, dialect: HttpDialect | str, request_id: str) -> JsonResponse:
    if isinstance(dialect, str):
        dialect = HTTP_DIALECTS[dialect]
    response = JsonResponse(
        dialect.error_body(error), status=error.status, json_dumps_params={"ensure_ascii": False}
    )
    headers = {**dialect.rate_headers(error.rate, datetime.now(UTC)), **error.headers}
    for name, value in headers.items():
        response[name] = value
    _stamp(response, dialect, request_id)
    return response


def api_view(
    dialect: str | None = None, *, methods: tuple[str, ...] = ("POST",)
) -> Callable[[View], View]:
    """Authenticate, check the method, render ``RelayError`` in the dialect.

    ``dialect`` None: the request's own (``/v1/models`` serves both).
    """

    def decorator(view: View) -> View:
        @csrf_exempt
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            request_id = pipeline.new_request_id()
            logs.begin(request_id)  # every log line of this request carries the id its client gets
            http = HTTP_DIALECTS[dialect] if dialect else detect(request.path, request.headers)
            try:
                if request.method not in methods:
                    raise RelayError(
                        405,
                        f"Method {request.method} is not allowed here; use {' or '.join(methods)}.",
                        type="invalid_request_error",
                    )
                try:
                    principal = await aauthenticate(
                        raw_key_from_headers(
                            request.headers.get("authorization"), request.headers.get("x-api-key")
                        )
                    )
                except KeyRefused as exc:
                    raise from_domain(exc) from None
                logs.bind(key_prefix=principal.prefix, user_id=principal.user_id)
                response = await view(request, principal, request_id, http, *args, **kwargs)
            except RelayError as error:
                return error_response(error, http, request_id)
            except RedisError as exc:
                logger.error("request %s: Redis unavailable: %s", request_id, exc)
                unavailable = RelayError(
                    503,
                    f"A shared service is unavailable (Redis: {type(exc).__name__}); try again shortly.",
                    type="overloaded_error",
                    code="service_unavailable",
                )
                return error_response(unavailable, http, request_id)
            _stamp(response, http, request_id)
            return response

        return wrapper

    return decorator


def _json_body(request: HttpRequest) -> tuple[dict[str, Any], int]:
    """The request's JSON object and its size in bytes."""
    limit = settings.SWITCHBOARD_MAX_BODY_BYTES
    try:
        raw = request.body
    except RequestDataTooBig:
        raise body_too_large(limit) from None
    if len(raw) > limit:
        raise body_too_large(limit, len(raw))
    # Hostile JSON (deep nesting, huge integers, NUL or lone surrogates in strings)
    # is a 400 naming the problem, never a 500 or a record the ledger cannot store.
    return load_json(raw), len(raw)


async def _parsed_call(
    request: HttpRequest,
    principal: Principal,
    request_id: str,
    *,
    endpoint: str,
    dialect: HttpDialect,
    parse: Callable[[dict[str, Any]], ChatRequest],
) -> Call:
    """A call from the request's body; a body that cannot be parsed is refused and recorded."""
    call = Call(
        principal=principal,
        endpoint=endpoint,
        dialect=dialect.name,
        model="",
        request_id=request_id,
    )
    try:
        body, size = _json_body(request)
        model = body.get("model")
        call.model = model if isinstance(model, str) else ""
        call.stream = body.get("stream") is True
        call.request = parse(body)
        call.request.body_size = size
        # An upstream that fetches image URLs itself must not be sent to our network.
        await acheck_image_hosts(call.request)
    except RelayError as error:
        pipeline.refuse(call, error)
        raise
    return call


def _with_rate(call: Call, error: RelayError) -> RelayError:
    if call.ticket is not None and not error.rate:
        error.rate = call.rate
    return error


def _rate_headers(response: HttpResponseBase, call: Call, dialect: HttpDialect) -> None:
    for name, value in dialect.rate_headers(call.rate, datetime.now(UTC)).items():
        response[name] = value


async def _relay_chat(call: Call, dialect: HttpDialect) -> HttpResponseBase:
    assert call.request is not None
    if call.request.stream:
        return await _stream(call, dialect)
    try:
        reply = await pipeline.complete(call)
    except RelayError as error:
        raise _with_rate(call, error) from None
    response = JsonResponse(
        dialect.render_reply(
            reply.body,
            reply.completion,
            model=call.model,
            passthrough=pipeline.passthrough(call, reply.target),
        ),
        json_dumps_params={"ensure_ascii": False},
    )
    _rate_headers(response, call, dialect)
    return response


async def render_stream(
    call: Call, dialect: HttpDialect, stream: pipeline.ChatStream
) -> AsyncIterator[bytes]:
    """The client's SSE bytes from an open stream (also the golden cases' runner)."""
    assert call.request is not None
    renderer = dialect.stream_renderer(
        model=call.model,
        request_id=call.request_id.removeprefix("req_"),
        include_usage=call.request.include_usage,
    )
    passthrough = stream.passthrough
    try:
        async for item in stream:
            for piece in renderer.item(item, passthrough=passthrough):
                yield piece
    except RelayError as error:
        # The upstream failed after content reached the client (the pipeline
        # recorded it): the stream ends with the dialect's in-stream error.
        for piece in renderer.error(error):
            yield piece
        return
    for piece in renderer.end(passthrough=passthrough):
        yield piece


async def _stream(call: Call, dialect: HttpDialect) -> HttpResponseBase:
    async def body() -> AsyncIterator[bytes]:
        async with pipeline.chat(call) as stream:
            yield b""  # opened: the response can start
            async for piece in render_stream(call, dialect, stream):
                yield piece

    source = body()
    try:
        # Admission, routing and the upstream's first content happen here, before
        # the response starts: a refusal is still an HTTP error with its status.
        await source.__anext__()
    except RelayError as error:
        raise _with_rate(call, error) from None
    response = StreamingHttpResponse(
        source, content_type="text/event-stream; charset=utf-8", headers=SSE_HEADERS
    )
    _rate_headers(response, call, dialect)
    # The lean API app closes this generator when the client goes away, so the
    # pipeline records the disconnect and settles at once (chatapp.relay.asgi).
    response.source = source  # type: ignore[attr-defined]
    return response


@api_view("openai")
async def chat_completions(
    request: HttpRequest, principal: Principal, request_id: str, dialect: HttpDialect
) -> HttpResponseBase:
    call = await _parsed_call(
        request,
        principal,
        request_id,
        endpoint="chat.completions",
        dialect=dialect,
        parse=openai_dialect.parse_chat_request,
    )
    return await _relay_chat(call, dialect)


@api_view("anthropic")
async def messages(
    request: HttpRequest, principal: Principal, request_id: str, dialect: HttpDialect
) -> HttpResponseBase:
    call = await _parsed_call(
        request,
        principal,
        request_id,
        endpoint="messages",
        dialect=dialect,
        parse=anthropic_dialect.parse_messages_request,
    )
    return await _relay_chat(call, dialect)


@api_view("openai")  # errors in OpenAI's body; the answer in the Responses dialect
async def responses(
    request: HttpRequest, principal: Principal, request_id: str, dialect: HttpDialect
) -> HttpResponseBase:
    call = await _parsed_call(
        request,
        principal,
        request_id,
        endpoint="responses",
        dialect=responses_dialect.DIALECT,
        parse=responses_dialect.parse_responses_request,
    )
    return await _relay_chat(call, responses_dialect.DIALECT.bind(call.request, request_id))


@api_view("anthropic")
async def count_tokens(
    request: HttpRequest, principal: Principal, request_id: str, dialect: HttpDialect
) -> HttpResponseBase:
    call = await _parsed_call(
        request,
        principal,
        request_id,
        endpoint="count_tokens",
        dialect=dialect,
        parse=lambda body: anthropic_dialect.parse_messages_request(body, count_only=True),
    )
    count, _estimated = await pipeline.count_tokens(call)
    return JsonResponse({"input_tokens": count})


@api_view("openai")
async def embeddings(
    request: HttpRequest, principal: Principal, request_id: str, dialect: HttpDialect
) -> HttpResponseBase:
    call = Call(
        principal=principal,
        endpoint="embeddings",
        dialect=dialect.name,
        model="",
        request_id=request_id,
    )
    try:
        body, _size = _json_body(request)
        model = body.get("model")
        call.model = model if isinstance(model, str) else ""
        _model, inputs = openai_dialect.parse_embeddings_request(body)
    except RelayError as error:
        pipeline.refuse(call, error)
        raise
    wanted = body.get("encoding_format") or "float"
    try:
        # Ask the upstream for floats, then encode for the client: not every
        # OpenAI-compatible server implements base64.
        result = await pipeline.embed(call, {**body, "encoding_format": "float"}, inputs)
    except RelayError as error:
        raise _with_rate(call, error) from None
    result["model"] = call.model
    if wanted == "base64":
        for item in result["data"]:
            if isinstance(item, dict) and isinstance(item.get("embedding"), list):
                vector = item["embedding"]
                item["embedding"] = base64.b64encode(
                    struct.pack(f"<{len(vector)}f", *vector)
                ).decode()
    response = JsonResponse(result)
    _rate_headers(response, call, dialect)
    return response


def _anthropic_time(created: int) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat().replace("+00:00", "Z")


@api_view(methods=("GET",))
async def models_list(
    request: HttpRequest, principal: Principal, request_id: str, dialect: HttpDialect
) -> HttpResponseBase:
    visible = [model for model in await catalog.alist_models() if principal.may_use(model.name)]
    if dialect.name == "anthropic":
        data = [
            anthropic_dialect.model_object(
                model.name, model.display_name, _anthropic_time(model.created)
            )
            for model in visible
        ]
        return JsonResponse(
            {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )
    return JsonResponse(
        {
            "object": "list",
            "data": [openai_dialect.model_object(model.name, model.created) for model in visible],
        }
    )


@api_view(methods=("GET",))
async def model_detail(
    request: HttpRequest, principal: Principal, request_id: str, dialect: HttpDialect, name: str
) -> HttpResponseBase:
    model = await catalog.aget_model(name)
    if model is None or not principal.may_use(name):
        raise RelayError(
            404,
            f"The model '{name}' does not exist or is not available.",
            type="not_found_error",
            code="model_not_found",
            param="model",
        )
    if dialect.name == "anthropic":
        return JsonResponse(
            anthropic_dialect.model_object(
                model.name, model.display_name, _anthropic_time(model.created)
            )
        )
    return JsonResponse(openai_dialect.model_object(model.name, model.created))


def unknown_endpoint(request: HttpRequest) -> JsonResponse:
    error = RelayError(
        404,
        f"Unknown API endpoint: {request.method} {request.path}",
        type="invalid_request_error",
        code="unknown_url",
    )
    return error_response(error, detect(request.path, request.headers), pipeline.new_request_id())


@csrf_exempt
async def not_found(request: HttpRequest, path: str) -> HttpResponseBase:
    return unknown_endpoint(request)
