"""The public ``/v1`` API: OpenAI- and Anthropic-compatible, async end to end.

Each view authenticates, parses its dialect into canonical types, runs the pipeline
and renders the result in the same dialect.  Errors are rendered in the dialect's
own body with the matching status; every response carries ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import (
    HttpRequest,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError

from chatapp.relay import catalog, pipeline, tokens
from chatapp.relay.dialects import anthropic as anthropic_dialect
from chatapp.relay.dialects import openai as openai_dialect
from chatapp.relay.errors import RelayError, UpstreamError
from chatapp.relay.pipeline import Call
from keys.auth import Principal, aauthenticate, raw_key_from_headers

logger = logging.getLogger(__name__)
View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_response(error: RelayError, dialect: str, request_id: str) -> JsonResponse:
    body = (
        anthropic_dialect.error_body(error)
        if dialect == "anthropic"
        else openai_dialect.error_body(error)
    )
    response = JsonResponse(body, status=error.status, json_dumps_params={"ensure_ascii": False})
    for name, value in error.headers.items():
        response[name] = value
    response["x-request-id"] = request_id
    if dialect == "anthropic":
        response["request-id"] = request_id
    return response


def api_view(dialect: str, *, methods: tuple[str, ...] = ("POST",)) -> Callable[[View], View]:
    """Authenticate, check method and body size, render ``RelayError`` in the dialect."""

    def decorator(view: View) -> View:
        @csrf_exempt
        @wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            request_id = pipeline.new_request_id()
            effective = (
                "anthropic"
                if dialect == "models" and "anthropic-version" in request.headers
                else dialect
            )
            try:
                if request.method not in methods:
                    raise RelayError(
                        405,
                        f"Method {request.method} is not allowed here; use {' or '.join(methods)}.",
                        type="invalid_request_error",
                    )
                principal = await aauthenticate(
                    raw_key_from_headers(
                        request.headers.get("authorization"), request.headers.get("x-api-key")
                    )
                )
                response = await view(request, principal, request_id, *args, **kwargs)
            except RelayError as error:
                return error_response(error, effective, request_id)
            except RedisError as exc:
                logger.error("request %s: Redis unavailable: %s", request_id, exc)
                unavailable = RelayError(
                    503,
                    f"A shared service is unavailable (Redis: {type(exc).__name__}); try again shortly.",
                    type="overloaded_error",
                    code="service_unavailable",
                )
                return error_response(unavailable, effective, request_id)
            response["x-request-id"] = request_id
            if effective == "anthropic":
                response["request-id"] = request_id
            return response

        return wrapper

    return decorator


def _json_body(request: HttpRequest) -> dict[str, Any]:
    limit = settings.SWITCHBOARD_MAX_BODY_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RelayError(
            413,
            f"The request body is {int(declared)} bytes, over the limit of {limit} bytes.",
            type="request_too_large",
        )
    try:
        raw = request.body
    except RequestDataTooBig:
        raise RelayError(
            413, f"The request body is over the limit of {limit} bytes.", type="request_too_large"
        ) from None
    if len(raw) > limit:
        raise RelayError(
            413,
            f"The request body is {len(raw)} bytes; the limit is {limit} bytes.",
            type="request_too_large",
        )
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RelayError(
            400, f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise RelayError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def _new_call(
    principal: Principal, request_id: str, endpoint: str, dialect: str, model: str, stream: bool
) -> Call:
    return Call(
        principal=principal,
        endpoint=endpoint,
        dialect=dialect,
        model=model,
        stream=stream,
        request_id=request_id,
    )


async def _with_rate_headers(
    call: Call, dialect: str, work: Coroutine[Any, Any, HttpResponseBase]
) -> HttpResponseBase:
    """Put the key's rate-limit headers on the response, or on the error, whichever comes."""
    try:
        response = await work
    except RelayError as error:
        if call.ticket is not None:
            error.headers = {**call.ticket.headers(dialect), **error.headers}
        raise
    if call.ticket is not None:
        for name, value in call.ticket.headers(dialect).items():
            response[name] = value
    return response


async def _relay_chat(call: Call, request: Any, *, dialect: str) -> HttpResponseBase:
    return await _with_rate_headers(
        call, dialect, _relay_chat_inner(call, request, dialect=dialect)
    )


async def _relay_chat_inner(call: Call, request: Any, *, dialect: str) -> HttpResponseBase:
    """Admit, call and render a chat request in ``dialect``; settles on every path."""
    streaming = False
    try:
        call.request = request
        model = await pipeline.admit(call, request=request)
        if request.stream:
            upstream = await pipeline.open_chat(call, model, request)
            streaming = True
            return _stream_response(call, upstream, request, dialect)
        target, body, completion = await pipeline.complete_chat(call, model, request)
        call.status = "ok"
        if target.provider_type == dialect:
            body["model"] = call.model  # same dialect: relay the upstream's body as it is
            if (
                dialect == "openai"
                and isinstance(body.get("usage"), dict)
                and completion.usage is not None
            ):
                body["usage"].setdefault(
                    "total_tokens", completion.usage.input_tokens + completion.usage.output_tokens
                )
            return JsonResponse(body, json_dumps_params={"ensure_ascii": False})
        if dialect == "anthropic":
            return JsonResponse(
                anthropic_dialect.render_message(completion, call.model),
                json_dumps_params={"ensure_ascii": False},
            )
        return JsonResponse(
            openai_dialect.render_completion(completion, call.model),
            json_dumps_params={"ensure_ascii": False},
        )
    except RelayError as error:
        call.fail(error)
        raise
    finally:
        if not streaming:
            call.settle()


def _stream_response(
    call: Call, upstream: pipeline.UpstreamStream, request: Any, dialect: str
) -> StreamingHttpResponse:
    same_dialect = upstream.target.provider_type == dialect
    renderer: Any
    if dialect == "anthropic":
        renderer = anthropic_dialect.StreamRenderer(
            model=call.model, request_id=call.request_id.removeprefix("req_")
        )
    else:
        renderer = openai_dialect.StreamRenderer(
            model=call.model,
            request_id=call.request_id.removeprefix("req_"),
            include_usage=request.include_usage,
        )

    async def body() -> AsyncIterator[bytes]:
        try:
            opening = len(upstream.opening)
            async for item in upstream:
                if opening:
                    opening -= 1  # observed while the stream was opened
                else:
                    call.observe(item.events)
                if same_dialect:
                    if dialect == "anthropic":
                        yield anthropic_dialect.passthrough_event(
                            item.name, item.raw, model=call.model
                        )
                    else:
                        chunk = openai_dialect.passthrough_chunk(
                            item.raw, model=call.model, include_usage=request.include_usage
                        )
                        if chunk is not None:
                            yield chunk
                else:
                    for event in item.events:
                        for piece in renderer.render(event):
                            yield piece
            if dialect == "openai":
                yield b"data: [DONE]\n\n"
            elif not same_dialect:
                yield b"".join(renderer.done())
            call.status = "ok"
        except UpstreamError as exc:
            error = RelayError(
                502,
                f"Upstream error mid-stream: {exc.message}",
                type="upstream_error",
                code="upstream_error",
            )
            call.fail(error)
            yield b"".join(renderer.error(error))
        except (asyncio.CancelledError, GeneratorExit):
            call.status = "client_disconnected"
            call.http_status = 499
            raise
        finally:
            # Closing a broken upstream must not mask the outcome being settled.
            with contextlib.suppress(BaseException):
                await asyncio.shield(upstream.aclose())
            call.settle()

    source = body()
    response = StreamingHttpResponse(
        source, content_type="text/event-stream; charset=utf-8", headers=SSE_HEADERS
    )
    # The lean API app closes this generator when the client goes away, so the
    # stream settles at once (chatapp.relay.asgi).
    response.source = source  # type: ignore[attr-defined]
    return response


async def _chat(
    request: HttpRequest,
    principal: Principal,
    request_id: str,
    *,
    endpoint: str,
    dialect: str,
    parse: Callable[[dict[str, Any]], Any],
) -> HttpResponseBase:
    body = _json_body(request)
    model, stream = str(body.get("model") or ""), bool(body.get("stream"))
    call = _new_call(principal, request_id, endpoint, dialect, model, stream)
    try:
        parsed = parse(body)
    except RelayError as error:
        call.fail(error)
        call.settle()
        raise
    return await _relay_chat(call, parsed, dialect=dialect)


@api_view("openai")
async def chat_completions(
    request: HttpRequest, principal: Principal, request_id: str
) -> HttpResponseBase:
    return await _chat(
        request,
        principal,
        request_id,
        endpoint="chat.completions",
        dialect="openai",
        parse=openai_dialect.parse_chat_request,
    )


@api_view("anthropic")
async def messages(request: HttpRequest, principal: Principal, request_id: str) -> HttpResponseBase:
    return await _chat(
        request,
        principal,
        request_id,
        endpoint="messages",
        dialect="anthropic",
        parse=anthropic_dialect.parse_messages_request,
    )


@api_view("anthropic")
async def count_tokens(
    request: HttpRequest, principal: Principal, request_id: str
) -> HttpResponseBase:
    body = _json_body(request)
    parsed = anthropic_dialect.parse_messages_request(body, count_only=True)
    call = _new_call(principal, request_id, "count_tokens", "anthropic", parsed.model, False)
    model = await pipeline.admit(call, request=None)
    count, _estimated = await pipeline.count_tokens(call, model, parsed)
    return JsonResponse({"input_tokens": count})


@api_view("openai")
async def embeddings(
    request: HttpRequest, principal: Principal, request_id: str
) -> HttpResponseBase:
    body = _json_body(request)
    call = _new_call(
        principal, request_id, "embeddings", "openai", str(body.get("model") or ""), False
    )
    return await _with_rate_headers(call, "openai", _embeddings(call, body))


async def _embeddings(call: Call, body: dict[str, Any]) -> HttpResponseBase:
    try:
        _model, inputs = openai_dialect.parse_embeddings_request(body)
        model = await pipeline.admit(
            call, capability="embeddings", input_estimate=tokens.estimate_inputs(inputs)
        )
        wanted = body.get("encoding_format") or "float"
        # Ask the upstream for floats, then encode for the client: not every
        # OpenAI-compatible server implements base64.
        result = await pipeline.embeddings(call, model, {**body, "encoding_format": "float"})
        result["model"] = call.model
        if wanted == "base64":
            for item in result["data"]:
                if isinstance(item.get("embedding"), list):
                    vector = item["embedding"]
                    item["embedding"] = base64.b64encode(
                        struct.pack(f"<{len(vector)}f", *vector)
                    ).decode()
        call.status = "ok"
        return JsonResponse(result)
    except RelayError as error:
        call.fail(error)
        raise
    finally:
        call.settle()


def _anthropic_time(created: int) -> str:
    return datetime.fromtimestamp(created, tz=UTC).isoformat().replace("+00:00", "Z")


@api_view("models", methods=("GET",))
async def models_list(
    request: HttpRequest, principal: Principal, request_id: str
) -> HttpResponseBase:
    visible = [model for model in await catalog.alist_models() if principal.may_use(model.name)]
    if "anthropic-version" in request.headers:
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


@api_view("models", methods=("GET",))
async def model_detail(
    request: HttpRequest, principal: Principal, request_id: str, name: str
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
    if "anthropic-version" in request.headers:
        return JsonResponse(
            anthropic_dialect.model_object(
                model.name, model.display_name, _anthropic_time(model.created)
            )
        )
    return JsonResponse(openai_dialect.model_object(model.name, model.created))


@csrf_exempt
async def not_found(request: HttpRequest, path: str) -> HttpResponseBase:
    error = RelayError(
        404,
        f"Unknown API endpoint: {request.method} /v1/{path}",
        type="invalid_request_error",
        code="unknown_url",
    )
    return error_response(
        error,
        "anthropic" if "anthropic-version" in request.headers else "openai",
        pipeline.new_request_id(),
    )
